#!/usr/bin/env bash
# The wheels the GPU suite needs on the lent GPU machine (Python 3.12 and torch preinstalled, no
# registry), fetched here into DIR: those of shared/gpu/wheels.sh, plus cffi, which soundfile
# loads libsndfile through and which that machine's image lacks. Carry DIR there and install it
# with `pip install --no-index --no-deps --target /tmp/site DIR/*.whl` (BENCHMARKS.md, "The GPU
# suite"). What the suite may and may not need there: bench/gpu_suite/device_machine.py.
#
#   bash bench/gpu_suite/wheels.sh [DIR]        # SHARED_DIR: where shared/ is (default ../shared)
set -euo pipefail
dest=${1:-.whl}
repo=$(cd "$(dirname "$0")/../.." && pwd)
shared=${SHARED_DIR:-$repo/../shared}
bash "$shared/gpu/wheels.sh" "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" cffi==2.1.1 \
  2>&1 | grep -v '^WARNING' || true
ls "$dest"/cffi-2.1.1-*.whl >/dev/null
