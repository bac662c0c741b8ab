#!/usr/bin/env bash
# Create ./.venv (if missing) and install the plugin with its dependencies. Idempotent.
# torch: timm (the 2D encoders) needs torchvision, and torchvision pins torch; 2.14.1 / 0.29.1 are the newest pair
# this workplace keeps on disk, so pin them for a reproducible install (the CUDA build also runs on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import nnunetv2_vf, nnunetv2, torch; print('nnunetv2-vf', nnunetv2_vf.__version__, '| torch', torch.__version__)"
