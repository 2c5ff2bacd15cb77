#!/usr/bin/env bash
# Downloads the wheels the offline GPU machine needs into .whl/ (git-ignored; carried there and
# installed by scripts/gpu_check.sh): nvidia-cutlass (CUTLASS/CuTe headers; a pure-Python wheel).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
  nvidia-cutlass==4.2.0.0
ls -la .whl
