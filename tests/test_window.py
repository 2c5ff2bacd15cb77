"""natten_jax.window vs NATTEN's own formulas (transcribed independently in tests/oracle.py)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from natten_jax import window as W

MAX_EXTENT = 20


def _configs(max_extent=MAX_EXTENT):
    """Every valid (L, k, s, d, causal) with L <= max_extent."""
    for L in range(1, max_extent + 1):
        for k in range(1, L + 1):
            for d in range(1, L // k + 1):
                for s in range(1, k + 1):
                    for c in (False, True):
                        yield L, k, s, d, c


# ------------------------------------------------------------------------------------------
# Hand-written cases.
# ------------------------------------------------------------------------------------------

def test_doc_examples():
    assert [W.window_start(i, 3, 1, 10, False) for i in range(10)] == [0, 0, 1, 2, 3, 4, 5, 6, 7, 7]
    assert [W.window_start(i, 3, 2, 10, False) for i in range(10)] == [0, 0, 2, 2, 4, 4, 6, 6, 7, 7]
    assert [W.window_start(i, 3, 1, 10, True) for i in range(5)] == [0, 0, 0, 1, 2]


def test_oracle_doc_examples():
    # The oracle's transcription must agree with the same hand-checked numbers.
    b = [oracle.natten_bounds(i, 3, 1, 1, 10, False) for i in range(10)]
    assert [s for s, _ in b] == [0, 0, 1, 2, 3, 4, 5, 6, 7, 7]
    assert all(e - s == 3 for s, e in b)


@pytest.mark.parametrize("k,left,right", [(1, 0, 0), (2, 1, 0), (3, 1, 1), (4, 2, 1), (5, 2, 2),
                                          (6, 3, 2), (7, 3, 3)])
def test_left_right(k, left, right):
    assert W.window_left(k) == left == oracle.natten_window_left(k)
    assert W.window_right(k) == right == oracle.natten_window_right(k)
    assert left + right == k - 1


def test_even_kernel_window():
    # k=4: two tokens left of the leader, one right; shifted at the borders.
    starts = [W.window_start(i, 4, 1, 10, False) for i in range(10)]
    assert starts == [0, 0, 0, 1, 2, 3, 4, 5, 6, 6]
    # query 5 sees 3, 4, 5, 6
    s, e = W.window_bounds(5, 4, 1, 1, 10, False)
    assert list(range(s, e)) == [3, 4, 5, 6]


def test_dilation_groups_uneven():
    # L=10, d=3: groups {0,3,6,9}, {1,4,7}, {2,5,8}
    assert [W.group_extent(10, 3, g) for g in range(3)] == [4, 3, 3]
    assert [oracle.qkv_fix_dilation(10, 3, g) for g in range(3)] == [4, 3, 3]
    m = oracle.mask_1d(10, 3, 1, 3, False)
    # group 0 has 4 tokens, k=3: query 0 sees 0,3,6; query 9 sees 3,6,9
    assert np.nonzero(m[0])[0].tolist() == [0, 3, 6]
    assert np.nonzero(m[9])[0].tolist() == [3, 6, 9]
    # group 1 has 3 tokens == k: every member sees the whole group
    for x in (1, 4, 7):
        assert np.nonzero(m[x])[0].tolist() == [1, 4, 7]


def test_causal_stride():
    # causal, k=3, s=2, L=7: leader = last of the stride group; start = leader - 2; end = i + 1
    got = [W.window_bounds(i, 3, 2, 1, 7, True) for i in range(7)]
    want = [(0, 1), (0, 2), (1, 3), (1, 4), (3, 5), (3, 6), (4, 7)]
    assert [(int(a), int(b)) for a, b in got] == want
    assert [oracle.natten_bounds(i, 3, 2, 1, 7, True) for i in range(7)] == want


def test_stride_equal_kernel_tiles():
    # stride == kernel, L divisible: non-overlapping blocks (blocked attention)
    m = oracle.mask_1d(12, 4, 4, 1, False)
    for x in range(12):
        b = x // 4
        assert np.nonzero(m[x])[0].tolist() == list(range(4 * b, 4 * b + 4))
    for x in range(12):
        s, e = W.window_bounds(x, 4, 4, 1, 12, False)
        assert (s, e) == (4 * (x // 4), 4 * (x // 4) + 4)


def test_full_window_is_dense():
    assert oracle.na_mask((6,), 6).all()
    assert oracle.na_mask((3, 4), (3, 4)).all()
    causal = oracle.na_mask((5,), 5, is_causal=True)
    assert (causal == np.tril(np.ones((5, 5), bool))).all()


# ------------------------------------------------------------------------------------------
# Exhaustive: window.py vs the transcribed formulas.
# ------------------------------------------------------------------------------------------

def test_group_extent_exhaustive():
    for L in range(1, 41):
        for d in range(1, L + 1):
            ext = [W.group_extent(L, d, g) for g in range(d)]
            assert ext == [oracle.qkv_fix_dilation(L, d, g) for g in range(d)], (L, d)
            assert sum(ext) == L
            # vectorised over groups
            np.testing.assert_array_equal(W.group_extent(L, d, np.arange(d)), ext)


def test_window_start_end_exhaustive_scalar():
    """window_start / window_end per in-group extent Lg, every valid (k, s, causal)."""
    for Lg in range(1, MAX_EXTENT + 1):
        for k in range(1, Lg + 1):
            wl, wr = oracle.natten_window_left(k), oracle.natten_window_right(k)
            for s in range(1, k + 1):
                for c in (False, True):
                    for i in range(Lg):
                        want_s = oracle.get_win_start(i, wl, wr, s, Lg, c)
                        want_e = oracle.get_win_end(i, want_s, k, Lg, c)
                        got_s = W.window_start(i, k, s, Lg, c)
                        got_e = W.window_end(i, got_s, k, c)
                        assert (got_s, got_e) == (want_s, want_e), (i, k, s, Lg, c)
                        assert 0 <= got_s < got_e <= Lg


def test_window_bounds_exhaustive_vectorised():
    n = 0
    for L, k, s, d, c in _configs():
        x = np.arange(L)
        start, end = W.window_bounds(x, k, s, d, L, c)
        want = np.array([oracle.natten_bounds(int(i), k, s, d, L, c) for i in x])
        np.testing.assert_array_equal(start, want[:, 0], err_msg=str((L, k, s, d, c)))
        np.testing.assert_array_equal(end, want[:, 1], err_msg=str((L, k, s, d, c)))
        if not c:
            assert (end - start == k).all()
        else:
            assert (end == x // d + 1).all()
            assert (end - start <= k).all()
        n += 1
    assert n > 4000


def test_is_neighbor_1d_exhaustive():
    for L, k, s, d, c in _configs(14):
        x = np.arange(L)[:, None]
        y = np.arange(L)[None, :]
        got = np.asarray(W.is_neighbor_1d(x, y, k, s, d, L, c))
        np.testing.assert_array_equal(got, oracle.mask_1d(L, k, s, d, c),
                                      err_msg=str((L, k, s, d, c)))


def test_window_functions_accept_jax_arrays():
    for L, k, s, d, c in [(13, 4, 3, 3, True), (17, 5, 2, 2, False)]:
        x = np.arange(L)
        s_np, e_np = W.window_bounds(x, k, s, d, L, c)
        s_j, e_j = W.window_bounds(jnp.asarray(x), k, s, d, L, c)
        np.testing.assert_array_equal(np.asarray(s_j), s_np)
        np.testing.assert_array_equal(np.asarray(e_j), e_np)
        m = W.is_neighbor_1d(jnp.asarray(x)[:, None], jnp.asarray(x)[None, :], k, s, d, L, c)
        np.testing.assert_array_equal(np.asarray(m), oracle.mask_1d(L, k, s, d, c))


# ------------------------------------------------------------------------------------------
# num_neighbors and window_offsets.
# ------------------------------------------------------------------------------------------

_ND_CASES = [
    ((7,), (3,), (1,), (1,), (False,)),
    ((10,), (4,), (3,), (2,), (True,)),
    ((5, 6), (3, 2), (1, 2), (1, 3), (False, True)),
    ((6, 5), (2, 5), (2, 3), (3, 1), (True, False)),
    ((7, 7), (3, 3), (3, 2), (2, 2), (True, True)),
    ((4, 5, 3), (2, 3, 3), (1, 3, 2), (2, 1, 1), (False, True, False)),
    ((5, 3, 4), (3, 1, 4), (2, 1, 4), (1, 3, 1), (True, False, True)),
]


@pytest.mark.parametrize("shape,k,s,d,c", _ND_CASES)
def test_num_neighbors_nd(shape, k, s, d, c):
    assert W.num_neighbors(shape, k, s, d, c) == int(oracle.na_mask(shape, k, s, d, c).sum())


def test_num_neighbors_1d_exhaustive():
    for L, k, s, d, c in _configs(16):
        want = int(oracle.mask_1d(L, k, s, d, c).sum())
        assert W.num_neighbors((L,), (k,), (s,), (d,), (c,)) == want, (L, k, s, d, c)


def test_window_offsets_exhaustive():
    for L, k, s, d, c in _configs(16):
        ((coord, valid),) = W.window_offsets((L,), (k,), (s,), (d,), (c,))
        assert coord.shape == (L, k) and valid.shape == (L, k)
        assert valid.dtype == np.bool_
        m = oracle.mask_1d(L, k, s, d, c)
        x = np.arange(L)
        start, end = W.window_bounds(x, k, s, d, L, c)
        # every coordinate is in range and in the query's group (valid or not: safe to gather)
        assert ((coord >= 0) & (coord < L)).all(), (L, k, s, d, c)
        assert (coord % d == (x % d)[:, None]).all(), (L, k, s, d, c)
        # valid entries are exactly [start, end)
        np.testing.assert_array_equal(valid.sum(1), end - start)
        if not c:
            assert valid.all()
        for q in range(L):
            js = np.arange(k)[valid[q]]
            np.testing.assert_array_equal(coord[q, valid[q]], q % d + d * (start[q] + js))
            # the valid coordinates are the oracle's neighbors, each exactly once
            assert sorted(coord[q, valid[q]].tolist()) == np.nonzero(m[q])[0].tolist(), \
                (L, k, s, d, c, q)


@pytest.mark.parametrize("shape,k,s,d,c", _ND_CASES)
def test_window_offsets_nd_product_is_mask(shape, k, s, d, c):
    offs = W.window_offsets(shape, k, s, d, c)
    assert len(offs) == len(shape)
    want = oracle.na_mask(shape, k, s, d, c)
    T = int(np.prod(shape))
    got = np.zeros((T, T), bool)
    qcoords = list(itertools.product(*[range(L) for L in shape]))
    for qi, xc in enumerate(qcoords):
        per_axis = [offs[a][0][xc[a]][offs[a][1][xc[a]]] for a in range(len(shape))]
        for yc in itertools.product(*per_axis):
            got[qi, np.ravel_multi_index(yc, shape)] = True
    np.testing.assert_array_equal(got, want)


def test_prod():
    assert W.prod((2, 3, 4)) == 24
    assert W.prod(()) == 1


# ------------------------------------------------------------------------------------------
# Runs of queries and keys: tile_union, tile_intersection, inverse_window vs brute force.
# ------------------------------------------------------------------------------------------

def _group_windows(Lg, k, s, c):
    """start, end of every in-group query of a group of Lg tokens (window.py's own rule)."""
    i = np.arange(Lg)
    start = np.asarray(W.window_start(i, k, s, Lg, c))
    return start, np.asarray(W.window_end(i, start, k, c))


def _check_runs(Lg, k, s, c):
    """All runs [first, last] of one group: the three functions vs sets built query by query."""
    start, end = _group_windows(Lg, k, s, c)
    i = np.arange(Lg)
    first, last = np.triu_indices(Lg)  # every run first <= last
    # member[r, i]: query i is in the run / key i is in the run
    member = (i >= first[:, None]) & (i <= last[:, None])
    sees = (i[None, :] >= start[:, None]) & (i[None, :] < end[:, None])  # sees[query, key]
    union = (member[:, :, None] & sees[None]).any(1)
    inter = (~member[:, :, None] | sees[None]).all(1)
    meets = ((end[None, :] > first[:, None]) & (start[None, :] <= last[:, None]))  # [run, query]

    def as_range(lo, hi):
        return (i >= np.asarray(lo)[:, None]) & (i < np.asarray(hi)[:, None])

    where = (Lg, k, s, c)
    lo, hi = W.tile_union(first, last, k, s, Lg, c)
    np.testing.assert_array_equal(as_range(lo, hi), union, err_msg=str(where))
    lo, hi = W.tile_intersection(first, last, k, s, Lg, c)
    np.testing.assert_array_equal(as_range(lo, hi), inter, err_msg=str(where))
    assert ((np.asarray(hi) > np.asarray(lo)) == inter.any(1)).all(), where
    lo, hi = W.inverse_window(first, last, k, s, Lg, c)  # keys [first, last]
    np.testing.assert_array_equal(as_range(lo, hi), meets, err_msg=str(where))
    assert (np.asarray(lo) <= first).all() and (first < np.asarray(hi)).all(), where  # never empty
    # ints give the same answers as arrays
    for r in range(0, len(first), max(1, len(first) // 7)):
        f, l_ = int(first[r]), int(last[r])
        assert W.inverse_window(f, l_, k, s, Lg, c) == (lo[r], hi[r]), (where, f, l_)
        assert W.tile_union(f, l_, k, s, Lg, c) == tuple(
            int(v[r]) for v in W.tile_union(first, last, k, s, Lg, c)), (where, f, l_)


def test_runs_exhaustive_small_groups():
    """Every valid (Lg, k, s, causal) with Lg <= 14 (every dilation group is such a group)."""
    n = 0
    for Lg in range(1, 15):
        for k in range(1, Lg + 1):
            for s in range(1, k + 1):
                for c in (False, True):
                    _check_runs(Lg, k, s, c)
                    n += 1
    assert n > 1000


def test_runs_random_dilated_axes():
    """Random axes (extent up to 150, even and odd kernels, strides, dilations whose groups differ
    in length, causal or not): every group of the axis against brute force."""
    rng = np.random.default_rng(7)
    seen = dict(even=False, stride=False, causal=False, uneven=False)
    for _ in range(60):
        L = int(rng.integers(2, 151))
        d = int(rng.integers(1, min(5, L) + 1))
        k = int(rng.integers(1, L // d + 1))
        s = int(rng.integers(1, k + 1))
        c = bool(rng.integers(0, 2))
        lens = [W.group_extent(L, d, g) for g in range(d)]
        seen["even"] |= k % 2 == 0
        seen["stride"] |= s > 1
        seen["causal"] |= c
        seen["uneven"] |= len(set(lens)) > 1
        for Lg in lens:
            _check_runs(Lg, k, s, c)
    assert all(seen.values()), seen


def test_runs_accept_jax_arrays_and_group_length_arrays():
    first = np.array([0, 2, 5, 9])
    last = np.array([3, 2, 8, 9])
    Lg = np.array([10, 10, 11, 12])  # per-entry group lengths (dilation groups differ)
    for k, s, c in [(3, 1, False), (4, 3, True), (5, 2, False)]:
        for fn in (W.tile_union, W.tile_intersection, W.inverse_window):
            want = fn(first, last, k, s, Lg, c)
            got = fn(jnp.asarray(first), jnp.asarray(last), k, s, jnp.asarray(Lg), c)
            for w, g in zip(want, got):
                np.testing.assert_array_equal(np.asarray(g), w)
            for r in range(len(first)):
                assert fn(int(first[r]), int(last[r]), k, s, int(Lg[r]), c) == \
                    (want[0][r], want[1][r]), (fn.__name__, k, s, c, r)


def test_module_doctests():
    import doctest

    res = doctest.testmod(W)
    assert res.failed == 0 and res.attempted >= 11


# ------------------------------------------------------------------------------------------
# Ragged batches: per-sample extents (issue 24).
# ------------------------------------------------------------------------------------------

def test_sample_extent_clamps_elementwise():
    assert W.sample_extent(3, 3, 2, 10) == 6
    assert W.sample_extent(12, 3, 1, 10) == 10
    assert W.sample_extent(7, 3, 1, 10) == 7
    v = np.array([[0, 20], [5, 6], [-3, 9]], np.int32)
    want = np.array([[3, 9], [5, 6], [3, 9]])
    got = W.sample_extent(v, (3, 3), (1, 2), (8, 9))
    assert isinstance(got, np.ndarray) and got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    got = W.sample_extent(jnp.asarray(v), (3, 3), (1, 2), (8, 9))
    assert isinstance(got, jnp.ndarray) and got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want)
    got = jax.jit(lambda e: W.sample_extent(e, (3, 3), (1, 2), (8, 9)))(jnp.asarray(v))
    np.testing.assert_array_equal(got, want)


def test_sample_num_extra_clamps():
    assert W.sample_num_extra(-1, 4) == 0 and W.sample_num_extra(9, 4) == 4
    n = np.array([-2, 0, 3, 7])
    np.testing.assert_array_equal(W.sample_num_extra(n, 4), [0, 0, 3, 4])
    np.testing.assert_array_equal(W.sample_num_extra(jnp.asarray(n), 4), [0, 0, 3, 4])


def test_valid_tokens():
    e = np.array([[2, 3], [3, 1]])
    want = np.zeros((2, 3, 4), bool)
    want[0, :2, :3] = True
    want[1, :3, :1] = True
    np.testing.assert_array_equal(W.valid_tokens((3, 4), e), want)
    np.testing.assert_array_equal(W.valid_tokens((3, 4), jnp.asarray(e)), want)


def test_window_offsets_ragged_equal_the_cropped_axis():
    """Sample windows of extent E inside a padded axis of L: the first E queries get exactly
    the windows of an axis of E, and no query (padded ones included) reads a coordinate >= E;
    the traced extents (JAX, under jit) of a few configurations give the same arrays."""
    for n, (L, k, s, d, c) in enumerate(_configs(12)):
        extents = np.arange(k * d, L + 1)
        ve = extents[:, None].astype(np.int32)
        ((coord, valid),) = W.window_offsets((L,), (k,), (s,), (d,), (c,), valid_extent=ve)
        if n % 97 == 0:
            fn = jax.jit(lambda e: W.window_offsets((L,), (k,), (s,), (d,), (c,),
                                                    valid_extent=e))
            ((tcoord, tvalid),) = fn(jnp.asarray(ve))
            np.testing.assert_array_equal(tcoord, coord)
            np.testing.assert_array_equal(tvalid, valid)
        assert coord.shape == (len(extents), L, k)
        for b, E in enumerate(extents):
            ((want_c, want_v),) = W.window_offsets((E,), (k,), (s,), (d,), (c,))
            np.testing.assert_array_equal(coord[b, :E], want_c, err_msg=str((L, k, s, d, c, E)))
            np.testing.assert_array_equal(valid[b, :E], want_v, err_msg=str((L, k, s, d, c, E)))
            assert ((coord[b] >= 0) & (coord[b] < E)).all(), (L, k, s, d, c, E)
