#!/usr/bin/env bash
# Train the shipped checkpoints, each checked against its per-pixel floor (bench/baseline.py), and ship
# them under data/models/ (float16 weights, contract inside) with their metrics JSON:
#   nc_landclass96_deeplabv3_mobilenetv3.pt  the demo model: NC Landsat 7, 6 bands, 7 classes, both scenes
#   zion_nlcd_deeplabv3_mobilenetv3.pt       Zion Landsat 8, 4 bands, 8 NLCD classes
# Usage: scripts/train_demo.sh [nc|zion|all] (default all); each takes about 40 min on a 2-core CPU.
# Exits non-zero when a model does not beat its floor by 0.05 macro mIoU and 3 points of pixel accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONUNBUFFERED=1
export PREFECT_HOME=${PREFECT_HOME:-$PWD/.tmp/prefect} DASK_TEMPORARY_DIRECTORY=${DASK_TEMPORARY_DIRECTORY:-$PWD/.tmp/dask}
case "${1:-all}" in
  nc) names=(nc_landclass96) ;;
  zion) names=(zion_nlcd) ;;
  all) names=(nc_landclass96 zion_nlcd) ;;
  *) echo "usage: $0 [nc|zion|all]" >&2; exit 2 ;;
esac
status=0
for name in "${names[@]}"; do
  "$PY" - "configs/train/$name.yaml" "runs/$name" "data/models/${name}_deeplabv3_mobilenetv3" <<'PYEOF' || status=1
import json, logging, shutil, subprocess, sys
from pathlib import Path

from geoseg.config import TrainConfig, load_config
from geoseg.train import export_checkpoint, train

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
config_path, run, stem = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
floor = json.loads(subprocess.run([sys.executable, "bench/baseline.py", config_path], check=True,
                                  capture_output=True, text=True).stdout)
result = train(load_config(config_path, TrainConfig), out_dir=run, overwrite=True)
ckpt = export_checkpoint(result.best, stem.with_suffix(".pt"), half=True)
report = json.loads(result.metrics_file.read_text())
report["baseline"] = floor
stem.with_suffix(".metrics.json").write_text(json.dumps(report, indent=1) + "\n")
m, f = result.test, floor["test"]
gain, points = m["miou_macro"] - f["miou_macro"], 100 * (m["pixel_accuracy"] - f["pixel_accuracy"])
print(f"{ckpt}: {ckpt.stat().st_size / 1e6:.1f} MB, trained {result.seconds / 60:.1f} min on {result.device}; "
      f"test mIoU {m['miou_macro']:.3f} (forest {f['miou_macro']:.3f}, {gain:+.3f}), pixel accuracy "
      f"{m['pixel_accuracy']:.3f} (forest {f['pixel_accuracy']:.3f}, {points:+.1f} points)")
sys.exit(0 if gain >= 0.05 and points >= 3 else "below the floor's bar (+0.05 mIoU, +3 points)")
PYEOF
done
exit $status
