#!/usr/bin/env bash
# Wheel check on the GPU machine (offline): build the natten_jax wheel (sm80 + sm90a kernels,
# every core, no build isolation), install it with pip into a fresh virtual environment (no
# build, no index), and run the GPU tests on it from a copy of tests/ outside the checkout, so
# that natten_jax is imported from the installed wheel (checked: the run fails if natten_jax
# comes from this checkout). Logs under $OUT; a one-line summary is printed last.
#
#   bash scripts/gpu_wheel_check.sh
#   PYTEST_SHARDS=4 bash scripts/gpu_wheel_check.sh
#
# Environment:
#   OUT                    where logs go (default /tmp/out): wheel_*.log, and the pytest
#                          reports and logs in $OUT/wheel_pytest/
#   PYTHON                 interpreter (default python3); the venv is created with
#                          --system-site-packages from it, so that its jax, flax, pytest and
#                          hypothesis are used (none is installed: the machine has no network)
#   NATTEN_JAX_CUDA_ARCHS  CUDA architectures of the wheel (default "80;90a")
#   NATTEN_JAX_CUDA_JOBS   parallel nvcc jobs (default: every core, $(nproc))
#   NATTEN_JAX_CUDA=OFF    test this script where there is no nvcc: a pure-Python wheel, and no
#                          check that the installed wheel has its compiled module
#   WHEEL=path             install and test this wheel instead of building one (relative to
#                          the checkout; a glob picks the newest match)
#   TESTS=0                build, install and check the import only (no pytest)
#   PYTEST_MARK            pytest -m expression (default "gpu"; empty: every test)
#   PYTEST_ARGS            extra pytest arguments, e.g. "-x -k window"
#   PYTEST_PATHS           test files or directories, relative to the checkout (default tests)
#   PYTEST_SHARDS=n        n pytest processes side by side (default 1; scripts/pytest_shards.sh)
#   PYTEST_LIMIT_S         time limit of each shard
#
# Wheels carried in .whl/ (scripts/fetch_wheels.sh: nvidia-cutlass, a build dependency) are
# installed to /tmp/site for the build only, as scripts/gpu_check.sh does. A build cut short
# resumes where it stopped on the next run (build/wheel-<wheel tag>/ keeps the objects), so the
# build and the tests can be two calls: TESTS=0, then WHEEL=dist/natten_jax-*.whl.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd -P)

OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd -P)
PY=${PYTHON:-python3}
MARK=${PYTEST_MARK-gpu}
export NATTEN_JAX_CUDA_ARCHS=${NATTEN_JAX_CUDA_ARCHS:-80;90a}
CUDA=${NATTEN_JAX_CUDA:-ON}
case ${CUDA^^} in
  ON) REQUIRE_MODULE=1 ;;
  OFF) REQUIRE_MODULE=0 ;;
  *) echo "gpu_wheel_check.sh: NATTEN_JAX_CUDA must be ON or OFF, got '$CUDA'" >&2; exit 2 ;;
