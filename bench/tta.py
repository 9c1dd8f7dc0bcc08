"""Multi-scale + flip test-time augmentation vs one scale: the trained model's val/test scores and cost.

    python bench/tta.py CHECKPOINT [--scales 0.75,1,1.25] [--no-flip] [--threads 2]

Reads the checkpoint's own training config and split (its provenance), predicts every labelled
scene whole through the predict path's tiling and blending (geoseg.train.scoring) once at scale 1
and once with the given scales (and left-right flips), and prints one JSON object: macro mIoU and
pixel accuracy of the val and test parts, and the seconds each setting took.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from geoseg.checkpoint import load_checkpoint
from geoseg.config import TrainConfig
from geoseg.predict import Predictor
from geoseg.train.loop import image_contracts, load_training_data
from geoseg.train.scoring import score_parts
from geoseg.train.splits import Split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--scales", default="0.75,1,1.25")
    parser.add_argument("--no-flip", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, contract = load_checkpoint(args.checkpoint)
    prov = contract.provenance
    config = TrainConfig.model_validate(prov["train_config"])
    data = load_training_data(config)
    split = Split.from_dict(prov["split"])
    scaling = image_contracts(contract, data)
    report = {"checkpoint": args.checkpoint, "threads": args.threads}
    settings = {"single": ((1.0,), False),
                "tta": (tuple(float(s) for s in args.scales.split(",")), not args.no_flip)}
    for name, (scales, flip) in settings.items():
        predictor = Predictor(model, contract, scales=scales, flip=flip, device="cpu")
        t0 = time.perf_counter()
        scores = score_parts(predictor, data, split, ["val", "test"], scaling)
        report[name] = {"scales": scales, "flip": flip, "seconds": round(time.perf_counter() - t0, 1),
                        **{p: {k: round(s[k], 4) for k in ("miou_macro", "pixel_accuracy")} if s else None
                           for p, s in scores.items()}}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
