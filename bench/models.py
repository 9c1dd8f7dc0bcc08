"""Forward speed of every network per tile size, and the measured cost of multi-scale + flip averaging.

    python bench/models.py --quick                       # CPU-friendly: 1 repeat, batch 1
    python bench/models.py --device cuda --batch 8 --repeats 10

Prints one row per arch/backbone and tile: ms per tile (forward only), megapixels per second, and,
on the rows of the TTA tile size, the cost factor of scales (0.5, 0.75, 1, 1.25, 1.5, 1.75) + flip
measured as time(TTA predictor) / time(plain predictor), next to the nominal ``Predictor.cost_factor``.
The forward runs on channels-last tensors as ``geoseg.predict.Predictor`` runs it (``--layout
contiguous``: torch's default layout, to compare); on CUDA under bf16 autocast, timed with
``torch.cuda.synchronize``.

    python bench/models.py --archs deeplabv3/resnet50 --output-stride 8 --tiles 512 --batch 4 --no-tta \\
        --layout contiguous
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from geoseg.checkpoint import ModelContract
from geoseg.config import BACKBONES, ClassSchema
from geoseg.models import build_model
from geoseg.predict import Predictor, resolve_device

TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
DEFAULT_ARCHS = [
    "deeplabv3/resnet50", "deeplabv3/resnet101", "deeplabv3/mobilenet_v3_large",
    "fcn/resnet50", "fcn/resnet101", "unet/resnet34", "tiny/none",
]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def parse_arch(text: str) -> tuple[str, str]:
    arch, _, backbone = text.replace(":", "/").partition("/")
    backbone = backbone or BACKBONES.get(arch, ("?",))[0]
    if arch not in BACKBONES or backbone not in BACKBONES[arch]:
        valid = ", ".join(f"{a}/{b}" for a, bs in BACKBONES.items() for b in bs)
        raise SystemExit(f"unknown arch/backbone {text!r}; valid: {valid}")
    return arch, backbone


def contract(arch: str, backbone: str, bands: int, classes: int, tile: int, output_stride: int) -> ModelContract:
    colours = [f"#{(37 * i) % 256:02x}{(91 * i) % 256:02x}{(53 * i) % 256:02x}" for i in range(classes)]
    schema = ClassSchema(name="bench", classes=[
        {"id": i, "name": f"class{i}", "color": c} for i, c in enumerate(colours)
    ])
    return ModelContract(arch=arch, backbone=backbone, output_stride=output_stride, tile_size=tile,
                         band_names=[f"b{i}" for i in range(bands)], mean=[0.0] * bands, std=[1.0] * bands,
                         classes=schema)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Best (minimum) seconds of ``repeats`` calls of ``fn``: the least disturbed by other load."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def forward_fn(model: torch.nn.Module, x: torch.Tensor, device: torch.device, layout: torch.memory_format):
    model = model.to(memory_format=layout)
    x = x.contiguous(memory_format=layout)

    def run() -> None:
        cuda = device.type == "cuda"
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            model(x)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--archs", nargs="+", default=DEFAULT_ARCHS, help="e.g. deeplabv3/resnet50")
    ap.add_argument("--tiles", nargs="+", type=int, default=[320, 640, 1024])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bands", type=int, default=3)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--tta-tile", type=int, default=None, help="tile for the TTA cost (default: smallest)")
    ap.add_argument("--output-stride", type=int, default=16, help="8 or 16 (U-Net: 8, 16 or 32)")
    ap.add_argument("--no-tta", action="store_true", help="forwards only, no TTA cost")
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="channels_last",
                    help="memory layout of the forwards (geoseg's predictor runs channels_last)")
    ap.add_argument("--quick", action="store_true", help="1 repeat, batch 1, warm-up at the smallest tile")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.batch = 1, 1
    device = resolve_device(args.device)
    tiles = sorted(args.tiles)
    tta_tile = args.tta_tile or tiles[0]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(f"# geoseg bench/models.py  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"# device: {device} ({name}); torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"{args.layout}, {'bf16 autocast' if device.type == 'cuda' else 'float32'}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"# batch {args.batch}, best of {args.repeats}, {args.bands} bands, "
          f"{args.classes} classes, output stride {args.output_stride}"
          + ("" if args.no_tta else f"; TTA = scales {TTA_SCALES} + flip at tile {tta_tile}"))
    header = f"{'arch/backbone':<30} {'tile':>5} {'ms/tile':>9} {'MP/s':>7} {'TTA cost':>9} {'nominal':>8}"
    print(header)
    print("-" * len(header))
    start = time.perf_counter()
    for spec in args.archs:
        arch, backbone = parse_arch(spec)
        torch.manual_seed(0)
        model = build_model(arch, backbone, args.bands, args.classes, args.output_stride).to(device).eval()
        for i, tile in enumerate(tiles):
            x = torch.randn(args.batch, args.bands, tile, tile, device=device)
            run = forward_fn(model, x, device, LAYOUTS[args.layout])
            if not args.quick or i == 0:
                run()  # warm-up
            sec = timed(run, device, args.repeats)
            ms = 1000 * sec / args.batch
            mps = args.batch * tile * tile / sec / 1e6
            tta = nominal = ""
            if tile == tta_tile and not args.no_tta:
                c = contract(arch, backbone, args.bands, args.classes, tile, args.output_stride)
                shape = (args.batch, args.bands, tile, tile)
                data = np.random.default_rng(0).standard_normal(shape, np.float32)
                plain = Predictor(model, c, device=device, batch_size=args.batch)
                aug = Predictor(model, c, scales=TTA_SCALES, flip=True, device=device, batch_size=args.batch)
                # the plain run is ~1/17 of the TTA run: best of 3 at least, so noise does not skew the ratio
                t_plain = timed(lambda p=plain, d=data: p.predict_proba(d), device, max(3, args.repeats))
                t_aug = timed(lambda p=aug, d=data: p.predict_proba(d), device, args.repeats)
                tta, nominal = f"{t_aug / t_plain:.1f}x", f"{aug.cost_factor:.1f}x"
            row = f"{arch + '/' + backbone:<30} {tile:>5} {ms:>9.1f} {mps:>7.2f} {tta:>9} {nominal:>8}"
            print(row.rstrip(), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"# total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
