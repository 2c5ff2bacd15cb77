"""The device window math and neighborhood policy (src/cuda/include/natten_jax/window.cuh and
neighborhood.cuh) vs window.py.

Per token and axis the device answers eight fields (natten_jax/kernels/window_bounds.h): the
token's window, the inverse neighborhood of the token as a key, and the union and intersection
of the windows of the query tile that holds it. GPU tests run the ``natten_jax_window_bounds``
FFI target; CPU tests check the compiled module's registrations (when it is built) and compile
both headers with the host C++ compiler (when one is installed), so that they are checked
against window.py on machines without a GPU too.
"""

import subprocess

import jax
import numpy as np
import pytest

import host_cxx
from natten_jax import _ffi
from natten_jax import window as W


def expected_axis(x, L, k, s, d, c, tile_log2):
    """int [len(x), 8] from window.py: the fields of the tokens at coordinates x of one axis."""
    x = np.asarray(x)
    i = x // d
    Lg = W.group_extent(L, d, x % d)
    first = (i >> tile_log2) << tile_log2  # the query tile holding i, clipped to the group
    last = np.minimum(first + (1 << tile_log2), Lg) - 1
    fields = (W.window_bounds(x, k, s, d, L, c) + W.inverse_window(i, i, k, s, Lg, c)
              + W.tile_union(first, last, k, s, Lg, c)
              + W.tile_intersection(first, last, k, s, Lg, c))
    return np.stack([np.broadcast_to(f, x.shape) for f in fields], -1)


