#!/usr/bin/env bash
# The README's test command (and CI's): set up, then run the whole test suite.
# Extra arguments go to pytest, e.g. `bash launch/test.sh -m "not slow"` for the fast subset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
