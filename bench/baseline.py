"""The floor a land-cover model must beat: a per-pixel random forest on the raw bands.

    python bench/baseline.py configs/train/nc_landclass96.yaml [--max-pixels 200000] [--trees 100]

Uses the training config's own data and spatial split (``geoseg.train.make_data_split``, same seed),
so the forest learns from exactly the model's train pixels and is scored on exactly its val and test
parts, with the same metrics (macro mIoU over the classes present, pixel accuracy). It prints one
JSON object; the model's ``metrics.json`` holds the figures to compare with.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from sklearn.ensemble import RandomForestClassifier

from geoseg.config import TrainConfig, load_config
from geoseg.train import load_training_data, make_data_split
from geoseg.train.datasets import LabelledData
from geoseg.train.metrics import SegmentationMetrics


def pixels(data: LabelledData, boxes: list) -> tuple[np.ndarray, np.ndarray]:
    """Raw band values (N, C) and channel-index labels (N,) of the labelled, valid pixels of ``boxes``."""
    xs, ys = [], []
    ignore = data.schema.ignore_index
    for i, box in boxes:
        x, valid = data.images[i].read(box)
        lab = data.images[i].labels[box.y0 : box.y1, box.x0 : box.x1]
        keep = valid & (lab != ignore)
        xs.append(x[:, keep].T)
        ys.append(lab[keep])
    if not xs:
        return np.zeros((0, len(data.band_names)), np.float32), np.zeros(0, np.uint8)
    return np.concatenate(xs), np.concatenate(ys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a training config (configs/train/*.yaml)")
    parser.add_argument("--max-pixels", type=int, default=200_000, help="train pixels sampled (seeded)")
    parser.add_argument("--trees", type=int, default=100)
    args = parser.parse_args()
    config = load_config(args.config, TrainConfig)
    data = load_training_data(config)
    split = make_data_split(config, data)
    x, y = pixels(data, split.boxes("train"))
    rng = np.random.default_rng(config.seed)
    if len(y) > args.max_pixels:
        pick = rng.choice(len(y), args.max_pixels, replace=False)
        x, y = x[pick], y[pick]
    t0 = time.perf_counter()
    forest = RandomForestClassifier(n_estimators=args.trees, class_weight="balanced", n_jobs=-1,
                                    random_state=config.seed).fit(x, y)
    report = {"config": args.config, "train_pixels": int(len(y)), "fit_s": round(time.perf_counter() - t0, 1)}
    for part in ("val", "test"):
        xp, yp = pixels(data, split.boxes(part))
        metrics = SegmentationMetrics(data.num_classes, data.schema.ignore_index)
        if len(yp):
            metrics.update(torch.from_numpy(forest.predict(xp).astype(np.int64)), torch.from_numpy(yp.astype(np.int64)))
        m = metrics.compute(data.schema.names)
        report[part] = {k: m[k] for k in ("miou_macro", "pixel_accuracy", "labelled_pixels", "iou_by_class")}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
