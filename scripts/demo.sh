#!/usr/bin/env bash
# Set up (./.venv) and run the built-in demo: Volume Fusion pretraining + PCT-Net fine-tuning vs scratch on 40
# bundled hippocampus MRI cases. Extra arguments go to nnUNetv2_vf_demo (e.g. --quick, --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
nnUNetv2_vf_demo "$@"
