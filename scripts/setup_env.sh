#!/usr/bin/env bash
# Create ./.venv (if missing) and install the plugin with its dependencies. Idempotent.
# torch: timm (the 2D encoders) needs torchvision, and torchvision pins torch; 2.14.1 / 0.29.1 are the newest pair
# this workplace keeps on disk, so pin them for a reproducible install (the CUDA build also runs on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# pip -q still prints two harmless notices: "WARNING: Location ..." lines, and setuptools' BuildBackendWarning box
# about editable installs (a dozen lines starting with the warning, framed by "!!", then the source line). Drop
# those; everything else (errors included) is shown, and a failing pip still stops the script (pipefail).
quiet_pip() {
    python -m pip install -q "$@" 2>&1 | awk '
        /^WARNING: Location/ { next }
        /BuildBackendWarning/ { skip = 1; bangs = 0; n = 0; next }
        skip == 2 { skip = 0; if ($0 ~ /^[[:space:]]/) next }
        skip == 1 {
            if ($0 ~ /^[[:space:]]*!![[:space:]]*$/ && ++bangs == 2) skip = 2
            else if (++n > 15) { skip = 0; print }
            next
        }
        { print }'
}

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating ./.venv with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
echo "setup: installing into ./.venv: torch 2.14.1 + torchvision 0.29.1, nnU-Net 2.8 and this plugin (about 3 min" \
     "the first time on 2 CPU cores, quiet while pip works; less than a minute when already installed)"
quiet_pip --upgrade pip
quiet_pip "torch==2.14.1" "torchvision==0.29.1"
quiet_pip -e ".[test]"
python -c "import importlib.metadata as m, nnunetv2_vf, torch; print('setup: done: nnunetv2-vf', nnunetv2_vf.__version__, '| nnunetv2', m.version('nnunetv2'), '| torch', torch.__version__)"
