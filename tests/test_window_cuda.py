"""The device copy of the window math (src/cuda/include/natten_jax/window.cuh) vs window.py.

GPU tests run the ``natten_jax_window_bounds`` FFI target; CPU tests check the compiled module's
registrations (when it is built) and compile window.cuh with the host C++ compiler (when one is
installed), so that the header is checked against window.py on machines without a GPU too.
"""

import os
import shutil
import subprocess

import jax
import numpy as np
import pytest

from natten_jax import _ffi
from natten_jax.window import window_bounds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INCLUDE = os.path.join(REPO, "src", "cuda", "include")


def expected_bounds(shape, kernel_size, stride, dilation, is_causal):
    """int32 [*shape, rank, 2] from window.py."""
    rank = len(shape)
    coords = np.indices(shape)
    out = np.empty(tuple(shape) + (rank, 2), np.int32)
    for a in range(rank):
        start, end = window_bounds(coords[a], kernel_size[a], stride[a], dilation[a], shape[a],
                                   bool(is_causal[a]))
        out[..., a, 0] = start
        out[..., a, 1] = end
    return out


def random_axis(rng, max_extent):
    extent = int(rng.integers(1, max_extent + 1))
    dilation = int(rng.integers(1, min(4, extent) + 1))
    kernel = int(rng.integers(1, extent // dilation + 1))
    stride = int(rng.integers(1, kernel + 1))
    causal = bool(rng.integers(0, 2))
    return extent, kernel, stride, dilation, causal


def random_cases(seed, n):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        rank = 1 + i % 3
        max_extent = {1: 200, 2: 40, 3: 14}[rank]
        axes = [random_axis(rng, max_extent) for _ in range(rank)]
        cases.append(tuple(tuple(ax[j] for ax in axes) for j in range(5)))
    return cases


# (shape, kernel, stride, dilation, causal): odd and even kernels, strides, dilations whose groups
# differ in length (extent not a multiple of dilation), causal and not, kernel == extent.
FIXED_CASES = [
    ((10,), (3,), (1,), (1,), (False,)),
    ((10,), (3,), (2,), (1,), (False,)),
    ((10,), (3,), (1,), (1,), (True,)),
    ((10,), (4,), (3,), (2,), (False,)),
    ((11,), (4,), (4,), (2,), (True,)),
    ((64,), (64,), (1,), (1,), (False,)),
    ((101,), (8,), (5,), (3,), (False,)),
    ((17, 23), (5, 6), (2, 3), (2, 1), (True, False)),
    ((31, 29), (6, 4), (3, 2), (5, 7), (False, False)),
    ((9, 70), (9, 31), (1, 1), (1, 2), (False, True)),
    ((6, 10, 13), (3, 5, 4), (1, 2, 2), (2, 1, 3), (True, False, False)),
    ((5, 9, 20), (2, 3, 6), (2, 3, 1), (2, 3, 3), (False, True, True)),
    ((1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 1, 1), (True, True, True)),
]
RANDOM_CASES = random_cases(0, 60)


# ---------------------------------------------------------------------------------------------
# CPU


def test_registrations_expose_targets():
    if not _ffi.module_available():
        pytest.skip("natten_jax._C is not built (CUDA off)")
    regs = _ffi.registrations()
    assert "natten_jax_window_bounds" in regs
    for name, capsule in regs.items():
        assert name.startswith("natten_jax_")
        assert type(capsule).__name__ == "PyCapsule"
    assert _ffi._C.missing_targets() == []
    assert _ffi.cuda_compiled_archs(), "module reports no CUDA architectures"


def test_unavailable_reason_is_consistent():
    reason = _ffi.unavailable_reason()
    assert isinstance(reason, str)
    assert _ffi.cuda_kernels_available() == (reason == "")
    if not any(d.platform == "gpu" for d in jax.devices()):
        assert reason


@pytest.mark.parametrize("arch,cc,ok", [
    ("90a", (9, 0), True), ("90a", (8, 0), False), ("90a", (10, 0), False),
    ("80", (8, 0), True), ("80", (8, 6), True), ("80", (9, 0), True), ("80", (7, 5), False),
    ("80-real", (8, 6), True), ("80-real", (9, 0), False), ("90-virtual", (10, 0), True),
    ("100f", (10, 3), True), ("100f", (12, 0), False), ("bogus", (9, 0), False),
])
def test_arch_runs_on(arch, cc, ok):
    assert _ffi._arch_runs_on(arch, *cc) == ok


_HOST_PROGRAM = r"""
#include <cstdio>
#include "natten_jax/window.cuh"
int main() {
  int L, k, s, d, c;
  while (std::scanf("%d %d %d %d %d", &L, &k, &s, &d, &c) == 5) {
    for (int x = 0; x < L; ++x) {
      natten_jax::WindowBounds w = natten_jax::window_bounds(x, k, s, d, L, c != 0);
      std::printf("%d %d\n", w.start, w.end);
    }
  }
  return 0;
}
"""


def test_window_cuh_on_host_matches_window_py(tmp_path):
    """window.cuh is host-includable: compile it with the C++ compiler and compare on the CPU."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    src = tmp_path / "w.cc"
    src.write_text(_HOST_PROGRAM)
    exe = tmp_path / "w"
    subprocess.run([cxx, "-std=c++17", "-O1", "-I", INCLUDE, str(src), "-o", str(exe)],
                   check=True, capture_output=True)
    axes = []
    for shape, ks, st, dil, causal in FIXED_CASES + RANDOM_CASES:
        axes += list(zip(shape, ks, st, dil, causal))
    # Exhaustive small axes too: every valid (L, k, s, d, causal) with L <= 12.
    for L in range(1, 13):
        for d in range(1, L + 1):
            for k in range(1, L // d + 1):
                for s in range(1, k + 1):
                    axes += [(L, k, s, d, False), (L, k, s, d, True)]
    stdin = "".join(f"{L} {k} {s} {d} {int(c)}\n" for L, k, s, d, c in axes)
    res = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True)
    got = np.array(res.stdout.split(), np.int64).reshape(-1, 2)
    want = []
    for L, k, s, d, c in axes:
        start, end = window_bounds(np.arange(L), k, s, d, L, c)
        want.append(np.stack([start, end], -1))
    np.testing.assert_array_equal(got, np.concatenate(want))


# ---------------------------------------------------------------------------------------------
# GPU


def _require_kernels():
    if not _ffi.cuda_kernels_available():
        pytest.fail(f"CUDA kernels unavailable on a GPU machine: {_ffi.unavailable_reason()}")


@pytest.mark.gpu
@pytest.mark.parametrize("case", FIXED_CASES + RANDOM_CASES,
                         ids=[str(i) for i in range(len(FIXED_CASES + RANDOM_CASES))])
def test_window_bounds_cuda_matches_window_py(case):
    _require_kernels()
    shape, ks, st, dil, causal = case
    got = np.asarray(_ffi.window_bounds_cuda(shape, ks, st, dil, causal))
    assert got.dtype == np.int32 and got.shape == tuple(shape) + (len(shape), 2)
    np.testing.assert_array_equal(got, expected_bounds(shape, ks, st, dil, causal))


@pytest.mark.gpu
def test_window_bounds_cuda_under_jit():
    _require_kernels()
    for shape, ks, st, dil, causal in FIXED_CASES[7:] + RANDOM_CASES[:9]:
        f = jax.jit(lambda: _ffi.window_bounds_cuda(shape, ks, st, dil, causal))
        np.testing.assert_array_equal(np.asarray(f()),
                                      expected_bounds(shape, ks, st, dil, causal))


@pytest.mark.gpu
def test_window_bounds_cuda_scalar_arguments():
    _require_kernels()
    got = np.asarray(_ffi.window_bounds_cuda((12, 9), 3, 2, 2, True))
    np.testing.assert_array_equal(got, expected_bounds((12, 9), (3, 3), (2, 2), (2, 2),
                                                       (True, True)))


@pytest.mark.gpu
def test_window_bounds_cuda_large():
    _require_kernels()
    shape, ks, st, dil, causal = (3, 700, 500), (3, 31, 16), (1, 7, 16), (1, 3, 2), (True, False,
                                                                                      False)
    got = np.asarray(_ffi.window_bounds_cuda(shape, ks, st, dil, causal))
    np.testing.assert_array_equal(got, expected_bounds(shape, ks, st, dil, causal))


@pytest.mark.gpu
@pytest.mark.parametrize("bad", [
    dict(kernel_size=(11,), stride=(1,), dilation=(1,), is_causal=(0,)),  # kernel > extent
    dict(kernel_size=(3,), stride=(4,), dilation=(1,), is_causal=(0,)),   # stride > kernel
    dict(kernel_size=(3,), stride=(1,), dilation=(4,), is_causal=(0,)),   # k * d > extent
    dict(kernel_size=(0,), stride=(1,), dilation=(1,), is_causal=(0,)),   # kernel 0
])
def test_window_bounds_cuda_invalid_arguments_raise(bad):
    """The handler returns InvalidArgument (raised in Python); the process survives."""
    _require_kernels()
    with pytest.raises(Exception, match="natten_jax"):
        np.asarray(_ffi.window_bounds_cuda((10,), **bad))
    # and the device is still usable afterwards
    np.testing.assert_array_equal(np.asarray(_ffi.window_bounds_cuda((10,), 3)),
                                  expected_bounds((10,), (3,), (1,), (1,), (False,)))
