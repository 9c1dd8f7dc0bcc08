"""geoseg side by side with a peer tool (geoai) on the same scene, network, window, batch and threads.

The peer lives in its own virtual environment, never in geoseg's; this script installs nothing::

    python3 -m venv .tmp/peer-venv
    .tmp/peer-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 geoai-py segmentation-models-pytorch
    python bench/peer.py --peer-python .tmp/peer-venv/bin/python --sizes 4096 10000

For each size it makes (once, under .tmp/bench/) a smooth random 3-band uint8 scene and one seeded
smp U-Net / ResNet-18 with 7 classes, saved both as a geoseg checkpoint and as the plain state dict
geoai loads, then runs, each in its own process with its memory polled (``bench/measure.py``):

* ``geoseg``: ``geoseg predict`` at its defaults for that model (window = tile 512, the default
  context margin M, :data:`geoseg.tiling.SEAM_FREE_MARGIN` = 16 px: overlap 32), polygons off, one worker;
* ``geoseg --block-size B``: the same with larger blocks (``--big-block``, default 4096), which share
  fewer tiles between neighbouring blocks;
* ``geoai``: ``geoai.semantic_segmentation`` at its defaults (window 512, overlap 256), for scenes up
  to ``--peer-defaults-up-to`` px (default 4096: at 10000² it runs for a quarter of an hour);
* ``geoai overlap 2M``: geoai at geoseg's overlap;

all with batch 4 and the same number of torch threads on the CPU (``--device cuda`` for a GPU), and
prints wall seconds, Mpx/s of the scene, peak RSS and PSS of the process tree.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from measure import run_measured
from pipeline import BANDS as SCENE_BANDS
from pipeline import ROOT, WORK, make_scene

CLASSES = ROOT / "configs" / "classes" / "nc_landcover.yaml"
BANDS = SCENE_BANDS[:3]  # the bench scene's band names, in its order

PEER = """
import sys, torch, geoai
torch.set_num_threads({threads})
geoai.semantic_segmentation({scene!r}, {out!r}, {weights!r}, architecture="unet", encoder_name="resnet18",
    num_channels=3, num_classes={classes}, window_size={window}, overlap={overlap}, batch_size={batch},
    device=torch.device({device!r}), quiet=True)
"""


def make_models(window: int) -> tuple[Path, Path]:
    """(geoseg checkpoint, geoai state dict) of one seeded U-Net / ResNet-18 (five stages, as smp's default)."""
    import torch

    from geoseg.checkpoint import contract_for, save_checkpoint
    from geoseg.config import ModelConfig, load_config
    from geoseg.models import build_model

    ckpt, weights = WORK / f"peer_unet_r18_{window}.pt", WORK / f"peer_unet_r18_{window}.state.pt"
    if not ckpt.exists():
        torch.manual_seed(0)
        classes = load_config(CLASSES)
        config = ModelConfig(arch="unet", backbone="resnet18", output_stride=32, tile_size=window)
        model = build_model("unet", "resnet18", 3, len(classes.classes), output_stride=32)
        save_checkpoint(ckpt, model, contract_for(config, band_names=BANDS, mean=[100] * 3, std=[40] * 3,
                                                  classes=classes))
        torch.save(model.state_dict(), weights)
    return ckpt, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", type=Path, required=True, help="a Python that has geoai")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=2048, help="geoseg's block size")
    parser.add_argument("--big-block", type=int, default=4096, help="the larger block size to compare (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peer-defaults-up-to", type=int, default=4096, help="largest size to run geoai's defaults on")
    parser.add_argument("--skip-peer", action="store_true", help="geoseg only")
    args = parser.parse_args()

    from geoseg.checkpoint import load_checkpoint

    ckpt, weights = make_models(args.window)
    margin = load_checkpoint(ckpt)[1].margin(args.window)
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))  # the children's
    geoseg = [str(Path(sys.executable).with_name("geoseg")), "-q", "predict"]
    print(f"geoseg's default margin at {args.window} px: {margin} (overlap {2 * margin})")
    print(f"{'size':>6} {'run':24} {'s':>7} {'Mpx/s':>6} {'peak RSS MB':>11} {'peak PSS MB':>11} {'tiles':>6}")
    for size in args.sizes:
        scene = make_scene(size, bands=3)
        runs: list[tuple[str, list[str], Path | None]] = []
        blocks = [("geoseg", args.block_size)] + ([(f"geoseg --block-size {args.big_block}", args.big_block)]
                                                  if args.big_block else [])
        for name, block in blocks:
            out = WORK / f"peer_geoseg_{size}_{block}"
            runs.append((name, [*geoseg, str(scene), "-c", str(ckpt), "-o", str(out), "--overwrite",
                                "--tile", str(args.window), "--batch-size", str(args.batch),
                                "--block-size", str(block), "--workers", "1", "--device", args.device,
                                "--no-vectorize", "--threads", str(args.threads)], out / "summary.json"))
        if not args.skip_peer:
            overlaps = ([("geoai", 256)] if size <= args.peer_defaults_up_to else []) + [
                (f"geoai overlap {2 * margin}", 2 * margin)]
            for name, overlap in overlaps:
                code = PEER.format(threads=args.threads, scene=str(scene), out=str(WORK / f"peer_geoai_{size}.tif"),
                                   weights=str(weights), classes=7, window=args.window, overlap=overlap,
                                   batch=args.batch, device=args.device)
                runs.append((name, [str(args.peer_python), "-c", code], None))
        for name, cmd, summary in runs:
            m = run_measured(cmd)
            if summary:
                tiles = json.loads(summary.read_text())["grid"]["tiles"]
            else:
                tiles = windows(size, args.window, overlap_of(name, margin))
            print(f"{size:6d} {name:24} {m.seconds:7.1f} {size * size / 1e6 / m.seconds:6.2f} "
                  f"{m.peak_rss_mb:11.0f} {m.peak_pss_mb:11.0f} {tiles:6d}", flush=True)
    print(json.dumps({"window": args.window, "margin": margin, "batch": args.batch, "block_size": args.block_size,
                      "threads": args.threads, "device": args.device}))


def overlap_of(name: str, margin: int) -> int:
    """The overlap of a geoai row: 256 at its defaults, else geoseg's."""
    return 256 if name == "geoai" else 2 * margin


def windows(size: int, window: int, overlap: int) -> int:
    """Windows geoai runs over a ``size``² scene: a stride of ``window - overlap``, the last one at the edge."""
    per_axis = math.ceil((size - window) / (window - overlap)) + 1 if size > window else 1
    return per_axis * per_axis


if __name__ == "__main__":
    main()
