"""geoseg side by side with a peer tool (geoai) on the same scene, network, window, batch and threads.

The peer lives in its own virtual environment, never in geoseg's; this script installs nothing::

    python3 -m venv .tmp/peer-venv
    .tmp/peer-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 geoai-py segmentation-models-pytorch
    python bench/peer.py --peer-python .tmp/peer-venv/bin/python --sizes 4096 10000

For each size it makes (once, under .tmp/bench/) a smooth random 3-band uint8 scene and one seeded
network with 7 classes (``--network``), saved both as a geoseg checkpoint and as the plain state dict
of the smp model geoai builds, the same weights under smp's names, then runs, each in its own process
with its memory polled (``bench/measure.py``):

* ``geoseg``: ``geoseg predict`` at its defaults for that model (window = tile 512, the default
  context margin M, :data:`geoseg.tiling.SEAM_FREE_MARGIN` = 16 px: overlap 32), polygons off, one worker;
* ``geoseg --block-size B``: the same with larger blocks (``--big-block``, default 4096), which share
  fewer tiles between neighbouring blocks;
* ``geoai``: ``geoai.semantic_segmentation`` at its defaults (window 512, overlap 256), for scenes up
  to ``--peer-defaults-up-to`` px (default 4096: at 10000² it runs for a quarter of an hour);
* ``geoai overlap 2M``: geoai at geoseg's overlap;

all with batch 4 and the same number of torch threads on the CPU (``--device cuda`` for a GPU, where
geoseg runs bf16 and geoai float32, each tool's own way), and prints wall seconds, Mpx/s of the
scene, peak RSS and PSS of the process tree.

Networks (:data:`NETWORKS`): ``unet_resnet18``, smp's U-Net, which geoseg builds too;
``deeplabv3_resnet50``, torchvision's DeepLabV3 in geoseg and smp's in geoai, at output stride 8
(smp's default): the same layers and parameter shapes in the same order (39.6 M), smp dilating the
first blocks of the last two stages too and upsampling the logits with corners aligned.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from measure import run_measured
from pipeline import BANDS as SCENE_BANDS
from pipeline import ROOT, WORK, make_scene

if TYPE_CHECKING:
    import torch

CLASSES = ROOT / "configs" / "classes" / "nc_landcover.yaml"
BANDS = SCENE_BANDS[:3]  # the bench scene's band names, in its order

#: network name → (geoseg/geoai architecture, backbone/encoder, output stride)
NETWORKS: dict[str, tuple[str, str, int]] = {
    "unet_resnet18": ("unet", "resnet18", 32),
    "deeplabv3_resnet50": ("deeplabv3", "resnet50", 8),
}

PEER = """
import sys, torch, geoai
torch.set_num_threads({threads})
geoai.semantic_segmentation({scene!r}, {out!r}, {weights!r}, architecture={arch!r}, encoder_name={backbone!r},
    num_channels=3, num_classes={classes}, window_size={window}, overlap={overlap}, batch_size={batch},
    device=torch.device({device!r}), quiet=True)
