"""End-to-end predict time versus model-only forward time over the same tiles, and peak memory.

For each scene size it generates (once, block-wise, under .tmp/bench/) a smooth random uint8 scene,
then in the same run:

* e2e: ``predict_raster`` (read, normalise, predict, blend, write Zarr, COGs; vectorise off unless
  --vectorize) in a child process whose process tree's memory is polled (``bench/measure.py``);
* model: the same predictor over the same number of tiles in the same batch sizes, fed from memory
  already on the device (``Predictor.proba``: forward passes, resizing and softmax only).

Prints one row per size: tiles run (each in the one block that owns it), lattice tiles (the grid's
count: the two agree), e2e s, model s, ratio e2e/model (wall) and cpu_ratio (the same sections'
process CPU time, all threads: steadier when other jobs share the machine, and an upper bound with one
worker, since the read/write threads' CPU counts even where it overlaps the model's), in_run (e2e s
over the seconds the e2e run itself spent in ``Predictor.proba``: what the pipeline adds to its own
forwards, immune to the machine running faster or slower between the two runs; one CPU worker only,
where those calls run in the bench's process and return when done), e2e peak PSS and RSS in MB,
model-only peak PSS (the floor: interpreter, libraries, model and one batch), and per stage its time
and the peak PSS sampled while it ran (``start`` is the interpreter and imports before the job; the blocks
stage also by thirds of its time, which rise if memory drifts block after block).

    python bench/pipeline.py --sizes 2048 4096 --arch deeplabv3 --backbone mobilenet_v3_large --tile 320
    python bench/pipeline.py --sizes 10000 40000 --arch tiny --tile 512 --skip-model   # memory run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import rasterio
from measure import peak_between, run_measured
from rasterio.transform import from_origin
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".tmp" / "bench"
BANDS = ("blue", "green", "red", "nir", "swir1", "swir2")


def make_scene(size: int, bands: int = 6, chunk: int = 2048) -> Path:
    """A smooth random uint8 scene of size² px, written chunk by chunk (bounded memory)."""
    path = WORK / (f"scene_{size}.tif" if bands == 6 else f"scene_{size}_{bands}b.tif")
    if path.exists():
        return path
    WORK.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", width=size, height=size, count=bands, dtype="uint8", nodata=0,
                   crs="EPSG:32617", transform=from_origin(600000, 4000000, 10, 10), tiled=True,
                   blockxsize=512, blockysize=512, BIGTIFF="YES")
    yy, xx = np.mgrid[0:chunk, 0:chunk].astype(np.float32)
    partial = path.with_suffix(".partial.tif")
    with rasterio.open(partial, "w", **profile) as dst:
        for i, name in enumerate(BANDS[:bands], start=1):
            dst.set_band_description(i, name)
        for y0 in range(0, size, chunk):
            for x0 in range(0, size, chunk):
                h, w = min(chunk, size - y0), min(chunk, size - x0)
                y, x = yy[:h, :w] + y0, xx[:h, :w] + x0
                rng = np.random.default_rng(y0 * size + x0)
                block = np.stack([
                    100 + 60 * np.sin(x / (97 + 13 * b)) * np.cos(y / (131 + 7 * b)) + rng.normal(0, 8, (h, w))
                    for b in range(bands)
                ])
                dst.write(np.clip(block, 1, 255).astype(np.uint8), window=Window(x0, y0, w, h))
    partial.rename(path)
    return path


def make_checkpoint(arch: str, backbone: str, tile: int) -> Path:
    """A seeded, untrained checkpoint of the requested network for the bench scenes' bands."""
    import torch

    from geoseg.checkpoint import contract_for, save_checkpoint
    from geoseg.config import ModelConfig, load_config
    from geoseg.models import build_model

    path = WORK / f"{arch}_{backbone}_{tile}.pt"
    if not path.exists():
        torch.manual_seed(0)
        classes = load_config(ROOT / "configs" / "classes" / "nc_landcover.yaml")
        model = build_model(arch, backbone, len(BANDS), len(classes.classes))
        contract = contract_for(ModelConfig(arch=arch, backbone=backbone, tile_size=tile), band_names=BANDS,
                                mean=[100] * 6, std=[40] * 6, classes=classes)
        save_checkpoint(path, model, contract)
    return path


