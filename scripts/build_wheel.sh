#!/usr/bin/env bash
# Build a wheel of natten_jax with its fused CUDA kernels compiled for sm80 and sm90a.
#
# Usage:
#   bash scripts/build_wheel.sh                        # pip fetches the build dependencies
#   bash scripts/build_wheel.sh --no-build-isolation   # offline: build with this environment
#   pip install dist/natten_jax-*.whl                  # no compiler needed to install it
#
# The wheel goes into dist/ (git-ignored); its path is the last line printed. Building needs
# nvcc (CUDA 13) and, besides pip, what pyproject.toml's [build-system] lists: scikit-build-core,
# nanobind, jax and jaxlib (their XLA FFI headers), nvidia-cutlass (CUTLASS headers), plus cmake
# and ninja. With build isolation (the default) pip downloads those into a temporary
# environment; with --no-build-isolation they must already be installed in $PYTHON's
# environment (checked first; `bash scripts/fetch_wheels.sh` fetches nvidia-cutlass for a
# machine without network).
#
# Running the wheel needs:
#   - Linux x86_64 and the CPython version the wheel was built with (its tag, e.g. cp312);
#   - an NVIDIA GPU of compute capability 8.0 (sm80 kernels: A100; other 8.x GPUs load the sm80
#     code but are untested) or 9.0 (sm90a kernels: H100, H200);
#   - an NVIDIA driver recent enough for CUDA 13 (R580 or newer). The CUDA runtime is linked
#     statically into natten_jax/_C*.so: no CUDA toolkit is needed where the wheel is installed;
#   - jax with its CUDA plugin (e.g. pip install "jax[cuda13]"), jax >= 0.10. The kernels are
#     XLA FFI handlers compiled against the XLA FFI headers of the build environment's jaxlib:
#     run the wheel with that jax version (or a newer one). An isolated build takes the newest
#     jaxlib from the index; to match an installed jax, build with --no-build-isolation in the
#     environment that will run it;
#   - flax, for the natten_jax.nnx / natten_jax.linen layers and the models
#     (pip install "natten_jax[flax]").
# Without a GPU the wheel still works: natten_jax runs its pure-JAX reference backend.
#
# Options and environment:
#   --no-build-isolation       build with the current environment
#                              (or NATTEN_JAX_BUILD_ISOLATION=0)
#   PYTHON                     interpreter whose pip builds the wheel (default python3)
#   NATTEN_JAX_CUDA            ON (default here) | OFF: OFF builds a pure-Python wheel (reference
#                              backend only), in seconds, for testing this script
#   NATTEN_JAX_CUDA_ARCHS      CUDA architectures (default "80;90a")
#   NATTEN_JAX_CUDA_JOBS       parallel nvcc jobs (default: from cores and memory, see
#                              CMakeLists.txt)
#   DIST                       output directory (default dist)
# The build directory is build/wheel-<wheel tag>/ (separate from the development build, which
# may have been configured for other architectures). After building, the script lists the
# wheel's contents and, for a CUDA wheel, checks with cuobjdump (when on PATH) that every
# requested architecture's code is in the module.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
ISOLATION=${NATTEN_JAX_BUILD_ISOLATION:-1}
for arg in "$@"; do
  case $arg in
    --no-build-isolation) ISOLATION=0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build_wheel.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done
case $ISOLATION in
  0|1) ;;
  *) echo "build_wheel.sh: NATTEN_JAX_BUILD_ISOLATION must be 0 or 1, got '$ISOLATION'" >&2
     exit 2 ;;
esac
export NATTEN_JAX_CUDA=${NATTEN_JAX_CUDA:-ON}
export NATTEN_JAX_CUDA_ARCHS=${NATTEN_JAX_CUDA_ARCHS:-80;90a}
export SKBUILD_BUILD_DIR="build/wheel-{wheel_tag}"
DIST=${DIST:-dist}
cuda_on=0
case ${NATTEN_JAX_CUDA^^} in
  ON|1|TRUE|YES|Y) cuda_on=1 ;;
  OFF|0|FALSE|NO|N) ;;
  *) echo "build_wheel.sh: NATTEN_JAX_CUDA must be ON or OFF, got '$NATTEN_JAX_CUDA'" >&2
     exit 2 ;;
esac

pip_args=(wheel . --no-deps -v)
if [ "$ISOLATION" = 0 ]; then
  pip_args+=(--no-build-isolation)
  # Fail early, naming what is missing, rather than deep inside CMake.
  "$PY" - "$cuda_on" <<'EOF'
