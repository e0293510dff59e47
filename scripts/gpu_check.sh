#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py says what it measures): on the GPU machine, from the
# repository root, with the machine's own python3 and the kit in wheels/ (make smoke-wheels):
#     bash scripts/gpu_check.sh              # results in $OUT/gpu_check.json
#     bash scripts/gpu_check.sh --dry-run    # the same code on a CPU at micro shapes
# PYTHON picks another interpreter (make gpu-rehearsal uses the image-like virtualenv's).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
