"""Ship a trained run as a bundled checkpoint, checked against its per-pixel floor.

    python scripts/ship_model.py RUN_DIR TRAIN_CONFIG STEM

Fits the floor (bench/baseline.py: a per-pixel random forest on the config's own train pixels,
scored on the same val/test parts), writes ``STEM.pt`` (the run's best.pt, float16 weights, contract
inside) and ``STEM.metrics.json`` (the run's metrics.json plus the floor's), and prints both test
scores. Exits non-zero when the model does not beat the floor by 0.05 macro mIoU and 3 points of
pixel accuracy on the test part.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from geoseg.train import export_checkpoint

#: What a shipped model must gain over the floor on its test part.
MIN_MIOU_GAIN, MIN_ACCURACY_POINTS = 0.05, 3.0


def main(run: Path, config: str, stem: Path) -> int:
    """Ship ``run`` as ``STEM.pt`` + ``STEM.metrics.json``; 1 when it does not clear the bar."""
    floor = json.loads(subprocess.run([sys.executable, "bench/baseline.py", config], check=True,
                                      capture_output=True, text=True).stdout)
    report = json.loads((run / "metrics.json").read_text())
    ckpt = export_checkpoint(run / "best.pt", stem.with_suffix(".pt"), half=True)
    stem.with_suffix(".metrics.json").write_text(json.dumps({**report, "baseline": floor}, indent=1) + "\n")
    m, f = report["test"], floor["test"]
    gain, points = m["miou_macro"] - f["miou_macro"], 100 * (m["pixel_accuracy"] - f["pixel_accuracy"])
    print(f"{ckpt}: {ckpt.stat().st_size / 1e6:.1f} MB, trained {report['training_seconds'] / 60:.1f} min on "
          f"{report['device']}; test mIoU {m['miou_macro']:.3f} (forest {f['miou_macro']:.3f}, {gain:+.3f}), "
          f"pixel accuracy {m['pixel_accuracy']:.3f} (forest {f['pixel_accuracy']:.3f}, {points:+.1f} points)")
    if gain < MIN_MIOU_GAIN or points < MIN_ACCURACY_POINTS:
        print(f"below the bar: +{MIN_MIOU_GAIN} mIoU and +{MIN_ACCURACY_POINTS} points over the forest",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__.split("\n\n")[1])
    sys.exit(main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])))
