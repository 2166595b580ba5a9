#!/usr/bin/env bash
# The GPU checks and the GPU bench in one command (issue 12, point 3), for the lent H200:
# no network there, Python 3.12 with a CUDA build of torch; what this repository needs beyond
# that travels in .gpu/ (make gpu-pack, here). From the device tool, in the repository root:
#
#     run(command="bash bench/gpu.sh", carry=[".gpu"], timeout_s=540)
#
# Writes $OUT/gpu.json (checks and figures) and $OUT/serving-gpu-<engine>.json (bench/serving.py
# on CUDA); bench/results/ where OUT is unset. At most 8 minutes (GPU_TIMEOUT seconds, 470).
# Here, without a GPU, `bash bench/gpu.sh` runs the same steps and reports CUDA as skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results}
if [ ! -d .gpu/batches ]; then
  echo "bench/gpu.sh: .gpu/ is missing: run 'make gpu-pack' first and carry .gpu" >&2
  exit 2
fi
site=$(mktemp -d)
if "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  # the wheels are CPython 3.12's (the device's Python); elsewhere this Python's own packages
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --disable-pip-version-check --target "$site" .gpu/wheels/*.whl
fi
export PYTHONPATH="$site:$PWD/.gpu/python:$PWD/service:$PWD/model_store${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
timeout "${GPU_TIMEOUT:-470}" "$PY" bench/gpu.py --out "$OUT" "$@"
