"""Score a model on a whole scene against labels, through the predict path itself.

:func:`evaluate` predicts the scene exactly as ``geoseg predict`` does (same tiling, stitching,
multi-scale and nodata handling; :func:`geoseg.pipeline.predict_raster`), reads the labels onto the
scene's grid (a label raster, or vector labels burnt onto it) and scores every labelled pixel that
the scene has data for (:class:`geoseg.train.metrics.SegmentationMetrics`: confusion matrix, per-class IoU
and F1, macro mIoU over the classes present, pixel accuracy). Labelled pixels where the scene is
nodata are counted apart, never scored.

Files in ``out_dir``: the predict outputs, ``evaluation.json``, ``confusion.png`` (row-normalised,
with counts) and ``comparison.png`` (image | predicted map | labels | errors).
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch

from geoseg.atomic import write_bytes, write_text
from geoseg.checkpoint import load_checkpoint
from geoseg.config import ClassSchema, PredictConfig
from geoseg.errors import DatasetError
from geoseg.pipeline import predict_raster
from geoseg.raster import gdal_env, read_valid
from geoseg.train.labels import encode_labels, read_labels
from geoseg.train.metrics import SegmentationMetrics

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Evaluation:
    """The scores (as in ``evaluation.json``) and the files written."""

    metrics: dict[str, Any]
    files: dict[str, str]


def evaluate(
    scene: str | Path,
    labels: str | Path,
    checkpoint: str | Path,
    *,
    out_dir: str | Path | None = None,
    config: PredictConfig | None = None,
    label_field: str = "id",
    overwrite: bool = False,
) -> Evaluation:
    """Predict ``scene`` with ``checkpoint`` and score the class map against ``labels``.

    Args:
        scene: the scene (GeoTIFF).
        labels: a label raster of class ids (any grid: read with nearest resampling) or vector
            labels (GeoPackage, Shapefile, GeoJSON) whose ``label_field`` holds class ids or names.
        checkpoint: a geoseg checkpoint; its contract's classes are scored.
        out_dir: where the prediction and the scores go; None: a temporary folder (only the
            returned metrics remain).
        config: predict settings (scales, flip, tile, bands, ...); polygons are never made.
        label_field: the vector labels' class field.
        overwrite: replace an earlier evaluation in ``out_dir``.

    Raises:
        GeosegError: a bad scene, checkpoint, labels or output folder, before any work.
    """
    config = (config or PredictConfig()).model_copy(update={"vectorize": False})
    _, contract = load_checkpoint(checkpoint)
    schema = contract.classes
    target = read_labels(labels, scene, schema, label_field=label_field)
    if not (target != schema.ignore_index).any():
        raise DatasetError(
            f"{labels}: no labelled pixel of the classes {list(schema.names)} falls on {scene}. "
            "Pass labels that cover the scene, with the checkpoint's class ids."
        )
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="geoseg-evaluate-") as tmp:
            return _evaluate(scene, labels, checkpoint, Path(tmp), config, schema, target, overwrite, keep=False)
    return _evaluate(scene, labels, checkpoint, Path(out_dir), config, schema, target, overwrite, keep=True)


def _evaluate(scene: str | Path, labels: str | Path, checkpoint: str | Path, out: Path, config: PredictConfig,
              schema: ClassSchema, target: np.ndarray, overwrite: bool, *, keep: bool) -> Evaluation:
    result = predict_raster(scene, checkpoint, out, config=config, overwrite=overwrite)
    with rasterio.open(result.outputs["class_map"]) as cls:
        pred = encode_labels(cls.read(1), schema, nodata=cls.nodata, source=result.outputs["class_map"])
    ignore = schema.ignore_index
    no_data = (pred == ignore) & (target != ignore)  # labelled, but the scene has no data there
    scored = target.copy()
    scored[no_data] = ignore
    metrics = SegmentationMetrics(len(schema.classes), ignore_index=ignore)
    metrics.update(torch.from_numpy(np.where(pred == ignore, 0, pred).astype(np.int64)), torch.from_numpy(scored))
    scores = {
        "scene": str(Path(scene).resolve()), "labels": str(Path(labels).resolve()),
        "checkpoint": str(Path(checkpoint).resolve()), "settings": config.model_dump(mode="json"),
        "classes": list(schema.names), **metrics.compute(schema.names),
        "labelled_without_data": int(no_data.sum()),
    }
    if not keep:
        return Evaluation(scores, {})
    files = {
        "evaluation": str(write_text(out / "evaluation.json", json.dumps(scores, indent=1, allow_nan=False))),
        "confusion": str(write_bytes(out / "confusion.png", confusion_png(scores["confusion_matrix"], schema.names))),
        "comparison": str(write_bytes(out / "comparison.png",
                                      comparison_png(scene, result.outputs["class_map"], pred, scored, schema))),
        **result.outputs,
    }
    return Evaluation(scores, files)


def confusion_png(cm: list[list[int]], names: Sequence[str]) -> bytes:
    """Confusion matrix, rows (true class) normalised to 1, each cell with its pixel count."""
    from matplotlib.figure import Figure

    counts = np.asarray(cm, np.int64)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    k = len(names)
    fig = Figure(figsize=(1.1 * k + 2, 1.0 * k + 1.5), dpi=100)
    ax = fig.subplots()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, f"{n}", ha="center", va="center", fontsize=7, color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="labelled", title="confusion (rows sum to 1; cells: pixels)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def comparison_png(scene: str | Path, class_map: str | Path, pred: np.ndarray, target: np.ndarray,
                   schema: ClassSchema, *, max_side: int = 600) -> bytes:
    """Image | predicted map | labels | errors (green right, red wrong, white unscored), decimated."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from geoseg.export.quicklook import colourise, rgb_composite

    step = max(1, int(np.ceil(max(pred.shape) / max_side)))
    sl = (slice(None, None, step), slice(None, None, step))
    shape = pred[sl].shape
    with gdal_env(), rasterio.open(scene) as src:  # read decimated: memory follows the picture, not the scene
        data, valid = read_valid(src, out_shape=shape)
        names = tuple(d or f"band_{i + 1}" for i, d in enumerate(src.descriptions))
    colours = np.array([c.rgb for c in schema.classes], np.float64) / 255
    ignore = schema.ignore_index
    errors = np.ones((*pred[sl].shape, 3))
    p, t = pred[sl], target[sl]
    scored = t != ignore
    errors[scored & (p == t)] = (0.2, 0.7, 0.2)
    errors[scored & (p != t)] = (0.85, 0.1, 0.1)
    panels = [("image", rgb_composite(data, valid, names)),
              (f"map ({Path(class_map).name})", colourise(p, colours)), ("labels", colourise(t, colours)),
              ("errors", errors)]
    fig = Figure(figsize=(12, 3.8), dpi=100)
    for ax, (title, img) in zip(fig.subplots(1, 4), panels, strict=True):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.legend(handles=[Patch(color=colours[k], label=n) for k, n in enumerate(schema.names)],
               loc="lower center", ncol=min(len(colours), 8), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