def child_e2e(args: argparse.Namespace) -> dict:
    from geoseg.config import PredictConfig
    from geoseg.pipeline import plan_run, predict_raster
    from geoseg.predict import resolve_device

    cfg = PredictConfig(block_size=args.block_size, batch_size=args.batch, device=args.device,
                        vectorize=args.vectorize, workers=args.workers)
    out = WORK / f"out_{Path(args.scene).stem}"
    forward = time_forwards() if args.workers == 1 and resolve_device(args.device).type == "cpu" else None
    started = time.time()
    t0, c0 = time.perf_counter(), time.process_time()
    result = predict_raster(args.scene, args.checkpoint, out, config=cfg, overwrite=True, start_cluster=True)
    seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    plan = plan_run(args.scene, args.checkpoint, out, config=cfg)
    return {"seconds": seconds, "cpu_s": cpu_s, "started": started, "forward_s": forward and forward[0],
            "tiles": plan.tiles,
            "lattice_tiles": plan.grid.rows * plan.grid.cols,
            "blocks": len(plan.blocks), "timings": result.timings, "margin": plan.grid.margin,
            "tile": plan.grid.tile}


def time_forwards() -> list[float]:
    """Wrap ``Predictor.proba`` in this process to add up its seconds; returns the one-item total."""
    from geoseg.predict import Predictor

    total = [0.0]
    proba = Predictor.proba

    def timed(self: Predictor, x: object) -> object:
        t0 = time.perf_counter()
        out = proba(self, x)
        total[0] += time.perf_counter() - t0
        return out

    Predictor.proba = timed
    return total


def child_model(args: argparse.Namespace) -> dict:
    """Forward passes only: the same tile count and batch sizes as the e2e run, inputs from memory."""
    import torch

    from geoseg.checkpoint import load_checkpoint
    from geoseg.config import PredictConfig
    from geoseg.pipeline import plan_run
    from geoseg.predict import Predictor
    from geoseg.worker import torch_threads

    cfg = PredictConfig(block_size=args.block_size, batch_size=args.batch, device=args.device, vectorize=False)
    plan = plan_run(args.scene, args.checkpoint, WORK / "model_only_plan", config=cfg)
    model, contract = load_checkpoint(args.checkpoint, device=plan.job.device)
    predictor = Predictor(model, contract, device=plan.job.device, batch_size=args.batch)
    t = plan.grid.tile
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(args.batch, contract.in_channels, t, t)).astype(np.float32))
    x = x.to(predictor.device)
    batches = [len(b.tiles[i:i + args.batch]) for b in plan.blocks for i in range(0, len(b.tiles), args.batch)]
    with torch_threads(cfg.threads):
        predictor.proba(x[:1])  # warm-up
        if plan.job.device == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        for n in batches:
            predictor.proba(x[:n])
        if plan.job.device == "cuda":
            torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "tiles": sum(batches)}


def run_child(mode: str, args: argparse.Namespace, scene: Path, checkpoint: Path) -> dict:
    """Run a child mode in a fresh process; add the peak PSS and RSS of its whole process tree."""
    cmd = [sys.executable, __file__, "--child", mode, "--scene", str(scene), "--checkpoint", str(checkpoint),
           "--block-size", str(args.block_size), "--batch", str(args.batch), "--device", args.device,
           "--workers", str(args.workers)] + (["--vectorize"] if args.vectorize else [])
    run = run_measured(cmd, cwd=ROOT)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    result.update(peak_pss_mb=run.peak_pss_mb, peak_rss_mb=run.peak_rss_mb)
    if mode == "e2e":
        result["stage_pss_mb"] = stage_peaks(run.trace, result["started"], result["timings"])
    return result


