#!/usr/bin/env bash
# Train the bundled demo checkpoint (DeepLabV3-MobileNetV3 on the NC Landsat sample) and ship it as
# data/models/nc_landsat_deeplabv3_mobilenetv3.pt (float16 weights) with its metrics JSON.
# About 15 minutes on a 2-core CPU. Usage: scripts/train_demo.sh [CONFIG] [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CONFIG=${1:-configs/train/nc_landsat.yaml}
RUN=${2:-runs/nc_landsat}
export PYTHONUNBUFFERED=1
"$PY" - "$CONFIG" "$RUN" <<'PYEOF'
import json, logging, shutil, sys
from pathlib import Path

from geoseg.config import TrainConfig, load_config
from geoseg.train import export_checkpoint, train

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
config, run = load_config(sys.argv[1], TrainConfig), Path(sys.argv[2])
result = train(config, out_dir=run, overwrite=True)
models = Path("data/models")
ckpt = export_checkpoint(result.best, models / "nc_landsat_deeplabv3_mobilenetv3.pt", half=True)
shutil.copyfile(result.metrics_file, models / "nc_landsat_deeplabv3_mobilenetv3.metrics.json")
print(f"{ckpt}: {ckpt.stat().st_size / 1e6:.1f} MB; test {json.dumps(result.test)}")
PYEOF
