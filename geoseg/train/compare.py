"""Compare architectures on one split: train each, score it on the test part, tabulate and picture them.

:func:`compare` trains every model of ``TrainConfig.compare`` (default :data:`DEFAULT_MODELS`:
DeepLabV3 on ResNet-50 and MobileNetV3, FCN on ResNet-50, U-Net on ResNet-34) with the same settings
and the same split, each into its own sub-folder, then writes:

- ``compare.csv`` and ``compare.md``: model, test macro mIoU, pixel accuracy, per-class IoU,
  parameters, inference tiles/s (batched forward of 16 tiles of the training size on the training
  device after a warm-up batch; models measured in turn after all are trained, best of
  :data:`THROUGHPUT_ROUNDS` rounds), training seconds and best epoch;
- ``compare.png``: for the same test tiles, image (RGB composite) | label | each model's prediction,
  coloured with the class schema's colours (unlabelled and nodata pixels white).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geoseg.atomic import write_bytes, write_text
from geoseg.checkpoint import ModelContract, load_checkpoint
from geoseg.config import ModelConfig, TrainConfig
from geoseg.export.quicklook import colourise, rgb_composite
from geoseg.predict import Predictor
from geoseg.tiling import Box
from geoseg.train.datasets import LabelledData
from geoseg.train.loop import TrainResult, load_training_data, make_data_split, train
from geoseg.train.splits import Split

log = logging.getLogger(__name__)

#: Rounds of the inference-speed measurement; each model keeps its best round.
THROUGHPUT_ROUNDS = 3

#: The models compared when ``TrainConfig.compare`` is empty (tile size and stride from ``config.model``).
DEFAULT_MODELS = (("deeplabv3", "resnet50"), ("deeplabv3", "mobilenet_v3_large"), ("fcn", "resnet50"),
                  ("unet", "resnet34"))


@dataclass
class CompareResult:
    """The comparison's files and rows (one dict per model, as in ``compare.csv``)."""

    out_dir: Path
    table_csv: Path
    table_md: Path
    figure: Path
    rows: list[dict[str, Any]]
    runs: dict[str, TrainResult]


def models_to_compare(config: TrainConfig) -> tuple[ModelConfig, ...]:
    """``config.compare``, or :data:`DEFAULT_MODELS` at ``config.model``'s tile size and output stride."""
    if config.compare:
        return config.compare
    base = config.model
    return tuple(base.model_copy(update={"arch": a, "backbone": b}) for a, b in DEFAULT_MODELS)


def model_name(m: ModelConfig) -> str:
    """A short name such as ``deeplabv3-mobilenet_v3_large``."""
    return f"{m.arch}-{m.backbone}"


def compare(
    config: TrainConfig,
    *,
    out_dir: str | Path | None = None,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
    figure_tiles: int = 3,
) -> CompareResult:
    """Train and score every model of :func:`models_to_compare` on one split.

    Args:
        config: training settings shared by all models (``config.model`` is replaced by each).
        out_dir: where to write (default ``config.out_dir``); each model trains into ``out_dir/<name>``.
        progress: called after each epoch with the model's name and the epoch's row.
        figure_tiles: test tiles shown in ``compare.png`` (those with the most labelled pixels).
    """
    out = Path(out_dir if out_dir is not None else config.out_dir)
    models = models_to_compare(config)
    data = load_training_data(config)
    split = make_data_split(config, data)
    split.save(out / "split.json")
    runs, trained, preds = {}, {}, {}
    tiles = _figure_tiles(data, split, models[0].tile_size, figure_tiles)
    for m in models:
        name = model_name(m)
        if name in runs:
            name = f"{name}-{len(runs)}"
        log.info("compare: training %s", name)
        cb = None if progress is None else (lambda row, n=name: progress(n, row))
        result = train(config.model_copy(update={"model": m}), out_dir=out / name, progress=cb, overwrite=True,
                       split=split)
        runs[name] = result
        trained[name] = load_checkpoint(result.best, device=result.device)
        preds[name] = _predict(*trained[name], data, tiles, result.device)
    speed = {name: 0.0 for name in trained}
    for _ in range(THROUGHPUT_ROUNDS):  # interleaved rounds, best of each: fairer on a shared machine
        for name, (model, contract) in trained.items():
            speed[name] = max(speed[name], _throughput(model, contract, runs[name].device))
    rows = [_row(name, model, speed[name], runs[name], data) for name, (model, _) in trained.items()]
    table_csv, table_md = _write_tables(out, rows, data.schema.names)
    figure = out / "compare.png"
    write_bytes(figure, _figure_png(data, tiles, preds))
    return CompareResult(out, table_csv, table_md, figure, rows, runs)