"""


def make_models(network: str, window: int) -> tuple[Path, Path]:
    """(geoseg checkpoint, geoai state dict) of one seeded network of :data:`NETWORKS`, the same weights in both."""
    import torch

    from geoseg.checkpoint import contract_for, save_checkpoint
    from geoseg.config import ModelConfig, load_config
    from geoseg.models import build_model

    arch, backbone, stride = NETWORKS[network]
    ckpt, weights = WORK / f"peer_{network}_{window}.pt", WORK / f"peer_{network}_{window}.state.pt"
    if not ckpt.exists():
        torch.manual_seed(0)
        classes = load_config(CLASSES)
        config = ModelConfig(arch=arch, backbone=backbone, output_stride=stride, tile_size=window)
        model = build_model(arch, backbone, 3, len(classes.classes), output_stride=stride)
        torch.save(smp_state_dict(model, arch, backbone, len(classes.classes)), weights)
        save_checkpoint(ckpt, model, contract_for(config, band_names=BANDS, mean=[100] * 3, std=[40] * 3,
                                                  classes=classes))
    return ckpt, weights


def smp_state_dict(model: torch.nn.Module, arch: str, backbone: str, classes: int) -> dict[str, torch.Tensor]:
    """``model``'s weights under the names of the smp model geoai builds for ``arch``/``backbone``.

    Both list the same tensors in the same order (torchvision's ResNet is smp's encoder, and
    torchvision's DeepLabV3 head has smp's decoder and head layers), so they pair up one by one;
    a shape that does not match stops the bench, and smp's loader checks the names.
    """
    import segmentation_models_pytorch as smp

    target = smp.create_model(arch, encoder_name=backbone, encoder_weights=None, in_channels=3, classes=classes)
    names, values = target.state_dict(), list(model.state_dict().values())
    if len(names) != len(values):
        raise SystemExit(f"{arch}/{backbone}: geoseg has {len(values)} tensors, smp {len(names)}")
    state = {}
    for (name, want), value in zip(names.items(), values, strict=True):
        if want.shape != value.shape:
            raise SystemExit(f"{arch}/{backbone}: smp's {name} is {tuple(want.shape)}, "
                             f"geoseg's is {tuple(value.shape)}")
        state[name] = value
    target.load_state_dict(state)
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", type=Path, help="a Python that has geoai (not needed with --skip-peer)")
    parser.add_argument("--network", choices=sorted(NETWORKS), default="unet_resnet18")
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
    if not (args.skip_peer or args.peer_python):
        parser.error("--peer-python is required unless --skip-peer")
    if not args.skip_peer and not has_geoai(args.peer_python):
        parser.error(f"{args.peer_python} cannot import geoai: make its venv as this script's docstring says")

    from geoseg.checkpoint import load_checkpoint

    arch, backbone, _ = NETWORKS[args.network]
    ckpt, weights = make_models(args.network, args.window)
    margin = load_checkpoint(ckpt)[1].margin(args.window)
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))  # the children's
    geoseg = [str(Path(sys.executable).with_name("geoseg")), "-q", "predict"]
    print(f"{args.network}: geoseg's default margin at {args.window} px: {margin} (overlap {2 * margin})")
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
                                   weights=str(weights), arch=arch, backbone=backbone, classes=7,
                                   window=args.window, overlap=overlap, batch=args.batch, device=args.device)
                runs.append((name, [str(args.peer_python), "-c", code], None))
        for name, cmd, summary in runs:
            m = run_measured(cmd)
            if summary:
                tiles = json.loads(summary.read_text())["grid"]["tiles"]
            else:
                tiles = windows(size, args.window, overlap_of(name, margin))
            print(f"{size:6d} {name:24} {m.seconds:7.1f} {size * size / 1e6 / m.seconds:6.2f} "
                  f"{m.peak_rss_mb:11.0f} {m.peak_pss_mb:11.0f} {tiles:6d}", flush=True)
    print(json.dumps({"network": args.network, "window": args.window, "margin": margin, "batch": args.batch,
                      "block_size": args.block_size, "threads": args.threads, "device": args.device}))


def has_geoai(python: Path) -> bool:
    """Whether ``python`` runs and imports geoai (checked before any run, not after geoseg's)."""
    try:
        return subprocess.run([str(python), "-c", "import geoai"], capture_output=True).returncode == 0
    except OSError:
        return False


def overlap_of(name: str, margin: int) -> int:
    """The overlap of a geoai row: 256 at its defaults, else geoseg's."""
    return 256 if name == "geoai" else 2 * margin


def windows(size: int, window: int, overlap: int) -> int:
    """Windows geoai runs over a ``size``² scene: a stride of ``window - overlap``, the last one at the edge."""
    per_axis = math.ceil((size - window) / (window - overlap)) + 1 if size > window else 1
    return per_axis * per_axis


if __name__ == "__main__":
    main()
