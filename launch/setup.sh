#!/usr/bin/env bash
# Set up a fresh machine: create .venv if absent and install psa-dist with its extras.
# Idempotent: a second run only checks that everything is there. Used by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# A C compiler: the random walk's and the AffinityNet loss's kernels (psa_dist/csrc) are built with
# it on first use (without one they fall back to slower torch ops); pydensecrf2 may build with it.
if ! command -v "${CC:-cc}" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing a C compiler (build-essential)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q build-essential >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q build-essential >/dev/null; }
  else
    echo "[setup] warning: no C compiler (${CC:-cc}); install one (e.g. build-essential) for the fast kernels" >&2
  fi
fi
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
  .venv/bin/python -m pip install -q -e ".[test,crf,coco,tensorboard]"
  touch "$stamp"
fi
