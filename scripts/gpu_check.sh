#!/usr/bin/env bash
# GPU check: build natten_jax with its CUDA kernels on the GPU machine (offline), run the GPU
# tests, optionally the benchmarks; logs under $OUT, a summary table printed last.
#
#   bash scripts/gpu_check.sh
#
# Environment:
#   OUT                    where logs go (default /tmp/out)
#   NATTEN_JAX_CUDA_ARCHS  CUDA architectures to build (default "90a")
#   PYTEST_MARK            pytest -m expression (default "gpu"; empty: every test)
#   PYTEST_ARGS            extra pytest arguments, e.g. "-x -k window"
#   PYTEST_SHARDS=n        n pytest processes side by side (default 1)
#   PYTEST_LIMIT_S         time limit of each shard (exit 124 when it runs out)
#   TESTS=0                build (and bench) only
#   BENCH=1                also run `python3 -m benchmarks.bench_na $BENCH_ARGS --out $OUT/bench.json`
#   BENCH_ARGS             default "--fwd-only --backends fused --peers cudnn --time-limit-s 240"
#   SKIP_BUILD=1           reuse the module built by an earlier run
#
# Wheels carried in .whl/ (scripts/fetch_wheels.sh: nvidia-cutlass) are installed to /tmp/site
# first, since the machine has no network. The module is built with pip (no build isolation) into
# /tmp/nj_site and copied next to the sources (natten_jax/_C*.so, git-ignored) so that the tests
# run on this checkout.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
ARCHS=${NATTEN_JAX_CUDA_ARCHS:-90a}
MARK=${PYTEST_MARK-gpu}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

{
  echo "== $(date -u) on $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 || true
  "$PY" --version
  nvcc --version 2>&1 | tail -1
  "$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__); print(jax.devices())" 2>&1
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log"

# ---- (1) carried wheels
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    > "$OUT/wheels.log" 2>&1 || { echo "installing .whl/*.whl failed"; cat "$OUT/wheels.log"; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---- (2) build
build_status=skipped
build_time=-
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  rm -rf /tmp/nj_site natten_jax/_C*.so
  export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
  t0=$(now)
  if NATTEN_JAX_CUDA=ON NATTEN_JAX_CUDA_ARCHS="$ARCHS" \
       "$PY" -m pip install -v --no-build-isolation --no-deps --no-compile --target /tmp/nj_site . \
       > "$OUT/build.log" 2>&1; then
    build_status=ok
    cp /tmp/nj_site/natten_jax/_C*.so natten_jax/
  else
    build_status=FAILED
    grep -E "error|FAILED" "$OUT/build.log" | head -40
  fi
  build_time=$(elapsed "$t0" "$(now)")
  grep -E "^ *-- natten_jax:" "$OUT/build.log" | sed 's/^ *//'
  # slowest compile steps (Ninja log of the build dir pip used)
  for log in build/*/.ninja_log; do
    [ -f "$log" ] && awk 'NR > 1 { printf "%7.1f s  %s\n", ($2 - $1) / 1000, $4 }' "$log" |
      sort -rn | head -15 > "$OUT/build_steps.txt"
  done
  [ -f "$OUT/build_steps.txt" ] && { echo "slowest build steps:"; head -5 "$OUT/build_steps.txt"; }
fi
"$PY" -c "from natten_jax import _ffi; print('module:', _ffi.module_available(), sorted(_ffi.registrations()), _ffi.cuda_compiled_archs()); print('kernels available:', _ffi.cuda_kernels_available(), _ffi.unavailable_reason())" \
  2>&1 | tee "$OUT/module.log"

# ---- (3) tests: PYTEST_SHARDS=n runs n pytest processes side by side (scripts/pytest_shards.sh;
# tests/conftest.py takes every n-th test), each with on-demand GPU memory; TESTS=0 skips this.
mark_args=()
[ -n "$MARK" ] && mark_args=(-m "$MARK")
t0=$(now)
test_rc=0
test_counts="not run"
if [ "${TESTS:-1}" = 0 ]; then
  test_rc=skipped
else
  # shellcheck disable=SC2086
  PY="$PY" OUT="$OUT" bash scripts/pytest_shards.sh ${mark_args[@]+"${mark_args[@]}"} \
    ${PYTEST_ARGS:-} > "$OUT/shards.log" 2>&1
  test_rc=$?
  tail -40 "$OUT/shards.log" | head -39
  test_counts=$(tail -1 "$OUT/shards.log")
fi
test_time=$(elapsed "$t0" "$(now)")
SHARDS=${PYTEST_SHARDS:-1}
case $test_rc in
  0) test_status=ok ;;
  skipped) test_status="skipped (TESTS=0)" ;;
  5) test_status="NO TESTS RAN (pytest exit 5)" ;;
  *) test_status="FAILED (pytest exit $test_rc)" ;;
esac

# ---- (4) benchmarks
bench_status="not requested (BENCH=1)"
if [ "${BENCH:-0}" = 1 ]; then
  if [ -f benchmarks/bench_na.py ]; then
    t0=$(now)
    # shellcheck disable=SC2086
    if "$PY" -m benchmarks.bench_na ${BENCH_ARGS:---fwd-only --backends fused --peers cudnn --time-limit-s 240} \
         --out "$OUT/bench.json" > "$OUT/bench.log" 2>&1; then
      bench_status="done in $(elapsed "$t0" "$(now)") s -> $OUT/bench.json"
    else
      bench_status="FAILED (see $OUT/bench.log)"
      tail -20 "$OUT/bench.log"
    fi
  else
    bench_status="skipped: no benchmarks/bench_na.py"
  fi
fi

# ---- (5) summary (last): the benchmark table, then the status lines
[ -f "$OUT/bench.log" ] && grep -E '^\|' "$OUT/bench.log" | cut -c1-110
{
  echo
  echo "================ natten_jax GPU check summary ================"
  printf "%-8s %s\n" "build" "$build_status (${build_time} s, archs $ARCHS)"
  printf "%-8s %s\n" "tests" "$test_status: $test_counts in ${test_time} s (-m '${MARK}' ${PYTEST_ARGS:-}, $SHARDS shard(s))"
  printf "%-8s %s\n" "bench" "$bench_status"
  printf "%-8s %s\n" "logs" "$OUT"
} | tee "$OUT/summary.txt"

[ "$build_status" != FAILED ] && { [ "$test_rc" = 0 ] || [ "$test_rc" = skipped ]; } && [[ "$bench_status" != FAILED* ]]
