#!/usr/bin/env bash
# Set up (./.venv) and run the whole test suite, end-to-end nnU-Net console-script tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
echo "tests: unit tests and end-to-end nnU-Net console-script tests on real data (about 30 min on 2 CPU cores; docs/testing.md)"
python -m pytest tests -q -p no:cacheprovider --durations=15