def stage_peaks(trace: list[tuple[float, float]], started: float, timings: dict[str, float]) -> dict[str, float]:
    """Peak PSS per stage: the stages ran one after another from ``started`` in ``timings``' order.

    The blocks stage is also split into thirds by time (``blocks_1`` … ``blocks_3``): memory that
    drifts up block after block shows as rising thirds.
    """
    peaks = {"start": peak_between(trace, 0.0, started)}
    for name, seconds in timings.items():
        peaks[name] = peak_between(trace, started, started + seconds)
        if name == "blocks":
            third = seconds / 3
            for k in range(3):
                peaks[f"blocks_{k + 1}"] = peak_between(trace, started + k * third, started + (k + 1) * third)
        started += seconds
    return peaks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--arch", default="tiny")
    p.add_argument("--backbone", default="none")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--checkpoint", type=Path, help="use this checkpoint instead of a generated one")
    p.add_argument("--block-size", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--vectorize", action="store_true")
    p.add_argument("--skip-model", action="store_true", help="memory run: no model-only timing")
    p.add_argument("--repeat", type=int, default=1,
                   help="e2e/model pairs, interleaved; the fastest of each is shown (other jobs only slow a run down)")
    p.add_argument("--child", choices=["e2e", "model"], help=argparse.SUPPRESS)
    p.add_argument("--scene", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("DASK_TEMPORARY_DIRECTORY", str(ROOT / ".tmp" / "dask"))
    if args.child:
        print(json.dumps((child_e2e if args.child == "e2e" else child_model)(args)))
        return
    checkpoint = args.checkpoint or make_checkpoint(args.arch, args.backbone, args.tile)
    print(f"# bench/pipeline.py {date.today()} on {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; checkpoint {checkpoint.name}, device {args.device}, workers {args.workers}")
    print(f"{'size':>7} {'tiles':>7} {'lattice':>7} {'e2e_s':>8} {'model_s':>8} {'ratio':>6} {'cpu_ratio':>9} "
          f"{'in_run':>6} {'pss_mb':>7} {'rss_mb':>7} {'model_pss_mb':>12}  stages")
    for size in args.sizes:
        scene = make_scene(size)
        runs = [(run_child("e2e", args, scene, checkpoint),
                 None if args.skip_model else run_child("model", args, scene, checkpoint))
                for _ in range(args.repeat)]
        e2e = min((r[0] for r in runs), key=lambda r: r["seconds"])
        model = None if args.skip_model else min((r[1] for r in runs), key=lambda r: r["seconds"])
        ratio = f"{e2e['seconds'] / model['seconds']:.3f}" if model else "-"
        cpu_ratio = f"{e2e['cpu_s'] / model['cpu_s']:.3f}" if model else "-"
        model_s = f"{model['seconds']:.1f}" if model else "-"
        in_run = f"{e2e['seconds'] / e2e['forward_s']:.3f}" if e2e["forward_s"] else "-"
        model_pss = f"{model['peak_pss_mb']:.0f}" if model else "-"
        stage_mb = e2e["stage_pss_mb"]
        stages = f"start={stage_mb['start']:.0f}MB " + " ".join(
            f"{k}={v:.1f}s/{stage_mb[k]:.0f}MB" for k, v in e2e["timings"].items())
        stages += " blocks_by_third=" + "/".join(f"{stage_mb[f'blocks_{k}']:.0f}" for k in (1, 2, 3)) + "MB"
        print(f"{size:>7} {e2e['tiles']:>7} {e2e['lattice_tiles']:>7} {e2e['seconds']:>8.1f} {model_s:>8} "
              f"{ratio:>6} {cpu_ratio:>9} {in_run:>6} "
              f"{e2e['peak_pss_mb']:>7.0f} {e2e['peak_rss_mb']:>7.0f} {model_pss:>12}  "
              f"{stages}", flush=True)


if __name__ == "__main__":
    main()