def expected_fields(shape, kernel_size, stride, dilation, is_causal, tile_log2=0):
    """int32 [*shape, rank, 8] from window.py."""
    rank = len(shape)
    tile_log2 = (tile_log2,) * rank if np.ndim(tile_log2) == 0 else tuple(tile_log2)
    coords = np.indices(shape)
    out = np.empty(tuple(shape) + (rank, 8), np.int32)
    for a in range(rank):
        out[..., a, :] = expected_axis(coords[a], shape[a], kernel_size[a], stride[a],
                                       dilation[a], bool(is_causal[a]), tile_log2[a])
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
#include "natten_jax/neighborhood.cuh"
// Reads axes "L k s d causal tile_log2"; prints the 8 fields of every token of a 1-D problem
// (leading axes padded as the kernels pad them), as the device test target computes them.
int main() {
  int L, k, s, d, c, l;
  while (std::scanf("%d %d %d %d %d %d", &L, &k, &s, &d, &c, &l) == 6) {
    const int extent[3] = {1, 1, L}, kernel[3] = {1, 1, k}, stride[3] = {1, 1, s};
    const int dilation[3] = {1, 1, d}, causal[3] = {0, 0, c};
    for (int x = 0; x < L; ++x) {
      const int xs[3] = {0, 0, x};
      int i[3];
      const natten_jax::Neighborhood n =
          natten_jax::Neighborhood::of_token(extent, kernel, stride, dilation, causal, xs, i);
      const natten_jax::WindowBounds w = natten_jax::window_bounds(x, k, s, d, L, c != 0);
      const int first = (i[2] >> l) << l, last = n.tile_last(2, first, l);
      const natten_jax::Interval f[3] = {n.inverse(2, i[2], i[2]), n.window_union(2, first, last),
                                         n.window_intersection(2, first, last)};
      if (n.start(2, i[2]) != w.start || n.end(2, i[2]) != w.end || n.coord(2, i[2]) != x)
        std::printf("policy and window.cuh disagree\n");
      // The fused kernels' Neighborhood (FastDiv divisors) answers the same.
      const natten_jax::FastDiv fs[3] = {natten_jax::FastDiv(1), natten_jax::FastDiv(1),
                                         natten_jax::FastDiv(s)};
      const natten_jax::FastDiv fd[3] = {natten_jax::FastDiv(1), natten_jax::FastDiv(1),
                                         natten_jax::FastDiv(d)};
      int fi[3];
      const auto m = natten_jax::BasicNeighborhood<natten_jax::FastDiv>::of_token(
          extent, kernel, fs, fd, causal, xs, fi);
      const natten_jax::Neighborhood ng(extent, kernel, stride, dilation, causal, x % d);
      const natten_jax::BasicNeighborhood<natten_jax::FastDiv> mg(extent, kernel, fs, fd, causal,
                                                                  x % d);
      const int cnt[3] = {2, 3, L}, ls[3] = {0, 1, 2};
      const natten_jax::FastDiv fcnt[3] = {natten_jax::FastDiv(2), natten_jax::FastDiv(3),
                                           natten_jax::FastDiv(L)};
      int to[3], fo[3];
      natten_jax::tile_origin((x * 7) % (6 * L), cnt, ls, to);
      natten_jax::tile_origin((x * 7) % (6 * L), fcnt, ls, fo);
      const natten_jax::Interval u = m.window_union(2, first, last);
      const natten_jax::Interval v = m.inverse(2, i[2], i[2]);
      if (fi[2] != i[2] || m.g[2] != n.g[2] || m.glen[2] != n.glen[2] || mg.g[2] != ng.g[2] ||
          mg.glen[2] != n.glen[2] || ng.glen[2] != n.glen[2] || m.start(2, i[2]) != w.start ||
          m.end(2, i[2]) != w.end || u.lo != f[1].lo || u.hi != f[1].hi || v.lo != f[0].lo ||
          v.hi != f[0].hi || to[0] != fo[0] || to[1] != fo[1] || to[2] != fo[2])
        std::printf("FastDiv policy disagrees\n");
      std::printf("%d %d %d %d %d %d %d %d\n", w.start, w.end, f[0].lo, f[0].hi, f[1].lo,
                  f[1].hi, f[2].lo, f[2].hi);
    }
  }
  return 0;
}
"""


def _host_axes():
    """(L, k, s, d, causal, tile_log2) axes: the fixed and random cases' axes and every valid
    small axis (L <= 12) with tiles of 1, 2 and 4 tokens."""
    axes = []
    for n, (shape, ks, st, dil, causal) in enumerate(FIXED_CASES + RANDOM_CASES):
        axes += [ax + (n % 5,) for ax in zip(shape, ks, st, dil, causal)]
    for L in range(1, 13):
        for d in range(1, L + 1):
            for k in range(1, L // d + 1):
                for s in range(1, k + 1):
                    for c in (False, True):
                        axes += [(L, k, s, d, c, l) for l in (0, 1, 2)]
    return axes


def test_policy_on_host_matches_window_py(tmp_path):
    """window.cuh and neighborhood.cuh are host-includable: compile them with the C++ compiler
    and compare every field with window.py on the CPU."""
    exe = host_cxx.compile_program(tmp_path, _HOST_PROGRAM, "window")
    axes = _host_axes()
    stdin = "".join(f"{L} {k} {s} {d} {int(c)} {l}\n" for L, k, s, d, c, l in axes)
    res = subprocess.run([exe], input=stdin, capture_output=True, text=True, check=True)
    assert "disagree" not in res.stdout and "wrong" not in res.stdout
    got = np.array(res.stdout.split(), np.int64).reshape(-1, 8)
    want = np.concatenate([expected_axis(np.arange(L), L, k, s, d, c, l)
                           for L, k, s, d, c, l in axes])
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert any(l > 0 and L > 1 << l for L, k, s, d, c, l in axes)  # tiles of several tokens


# ---------------------------------------------------------------------------------------------
# GPU


def _require_kernels():
    if not _ffi.cuda_kernels_available():
        pytest.fail(f"CUDA kernels unavailable on a GPU machine: {_ffi.unavailable_reason()}")


def _tiles(case_index, rank):
    """Query tile log2 extents of a case: a mix of 0 (single tokens) to 4 (16 tokens)."""
    return tuple((case_index + 2 * a) % 5 for a in range(rank))


@pytest.mark.gpu
@pytest.mark.parametrize("n", range(len(FIXED_CASES + RANDOM_CASES)))
def test_window_bounds_cuda_matches_window_py(n):
    _require_kernels()
    shape, ks, st, dil, causal = (FIXED_CASES + RANDOM_CASES)[n]
    tiles = _tiles(n, len(shape))
    got = np.asarray(_ffi.window_bounds_cuda(shape, ks, st, dil, causal, tile_log2=tiles))
    assert got.dtype == np.int32 and got.shape == tuple(shape) + (len(shape), 8)
    np.testing.assert_array_equal(got, expected_fields(shape, ks, st, dil, causal, tiles))


@pytest.mark.gpu
def test_window_bounds_cuda_under_jit():
    _require_kernels()
    for n, (shape, ks, st, dil, causal) in enumerate(FIXED_CASES[7:] + RANDOM_CASES[:9]):
        tiles = _tiles(n, len(shape))
        f = jax.jit(lambda: _ffi.window_bounds_cuda(shape, ks, st, dil, causal, tiles))
        np.testing.assert_array_equal(np.asarray(f()),
                                      expected_fields(shape, ks, st, dil, causal, tiles))


@pytest.mark.gpu
def test_window_bounds_cuda_scalar_arguments():
    """The positional signature of before (no tile_log2: single-token tiles) and scalars."""
    _require_kernels()
    got = np.asarray(_ffi.window_bounds_cuda((12, 9), 3, 2, 2, True))
    want = expected_fields((12, 9), (3, 3), (2, 2), (2, 2), (True, True), 0)
    np.testing.assert_array_equal(got, want)
    # single-token tiles: union and intersection are the token's own window
    np.testing.assert_array_equal(got[..., 4:6], got[..., 0:2])
    np.testing.assert_array_equal(got[..., 6:8], got[..., 0:2])
    got = np.asarray(_ffi.window_bounds_cuda((12, 9), 3, 2, 2, True, tile_log2=3))
    np.testing.assert_array_equal(got, expected_fields((12, 9), (3, 3), (2, 2), (2, 2),
                                                       (True, True), 3))


@pytest.mark.gpu
def test_window_bounds_cuda_large():
    _require_kernels()
    shape, ks, st, dil, causal = (3, 700, 500), (3, 31, 16), (1, 7, 16), (1, 3, 2), (True, False,
                                                                                      False)
    tiles = (1, 6, 4)
    got = np.asarray(_ffi.window_bounds_cuda(shape, ks, st, dil, causal, tile_log2=tiles))
    np.testing.assert_array_equal(got, expected_fields(shape, ks, st, dil, causal, tiles))


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
                                  expected_fields((10,), (3,), (1,), (1,), (False,)))


def test_window_bounds_cuda_rejects_bad_tiles_before_any_call():
    with pytest.raises(ValueError, match="tile_log2"):
        _ffi.window_bounds_cuda((10,), 3, tile_log2=17)
    with pytest.raises(ValueError, match="tile_log2"):
        _ffi.window_bounds_cuda((10, 4), 3, tile_log2=(1, 2, 3))
