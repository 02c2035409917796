#!/usr/bin/env bash
# Set up a fresh machine: create .venv if absent and install psa-dist with its extras.
# Idempotent: a second run only checks that everything is there. Used by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.psa-dist-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing torch, torchvision and psa-dist (first run: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned: these are the builds that resolve on the project's machines (CPU-only
  # torch has no working torchvision here). On another machine any torch>=2.1 works.
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
  .venv/bin/python -m pip install -q -e ".[test,crf,coco]"
  touch "$stamp"
fi