import importlib.util, shutil, sys
cuda = sys.argv[1] == "1"
need = {"scikit_build_core": "scikit-build-core", "nanobind": "nanobind"}
if cuda:
    need.update({"jax": "jax", "jaxlib": "jaxlib", "cutlass_library": "nvidia-cutlass"})
missing = [pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None]
tools = [t for t in ("cmake", "ninja") if shutil.which(t) is None
         and importlib.util.find_spec(t) is None]
if missing or tools:
    sys.exit(f"build_wheel.sh --no-build-isolation: {sys.executable} lacks "
             f"{', '.join(missing + tools)}: pip install {' '.join(missing + tools)} (or build "
             f"with isolation, which downloads them)")
EOF
fi

echo "== building the natten_jax wheel: NATTEN_JAX_CUDA=$NATTEN_JAX_CUDA," \
     "archs $NATTEN_JAX_CUDA_ARCHS, build isolation $([ "$ISOLATION" = 1 ] && echo on || echo off)," \
     "$("$PY" --version 2>&1)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p build "$DIST"
log=build/wheel-build.log
t0=$(date +%s)
if ! "$PY" -m pip "${pip_args[@]}" -w "$tmp" > "$log" 2>&1; then
  grep -E "error|Error|FAILED" "$log" | head -40 || true
  tail -30 "$log"
  echo "== wheel build FAILED (full log: $log)" >&2
  exit 1
fi
grep -E "^ *-- natten_jax:" "$log" | sed 's/^ *//' || true
wheels=("$tmp"/natten_jax-*.whl)
if [ ${#wheels[@]} != 1 ] || [ ! -f "${wheels[0]}" ]; then
  echo "== expected one natten_jax wheel, pip wrote: $(ls "$tmp")" >&2
  exit 1
fi
wheel="$DIST/$(basename "${wheels[0]}")"
mv -f "${wheels[0]}" "$wheel"
echo "== built in $(( $(date +%s) - t0 )) s (log: $log)"

# Contents: the package, the layers and models, and (CUDA) the extension module.
"$PY" - "$wheel" "$cuda_on" "$NATTEN_JAX_CUDA_ARCHS" "$tmp" <<'EOF'
import os, re, shutil, subprocess, sys, zipfile
wheel, cuda, archs, tmp = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4]
with zipfile.ZipFile(wheel) as z:
    infos = z.infolist()
    names = [i.filename for i in infos]
    for i in infos:
        print(f"  {i.file_size:>11,d}  {i.filename}")
    required = ["natten_jax/__init__.py", "natten_jax/functional.py", "natten_jax/nnx.py",
                "natten_jax/linen.py", "natten_jax/models/__init__.py",
                "natten_jax/backends/fused.py"]
    problems = [f"missing {r}" for r in required if r not in names]
    problems += [f"unexpected {n}" for n in names
                 if not n.startswith(("natten_jax/", "natten_jax-"))]
    modules = [n for n in names if re.fullmatch(r"natten_jax/_C[^/]*\.so", n)]
    if cuda and len(modules) != 1:
        problems.append(f"expected one natten_jax/_C*.so, found {modules}")
    if not cuda and modules:
        problems.append(f"NATTEN_JAX_CUDA=OFF but the wheel has {modules}")
    if cuda and len(modules) == 1:
        so = z.extract(modules[0], tmp)
if problems:
    sys.exit("wheel check FAILED: " + "; ".join(problems))
if cuda:
    nvcc = shutil.which("nvcc")
    cuobjdump = next((c for c in (shutil.which("cuobjdump"),
                                  nvcc and os.path.join(os.path.dirname(nvcc), "cuobjdump"),
                                  "/usr/local/cuda/bin/cuobjdump")
                      if c and os.path.isfile(c)), None)
    if cuobjdump is None:
        print("  (no cuobjdump: the device code in the module is not checked)")
    else:
        r = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"wheel check FAILED: cuobjdump --list-elf {so}: {r.stderr.strip()}")
        found = set(re.findall(r"sm_\d+[af]?", r.stdout))
        want = {"sm_" + a.split("-")[0] for a in archs.split(";") if a and
                not a.endswith("-virtual")}
        print(f"  device code in {os.path.basename(so)}: {sorted(found)}")
        if not want <= found:
            sys.exit(f"wheel check FAILED: no device code for {sorted(want - found)} "
                     f"(asked for NATTEN_JAX_CUDA_ARCHS={archs!r})")
print("== wheel check ok")
EOF
echo "$wheel"
