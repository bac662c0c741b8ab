#!/usr/bin/env bash
# Prepare benchmarks/gpu_check.py for the borrowed GPU machine (no network, no nnU-Net imaging stack, 64 MiB per
# call): the wheels (.whl-a: SimpleITK, .whl-b: the rest, via shared/gpu/fetch_wheels.sh) and the left-atrium data
# (.gpu_data/data/Dataset010_LeftAtrium), all in ignored folders of the checkout. Then it prints the two runs.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${NNUNETV2_VF_SHARED:-../shared}
echo "fetching wheels for Python 3.12 (shared/gpu/fetch_wheels.sh) ..."
bash "$SHARED/gpu/fetch_wheels.sh"
rm -rf .gpu_data && mkdir -p .gpu_data/data
cp -r "$SHARED/data/Dataset010_LeftAtrium" .gpu_data/data/
du -sh .whl-a .whl-b .gpu_data
cat <<'RUNS'
On the GPU machine, two back-to-back runs (each under 64 MiB carried):
  1. carry [".whl-a"]:
       python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-a/*.whl
  2. carry [".whl-b", ".gpu_data"], timeout 600:
       python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-b/*.whl &&
       PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_check.py --shared .gpu_data --out $OUT --deadline-s 480
Then copy $OUT/gpu_check.{md,json} to benchmarks/results/ and give the machine back.
RUNS