esac
WORK=$(mktemp -d /tmp/natten_jax_wheel_check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

build="not run"; install="not run"; origin="not checked"; tests="not run"
summary() {
  local line="wheel check: build $build | install $install | natten_jax $origin | tests $tests"
  echo "$line" > "$OUT/wheel_summary.txt"
  echo
  echo "$line"
}
fail() {  # message: record it, print the summary, exit 1
  echo "== FAILED: $1" >&2
  summary
  exit 1
}

{
  echo "== $(date -u) on $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 || true
  "$PY" --version
  nvcc --version 2>&1 | tail -1 || true
  "$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__); print(jax.devices())" 2>&1 || true
} > "$OUT/wheel_env.log" 2>&1
cat "$OUT/wheel_env.log"

# ---- (1) build (or WHEEL=...)
if [ -n "${WHEEL:-}" ]; then
  # shellcheck disable=SC2086
  found=$(ls -td $WHEEL 2>/dev/null | head -1 || true)
  [ -n "$found" ] && [ -f "$found" ] || fail "WHEEL=$WHEEL: no such wheel"
  wheel=$(cd "$(dirname "$found")" && pwd -P)/$(basename "$found")
  build="skipped (WHEEL given)"
else
  build_env=()
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      > "$OUT/wheel_carried.log" 2>&1 || { cat "$OUT/wheel_carried.log"; fail "installing .whl/*.whl"; }
    build_env=(PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}")
  fi
  t0=$(date +%s)
  if env ${build_env[@]+"${build_env[@]}"} PYTHON="$PY" NATTEN_JAX_CUDA="$CUDA" \
       NATTEN_JAX_CUDA_JOBS="${NATTEN_JAX_CUDA_JOBS:-$(nproc)}" \
       CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
       bash scripts/build_wheel.sh --no-build-isolation > "$OUT/wheel_build.log" 2>&1; then
    wheel=$(tail -1 "$OUT/wheel_build.log")
    case $wheel in /*) ;; *) wheel="$REPO/$wheel" ;; esac
    build="ok ($(( $(date +%s) - t0 )) s, archs $NATTEN_JAX_CUDA_ARCHS, $(basename "$wheel"))"
    grep -E "^(== |  device code)" "$OUT/wheel_build.log" || true
  else
    tail -40 "$OUT/wheel_build.log"
    build="FAILED ($OUT/wheel_build.log)"
    fail "building the wheel"
  fi
  [ -f "$wheel" ] || fail "build_wheel.sh printed no wheel path (see $OUT/wheel_build.log)"
fi

# ---- (2) a fresh venv that sees $PY's packages, and the wheel installed into it with pip
VENV="$WORK/venv"
if ! "$PY" -m venv --system-site-packages "$VENV" > "$OUT/wheel_venv.log" 2>&1; then
  # No ensurepip (e.g. Debian without python3-venv): $PY's pip installs into the venv.
  rm -rf "$VENV"
  "$PY" -m venv --system-site-packages --without-pip "$VENV" >> "$OUT/wheel_venv.log" 2>&1 \
    || { cat "$OUT/wheel_venv.log"; install="FAILED (venv)"; fail "creating the venv"; }
fi
VPY="$VENV/bin/python"
# --system-site-packages reaches the base interpreter's site-packages only: list $PY's own site
# directories too (its user site, or its venv when $PY is in one), after the new venv's, so
# that the installed wheel comes first.
"$PY" - "$VPY" <<'EOF'
import os, site, subprocess, sys
vpy = sys.argv[1]
dirs = list(site.getsitepackages())
if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
    dirs.append(site.getusersitepackages())
purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
target = subprocess.run([vpy, "-c", purelib], capture_output=True, text=True,
                        check=True).stdout.strip()
with open(os.path.join(target, "_natten_jax_parent_env.pth"), "w") as f:
    f.write("\n".join(dirs) + "\n")
EOF
if env -u PYTHONPATH "$VPY" -m pip install --no-index --no-deps --force-reinstall --no-compile \
     "$wheel" > "$OUT/wheel_install.log" 2>&1; then
  install="ok"
else
  tail -20 "$OUT/wheel_install.log"
  install="FAILED ($OUT/wheel_install.log)"
  fail "pip install of the wheel"
fi

# ---- (3) tests/ copied outside the checkout, with the non-package directories the tests read
# (src/ headers, benchmarks/, examples/, scripts/) linked; natten_jax itself is not there.
TESTDIR="$WORK/t"
mkdir -p "$TESTDIR"
cp -r tests "$TESTDIR/tests"
find "$TESTDIR/tests" -name __pycache__ -prune -exec rm -rf {} +
cp pyproject.toml "$TESTDIR/"   # pytest's settings (markers)
for d in src benchmarks examples scripts; do
  [ -e "$d" ] && ln -s "$REPO/$d" "$TESTDIR/$d"
done
cd "$TESTDIR"
if ! env -u PYTHONPATH "$VPY" - "$REPO" "$VENV" "$REQUIRE_MODULE" "$NATTEN_JAX_CUDA_ARCHS" \
     > "$OUT/wheel_import.log" 2>&1 <<'EOF'
import os, sys
repo, venv = (os.path.realpath(p) for p in sys.argv[1:3])
require_module, archs = sys.argv[3] == "1", sys.argv[4]
import natten_jax
from natten_jax import _ffi
path = os.path.realpath(natten_jax.__file__)
print("natten_jax", natten_jax.__version__, "from", path)
print("module:", _ffi.module_available(), "archs:", _ffi.cuda_compiled_archs(),
      "kernels available:", _ffi.cuda_kernels_available(), _ffi.unavailable_reason())
if path.startswith(repo + os.sep) or not path.startswith(venv + os.sep):
    sys.exit(f"natten_jax is imported from {path}, not from the wheel installed in {venv}")
if require_module and not _ffi.module_available():
    sys.exit(f"the installed wheel has no working natten_jax._C: {_ffi.unavailable_reason()}")
if require_module and set(_ffi.cuda_compiled_archs()) != set(archs.split(";")):
    sys.exit(f"the installed module was built for {_ffi.cuda_compiled_archs()}, not {archs!r}")
print(f"from the wheel in {venv}: archs {_ffi.cuda_compiled_archs()}, kernels available "
      f"{_ffi.cuda_kernels_available()}")
EOF
then
  cat "$OUT/wheel_import.log"
  origin="FAILED ($(tail -1 "$OUT/wheel_import.log"))"
  fail "importing natten_jax from the installed wheel"
fi
cat "$OUT/wheel_import.log"
origin=$(tail -1 "$OUT/wheel_import.log")
if [ "${TESTS:-1}" = 0 ]; then
  tests="skipped (TESTS=0)"
  summary
  exit 0
fi

mark_args=()
[ -n "$MARK" ] && mark_args=(-m "$MARK")
t0=$(date +%s)
set +e
# shellcheck disable=SC2086
env -u PYTHONPATH PY="$VPY" OUT="$OUT/wheel_pytest" bash "$REPO/scripts/pytest_shards.sh" \
  ${mark_args[@]+"${mark_args[@]}"} ${PYTEST_ARGS:-} ${PYTEST_PATHS:-tests} | tee "$OUT/wheel_tests.log"
test_rc=${PIPESTATUS[0]}
set -e
counts=$(tail -1 "$OUT/wheel_tests.log")
passed=$(sed -n 's/^\([0-9][0-9]*\) passed,.*/\1/p' <<< "$counts")
tests="$counts in $(( $(date +%s) - t0 )) s (-m '$MARK' ${PYTEST_ARGS:-}, ${PYTEST_SHARDS:-1} shard(s))"
if [ "$test_rc" != 0 ]; then
  tests="FAILED (pytest exit $test_rc): $tests"
  fail "tests"
fi
if [ -z "$passed" ] || [ "$passed" = 0 ]; then
  tests="FAILED (nothing passed): $tests"
  fail "tests: nothing passed (no GPU visible to JAX?)"
fi
tests="ok: $tests"
summary
