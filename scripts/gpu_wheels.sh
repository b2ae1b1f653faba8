#!/usr/bin/env bash
# Wheels of the packages a stock GPU image (Python 3.12, with torch, timm, torchvision and Triton) lacks for
# scripts/gpu_check.py, into .whl/ (git-ignored): hydra-core and omegaconf (train.py, eval.py), fvcore (FLOPs),
# fastervit (the FasterViT-0 peer), and what they need beyond that image. Pure-Python packages published only as
# sdists are built into wheels here. On the GPU machine, without network:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   python3 scripts/gpu_check.py
set -euo pipefail
PY=${PYTHON:-python3}
DEST=${1:-.whl}
PYVER=${GPU_PYTHON_VERSION:-3.12}
mkdir -p "$DEST"
BINARY=(hydra-core==1.3.8 omegaconf==2.3.1 fastervit==1.0.0 iopath==0.1.9 yacs==0.1.8 termcolor==3.3.0)
SDIST_ONLY=(antlr4-python3-runtime==4.9.3 fvcore==0.1.5.post20221221)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${BINARY[@]}"
"$PY" -m pip wheel -q --no-deps -w "$DEST" "${SDIST_ONLY[@]}"
ls "$DEST"
