#!/usr/bin/env bash
# The README's main command: set up, then run the whole pipeline on the embedded synthetic dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/psa-dist run configs/demo.yaml "$@"
