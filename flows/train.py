"""Prefect flow: train one model from a YAML under configs/train, publishing per-epoch metrics.

Thin: one task calls :func:`geoseg.train.train`; its progress callback publishes, after every epoch,
a table artifact (epoch, loss, val mIoU, pixel accuracy, lr) and a markdown artifact with the loss
and mIoU curves as an embedded PNG.  At the end it publishes the best weights' whole-scene scores:
a table of IoU and F1 per class on val and test (``train-scores``) and the test confusion matrix
(``train-confusion``).

Run it: ``python flows/train.py CONFIG_YAML [OUT_DIR]``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from geoseg.config import TrainConfig, settings_with_overrides
from geoseg.export.quicklook import png_data_uri
from geoseg.train import train as train_model
from geoseg.train.evaluate import confusion_png
from geoseg.train.metrics import curves_png


def _publish(name: str, history: list[dict[str, Any]]) -> None:
    """Table and curves artifacts for the epochs so far (same keys each epoch: a new version)."""
    def r(v: float | None, n: int = 4) -> float | None:
        return None if v is None else round(v, n)

    create_table_artifact(
        key="train-metrics",
        table=[{"epoch": h["epoch"], "loss": r(h["loss"]), "val_miou": r(h["val_miou"]),
                "pixel_acc": r(h["val_pixel_accuracy"]), "lr": r(h["lr"], 8)} for h in history],
        description=f"Per-epoch metrics of {name} (val mIoU: macro over classes)",
    )
    last = history[-1]
    create_markdown_artifact(
        key="train-curves",
        markdown=(f"# {name}: epoch {last['epoch']} of {last['epochs']}\n\n"
                  f"![loss and val mIoU]({png_data_uri(curves_png(history, title=name))})\n"),
        description=f"Loss and val mIoU curves of {name}",
    )


def _publish_scores(name: str, val: dict[str, Any] | None, test: dict[str, Any] | None) -> None:
    """Per-class IoU/F1 of the best weights on val and test, and the test confusion matrix."""
    classes = list((test or val or {}).get("iou_by_class", {}))
    def at(part: dict[str, Any] | None, key: str, k: int) -> float | None:
        v = part[key][k] if part else None
        return None if v is None else round(v, 4)

    rows = [{"class": c, "val_iou": at(val, "iou", k), "val_f1": at(val, "f1", k), "test_iou": at(test, "iou", k),
             "test_f1": at(test, "f1", k)} for k, c in enumerate(classes)]
    rows.append({"class": "macro mIoU / pixel accuracy",
                 "val_iou": val and round(val["miou_macro"], 4), "val_f1": val and round(val["pixel_accuracy"], 4),
                 "test_iou": test and round(test["miou_macro"], 4),
                 "test_f1": test and round(test["pixel_accuracy"], 4)})
    create_table_artifact(key="train-scores", table=rows,
                          description=f"{name}: whole-scene scores of the best weights (last row: mIoU, accuracy)")
    if test:
        png = confusion_png(test["confusion_matrix"], classes)
        create_markdown_artifact(key="train-confusion", description=f"{name}: test confusion matrix",
                                 markdown=f"# {name}: test part\n\n![confusion matrix]({png_data_uri(png)})\n")


@task(name="train", cache_policy=NO_CACHE)
def train_task(config: TrainConfig, out_dir: str | None, resume: bool) -> dict[str, Any]:
    """Train, publishing artifacts per epoch; returns the run's files and test metrics."""
    logger = get_run_logger()
    name = f"{config.model.arch}/{config.model.backbone}"
    history: list[dict[str, Any]] = []

    def progress(row: dict[str, Any]) -> None:
        history.append(row)
        logger.info("epoch %d/%d loss %.4f val mIoU %s", row["epoch"], row["epochs"], row["loss"], row["val_miou"])
        _publish(name, history)

    result = train_model(config, out_dir=out_dir, progress=progress, resume=resume, overwrite=not resume)
    _publish_scores(name, result.val, result.test)
    return {"best": str(result.best), "last": str(result.last), "metrics": str(result.metrics_file),
            "test": result.test, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run}


@flow(name="geoseg-train", log_prints=True)
def train(config: str | dict[str, Any], out_dir: str | None = None, resume: bool = False) -> dict[str, Any]:
    """Train the model ``config`` describes; returns the checkpoint paths and test metrics.

    Args:
        config: a train settings YAML (configs/train/*.yaml) or a dict of them.
        out_dir: run folder (default: the config's ``out_dir``); an earlier run there is replaced
            unless ``resume``.
        resume: continue the run in ``out_dir`` from its ``last.pt``.
    """
    cfg = settings_with_overrides(TrainConfig, config)
    result = train_task(cfg, out_dir, resume)
    test = result["test"] or {}
    print(f"best checkpoint {Path(result['best']).resolve()} (epoch {result['best_epoch']}), "
          f"test mIoU (macro) {test.get('miou_macro')}, pixel accuracy {test.get('pixel_accuracy')}")
    return result


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python flows/train.py CONFIG_YAML [OUT_DIR]")
    train(sys.argv[1], out_dir=sys.argv[2] if len(sys.argv) == 3 else None)
