#!/usr/bin/env bash
# Sets up natten_jax (scripts/setup.sh) and runs the demo: neighborhood attention on a 2-D
# problem with the fastest backend here (our CUDA kernels on a GPU, the reference elsewhere),
# checked against the reference and timed.
#
#   bash scripts/demo.sh [--problem 2d_gen] [--backend fused|reference]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
"$PY" -m benchmarks.demo "$@"