def _row(name: str, model: Any, tiles_per_s: float, result: TrainResult, data: LabelledData) -> dict[str, Any]:
    test = result.test or {}
    row: dict[str, Any] = {
        "model": name, "miou_macro": test.get("miou_macro"), "pixel_accuracy": test.get("pixel_accuracy"),
    }
    for cname, iou in zip(data.schema.names, test.get("iou", [None] * data.num_classes), strict=True):
        row[f"iou_{cname}"] = iou
    row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    row["tiles_per_s"] = tiles_per_s
    row["train_s"] = result.seconds
    row["best_epoch"] = result.best_epoch
    return row


def _throughput(model: Any, contract: ModelContract, device: str, n: int = 16, batch: int = 8) -> float:
    """Tiles per second of a batched forward at the contract's tile size (after one warm-up batch)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, contract.in_channels, contract.tile_size, contract.tile_size)).astype(np.float32)
    pred = Predictor(model, contract, device=device, batch_size=batch)
    pred.predict_proba(x[:batch])
    t0 = time.perf_counter()
    pred.predict_proba(x)
    return n / (time.perf_counter() - t0)


def _figure_tiles(data: LabelledData, split: Split, tile: int, n: int) -> list[tuple[int, Box]]:
    """Up to ``n`` non-overlapping tiles centred on the test units with the most labelled pixels."""
    units = split.boxes("test") or split.boxes("val") or split.boxes("train")
    k = data.num_classes

    def labelled(u: tuple[int, Box]) -> int:
        i, b = u
        return int((data.images[i].labels[b.y0 : b.y1, b.x0 : b.x1] < k).sum())

    out: list[tuple[int, Box]] = []
    for i, b in sorted(units, key=lambda u: -labelled(u)):
        cy, cx = (b.y0 + b.y1) // 2 - tile // 2, (b.x0 + b.x1) // 2 - tile // 2
        box = Box(cy, cx, cy + tile, cx + tile)
        if len(out) < n and all(j != i or box.intersection(o) is None for j, o in out):
            out.append((i, box))
    return out


def _predict(model: Any, contract: ModelContract, data: LabelledData, tiles: Sequence[tuple[int, Box]],
             device: str) -> list[np.ndarray]:
    if not tiles:
        return []
    xs = [contract.normalise(*data.images[i].read(b)) for i, b in tiles]
    prob = Predictor(model, contract, device=device).predict_proba(np.stack(xs))
    return list(prob.argmax(1).astype(np.uint8))


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _write_tables(out: Path, rows: list[dict[str, Any]], names: Sequence[str]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "compare.csv", out / "compare.md"
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_text(csv_path, table.getvalue())
    head = ["model", "mIoU (macro)", "pixel acc", *[f"IoU {n}" for n in names], "params (M)", "tiles/s",
            "train s", "best epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], _fmt(r["miou_macro"]), _fmt(r["pixel_accuracy"]),
                 *[_fmt(r[f"iou_{n}"]) for n in names], f"{r['params_m']:.1f}", f"{r['tiles_per_s']:.1f}",
                 f"{r['train_s']:.0f}", str(r["best_epoch"])]
        lines.append("| " + " | ".join(cells) + " |")
    write_text(
        md_path,
        "Test part, best checkpoint of each model (by val mIoU). mIoU is the macro mean over classes present "
        "in the labels or predictions; '–': class absent from both.\n\n" + "\n".join(lines) + "\n"
    )
    return csv_path, md_path


def _figure_png(data: LabelledData, tiles: Sequence[tuple[int, Box]], preds: dict[str, list[np.ndarray]]) -> bytes:
    import io

    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    colours = np.array([c.rgb for c in data.schema.classes], np.float64) / 255
    cols = 2 + len(preds)
    rows = max(1, len(tiles))
    fig = Figure(figsize=(2.2 * cols, 2.2 * rows + 0.8), dpi=100)
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    for r, (i, box) in enumerate(tiles):
        x, valid = data.images[i].read(box)
        lab = np.full(box.shape, 255, np.uint8)
        inside = box.intersection(Box(0, 0, *data.images[i].shape))
        if inside is not None:
            lab[inside.relative_to(box)] = data.images[i].labels[inside.y0:inside.y1, inside.x0:inside.x1]
        panels = [("image", rgb_composite(x, valid, data.band_names)), ("label", colourise(lab, colours))]
        for name, p in preds.items():
            pred = p[r].copy()
            pred[~valid] = 255
            panels.append((name, colourise(pred, colours)))
        for c, (title, img) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
        axes[r, 0].set_ylabel(f"{data.images[i].name} y{box.y0} x{box.x0}", fontsize=6)
    fig.legend(handles=[Patch(color=colours[k], label=n) for k, n in enumerate(data.schema.names)],
               loc="lower center", ncol=min(len(colours), 7), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
