#!/usr/bin/env bash
# Builds natten_jax into a virtual environment and runs the test suite (CPU tests; GPU tests skip
# themselves without a GPU). Environment switches: see scripts/setup.sh.
#
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

echo "== pytest"
set +e
"$PY" -m pytest -q "$@"
rc=$?
set -e
t3=$(now)
echo "== timings: deps $((t1 - t0)) s, build+install $((t2 - t1)) s, tests $((t3 - t2)) s," \
     "total $((t3 - t0)) s; pytest exit code $rc"
exit $rc
