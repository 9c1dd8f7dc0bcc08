#!/usr/bin/env bash
# Every GPU check of issue 15 in one command, printing the figures (about 5 minutes on an H100/H200):
# the end-to-end / model-only ratio of DeepLabV3-ResNet-50 in bf16 (bench/pipeline.py) and, given a
# Python that has geoai, geoseg and geoai side by side on DeepLabV3-ResNet-50 with the same weights
# (bench/peer.py; geoseg in bf16, geoai in float32, its default), batch 16 in both.
#
#   bench/gpu.sh                                          # CUDA, 4096² and 10000²
#   PEER_PYTHON=.tmp/peer-venv/bin/python bench/gpu.sh    # and the peer
#   DEVICE=cpu SIZES=1024 bench/gpu.sh                    # the same commands on the CPU, small
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
device=${DEVICE:-cuda}
read -r -a sizes <<<"${SIZES:-4096 10000}"
"$python" bench/pipeline.py --device "$device" --arch deeplabv3 --backbone resnet50 --tile 512 --batch 16 \
    --sizes "${sizes[@]}"
if [[ -n ${PEER_PYTHON:-} ]]; then
    "$python" bench/peer.py --device "$device" --peer-python "$PEER_PYTHON" --network deeplabv3_resnet50 \
        --batch 16 --sizes "${sizes[@]}" --big-block 0
fi
