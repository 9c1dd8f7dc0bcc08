"""Segmentation metrics (torchmetrics, with an ignore index) and training-curve plots.

Names say what is averaged:

- ``iou``: per-class intersection over union ``TP / (TP + FP + FN)``; ``None`` (JSON null) for a
  class absent from both labels and predictions.
- ``miou_macro``: the unweighted mean of ``iou`` over the classes present in the labels or the
  predictions (torchmetrics ``MulticlassJaccardIndex(average="macro")``), not a micro (pixel-pooled)
  IoU.
- ``f1``: per-class F1 score ``2 TP / (2 TP + FP + FN)``; ``None`` like ``iou``.
- ``pixel_accuracy``: correct / labelled pixels, pooled over all classes
  (``MulticlassAccuracy(average="micro")``).
- ``confusion_matrix``: ``[true class][predicted class]`` pixel counts.

Pixels whose label is the ignore index count nowhere.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassJaccardIndex


class SegmentationMetrics:
    """Accumulates predictions against labels and reports the metrics named in the module docstring.

    Args:
        num_classes: ``K``; labels and predictions are channel indices ``0..K-1``.
        ignore_index: label value that is not scored.
        device: where the confusion matrix is accumulated.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: str | torch.device = "cpu") -> None:
        self.num_classes = num_classes
        kw = {"num_classes": num_classes, "ignore_index": ignore_index, "validate_args": False}
        self._metrics = MetricCollection({
            "iou": MulticlassJaccardIndex(average="none", **kw),
            "miou_macro": MulticlassJaccardIndex(average="macro", **kw),
            "pixel_accuracy": MulticlassAccuracy(average="micro", **kw),
            "confusion_matrix": MulticlassConfusionMatrix(**kw),
        }).to(device)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``preds`` and ``target`` are int tensors of channel indices of the same shape."""
        dev = self._metrics["iou"].confmat.device
        self._metrics.update(preds.to(dev).reshape(-1), target.to(dev).reshape(-1).long())

    def compute(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        """The metrics as plain JSON types; ``names`` adds ``iou_by_class`` keyed by class name."""
        out = self._metrics.compute()
        cm = out["confusion_matrix"].cpu().numpy().astype(np.int64)
        union = cm.sum(0) + cm.sum(1) - np.diag(cm)
        labelled = int(cm.sum())
        iou = [float(v) if u > 0 else None for v, u in zip(out["iou"].cpu().tolist(), union, strict=True)]
        tp = np.diag(cm)
        f1 = [float(2 * t / (t + u)) if u > 0 else None for t, u in zip(tp, union, strict=True)]  # 2TP/(2TP+FP+FN)
        res: dict[str, Any] = {
            "miou_macro": float(out["miou_macro"]) if labelled else None,
            "pixel_accuracy": float(out["pixel_accuracy"]) if labelled else None,
            "iou": iou,
            "f1": f1,
            "confusion_matrix": cm.tolist(),
            "labelled_pixels": labelled,
            "classes_in_labels": [int(k) for k in np.flatnonzero(cm.sum(1))],
        }
        if names is not None:
            res["iou_by_class"] = dict(zip(names, iou, strict=True))
            res["f1_by_class"] = dict(zip(names, f1, strict=True))
        return res

    def reset(self) -> None:
        """Forget everything added so far."""
        self._metrics.reset()


def curves_png(history: Sequence[dict[str, Any]], *, title: str = "training") -> bytes:
    """PNG (matplotlib, Agg) of the training loss and the validation macro mIoU per epoch."""
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, touches no global backend

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(8, 3.2), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [h["loss"] for h in history], marker="o", ms=3)
    ax1.set(xlabel="epoch", ylabel="training loss", title="loss")
    miou = [np.nan if h.get("val_miou") is None else h["val_miou"] for h in history]
    ax2.plot(epochs, miou, marker="o", ms=3, color="tab:green")
    ax2.set(xlabel="epoch", ylabel="val mIoU (macro)", title="validation mIoU", ylim=(0, 1))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


