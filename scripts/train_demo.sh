#!/usr/bin/env bash
# Train the shipped checkpoints and ship each (scripts/ship_model.py: checked against its per-pixel floor,
# bench/baseline.py) under data/models/ as float16 weights with the contract inside, plus its metrics JSON:
#   nc_landclass96_deeplabv3_mobilenetv3.pt  the demo model: NC Landsat 7, 6 bands, 7 classes, both scenes
#   zion_nlcd_unet_resnet18.pt               Zion Landsat 8, 4 bands, 8 NLCD classes
# Usage: scripts/train_demo.sh [nc|zion|all] (default all). About 38 (nc) and 29 (zion) min on a 2-core CPU.
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
declare -A stem=([nc_landclass96]=nc_landclass96_deeplabv3_mobilenetv3 [zion_nlcd]=zion_nlcd_unet_resnet18)
status=0
for name in "${names[@]}"; do
  "$PY" -m geoseg train --config "configs/train/$name.yaml" --out "runs/$name" --overwrite
  "$PY" scripts/ship_model.py "runs/$name" "configs/train/$name.yaml" "data/models/${stem[$name]}" || status=1
done
exit $status
