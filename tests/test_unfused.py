"""Unfused NA operators (na*d_qk / na*d_av, with RPB) vs float64 brute force.

The oracles here are independent of ``natten_jax.window``: neighbor sets come from
``oracle.natten_bounds`` (NATTEN's mask formulas), the neighbor order is row-major over the
kernel window from the window start, and the RPB index is NATTEN's ``get_pb_start(x) + j``
(``csrc/include/natten/cuda/naive/natten_commons.cuh``) written out below.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natten_jax
import oracle
from natten_jax.unfused import na1d_av, na1d_qk, na2d_av, na2d_qk, na3d_av, na3d_qk

QK = {1: na1d_qk, 2: na2d_qk, 3: na3d_qk}
AV = {1: na1d_av, 2: na2d_av, 3: na3d_av}
NA = {1: natten_jax.na1d, 2: natten_jax.na2d, 3: natten_jax.na3d}


# --------------------------------------------------------------------------------------------
# NATTEN < 0.20 formulas (natten_commons.cuh, NeighborhoodMask / get_pb_start), global coords.
# --------------------------------------------------------------------------------------------

def old_window_start(i, L, k, d, causal):
    ns = k // 2
    if causal:
        return max(i // d - k + 1, 0) * d + i % d
    if d <= 1:
        return max(i - ns, 0) + (i + ns >= L) * (L - i - ns - 1)
    if i - ns * d < 0:
        return i % d
    if i + ns * d >= L:
        imodd = i % d
        a = (L // d) * d
        b = L - a
        if imodd < b:
            return L - b + imodd - 2 * ns * d
        return a + imodd - k * d
    return i - ns * d


def old_window_end(i, start, L, k, d, causal):
    if causal:
        return min(L, i + d)
    return min(L, start + k * d)


def old_pb_start(i, L, k, d):
    ns = k // 2
    if d <= 1:
        return ns + (i < ns) * (ns - i) + (i + ns >= L) * (L - i - 1 - ns)
    if i - ns * d < 0:
        return k - 1 - i // d
    if i + ns * d >= L:
        return (L - i - 1) // d
    return ns


def _t(v, rank):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * rank


def axis_neighbors(x, L, k, d, causal):
    """Global key coordinate of window entry j (or None), j = 0..k-1, from the window start."""
    s, e = oracle.natten_bounds(x, k, 1, d, L, causal)
    return [x % d + d * (s + j) if s + j < e else None for j in range(k)]


@functools.lru_cache(maxsize=None)
def neighbor_table(S, ks, di, ca):
    """For each query (row-major) and window entry: key coords tuple or None, and RPB indices."""
    rank = len(S)
    table = {}
    for x in itertools.product(*[range(L) for L in S]):
        nb = [axis_neighbors(x[a], S[a], ks[a], di[a], ca[a]) for a in range(rank)]
        pb = [old_pb_start(x[a], S[a], ks[a], di[a]) if ks[a] % 2 else None for a in range(rank)]
        entries = []
        for js in itertools.product(*[range(k) for k in ks]):  # row-major over the window
            ys = tuple(nb[a][js[a]] for a in range(rank))
            bidx = tuple(pb[a] + js[a] if pb[a] is not None else None for a in range(rank))
            entries.append((None if None in ys else ys, bidx))
        table[x] = entries
    return table


def qk_oracle(q, k, ks, di, ca, rpb=None):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, S, H = q.shape[0], q.shape[1:-2], q.shape[-2]
    G = H // k.shape[-2]
    W = math.prod(ks)
    out = np.full((B,) + S + (H, W), -np.inf)
    for x, entries in neighbor_table(S, ks, di, ca).items():
        for w, (ys, bidx) in enumerate(entries):
            if ys is None:
                continue
            kv = np.repeat(k[(slice(None),) + ys], G, axis=1)  # [B, H, D]
            val = np.einsum("bhd,bhd->bh", q[(slice(None),) + x], kv)
            if rpb is not None:
                val = val + np.asarray(rpb, np.float64)[(slice(None),) + bidx][None]
            out[(slice(None),) + x + (slice(None), w)] = val
    return out


def av_oracle(attn, v, ks, di, ca):
    attn, v = np.asarray(attn, np.float64), np.asarray(v, np.float64)
    B, S, H = attn.shape[0], attn.shape[1:-2], attn.shape[-2]
    G = H // v.shape[-2]
    out = np.zeros((B,) + S + (H, v.shape[-1]))
    for x, entries in neighbor_table(S, ks, di, ca).items():
        for w, (ys, _) in enumerate(entries):
            if ys is None:
                continue
            vv = np.repeat(v[(slice(None),) + ys], G, axis=1)  # [B, H, Dv]
            out[(slice(None),) + x] += attn[(slice(None),) + x + (slice(None), w)][..., None] * vv
    return out


# --------------------------------------------------------------------------------------------
# Dense masked float64 formulation in jax.numpy (for gradients).
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def dense_tables(S, ks, di, ca):
    """Flat key index [T, W], validity [T, W] and per-axis RPB indices [rank, T, W]."""
    rank, T, W = len(S), math.prod(S), math.prod(ks)
    idx = np.zeros((T, W), np.int64)
    valid = np.zeros((T, W), bool)
    bidx = np.zeros((rank, T, W), np.int64)
    for t, (x, entries) in enumerate(neighbor_table(S, ks, di, ca).items()):
        for w, (ys, b) in enumerate(entries):
            if ys is not None:
                idx[t, w] = np.ravel_multi_index(ys, S)
                valid[t, w] = True
                bidx[:, t, w] = [v if v is not None else 0 for v in b]
    return idx, valid, bidx


def qk_dense(q, k, rpb, ks, di, ca):
    B, S, H, D = q.shape[0], q.shape[1:-2], q.shape[-2], q.shape[-1]
    Hkv = k.shape[-2]
    T, W = math.prod(S), math.prod(ks)
    idx, valid, bidx = dense_tables(S, ks, di, ca)
    qf = q.reshape(B, T, H, D)
    kf = jnp.repeat(k.reshape(B, T, Hkv, D), H // Hkv, axis=2)
    full = jnp.einsum("bqhd,bkhd->bhqk", qf, kf)  # dense [B, H, T, T]
    s = full[:, :, np.arange(T)[:, None], idx]  # [B, H, T, W]
    if rpb is not None:
        s = s + rpb[(slice(None),) + tuple(bidx)][None]
    s = jnp.where(valid, s, -jnp.inf)
    return jnp.moveaxis(s, 1, 2).reshape((B,) + S + (H, W))


def av_dense(attn, v, ks, di, ca):
    B, S, H, W = attn.shape[0], attn.shape[1:-2], attn.shape[-2], attn.shape[-1]
    Hkv, Dv = v.shape[-2:]
    T = math.prod(S)
    idx, valid, _ = dense_tables(S, ks, di, ca)
    a = jnp.moveaxis(attn.reshape(B, T, H, W), 2, 1)  # [B, H, T, W]
    a = jnp.where(valid, a, 0.0)
    dense = jnp.zeros((B, H, T, T), a.dtype).at[:, :, np.arange(T)[:, None], idx].add(a)
    vf = jnp.repeat(v.reshape(B, T, Hkv, Dv), H // Hkv, axis=2)
    return jnp.einsum("bhqk,bkhe->bqhe", dense, vf).reshape((B,) + S + (H, Dv))


# --------------------------------------------------------------------------------------------
# Cases.
# --------------------------------------------------------------------------------------------

# (rank, spatial, kernel_size, dilation, is_causal, heads, heads_kv, rpb)
CASES = [
    (1, (11,), 3, 1, False, 2, 2, True),
    (1, (13,), 5, 2, False, 4, 2, True),
    (1, (10,), 4, 2, False, 2, 1, False),
    (1, (9,), 3, 2, True, 2, 1, False),
    (2, (7, 6), (3, 5), (2, 1), False, 4, 2, True),
    (2, (6, 7), 3, 1, (True, False), 2, 2, False),
    (2, (6, 5), (2, 3), (1, 1), True, 2, 1, False),
    (3, (5, 4, 6), (3, 3, 5), (1, 1, 1), False, 2, 1, True),
    (3, (6, 4, 5), (3, 2, 3), (2, 1, 1), (False, True, True), 2, 2, False),
]
IDS = [f"r{c[0]}-S{c[1]}-k{c[2]}-d{c[3]}-c{c[4]}-H{c[5]}/{c[6]}-rpb{int(c[7])}" for c in CASES]


def _norm(case):
    rank, S, ks, di, ca, H, Hkv, use_rpb = case
    return rank, S, _t(ks, rank), _t(di, rank), _t(ca, rank), H, Hkv, use_rpb


def _rand(seed, *shapes, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


@functools.lru_cache(maxsize=None)
def _jit_qk(rank, ks, di, ca, has_rpb):
    if has_rpb:
        return jax.jit(lambda q, k, b: QK[rank](q, k, ks, di, ca, rpb=b))
    return jax.jit(lambda q, k: QK[rank](q, k, ks, di, ca))


@functools.lru_cache(maxsize=None)
def _jit_av(rank, ks, di, ca):
    return jax.jit(lambda a, v: AV[rank](a, v, ks, di, ca))


def _qk(rank, q, k, ks, di, ca, rpb=None):
    f = _jit_qk(rank, ks, di, ca, rpb is not None)
    return f(q, k, rpb) if rpb is not None else f(q, k)


# --------------------------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------------------------

def test_old_natten_windows_equal_mask_rule():
    """NATTEN < 0.20's window start/end (odd k, stride 1) == the 0.20 mask rule used above."""
    for L in range(2, 14):
        for k in (3, 5, 7):
            for d in range(1, L // k + 1):
                for causal in (False, True):
                    for i in range(L):
                        s = old_window_start(i, L, k, d, causal)
                        e = old_window_end(i, s, L, k, d, causal)
                        old = list(range(s, e, d))
                        new = [y for y in axis_neighbors(i, L, k, d, causal) if y is not None]
                        assert old == new, (L, k, d, causal, i)
                        if not causal:  # RPB index = offset in dilated steps + k - 1
                            pb = old_pb_start(i, L, k, d)
                            assert [pb + j for j in range(k)] == [
                                (y - i) // d + k - 1 for y in new]


def test_neighbor_order_and_rpb_index_example():
    L = 6
    key = jnp.arange(L, dtype=jnp.float64).reshape(1, L, 1, 1)  # key[y] = y
    q = jnp.ones((1, L, 1, 1), jnp.float64)
    logits = np.asarray(na1d_qk(q, key, 3))[0, :, 0]
    np.testing.assert_array_equal(
        logits, [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [3, 4, 5]])
    rpb = jnp.arange(5, dtype=jnp.float64).reshape(1, 5)  # rpb[0, r] = r
    bias = np.asarray(na1d_qk(jnp.zeros_like(q), key, 3, rpb=rpb))[0, :, 0]
    np.testing.assert_array_equal(
        bias, [[2, 3, 4], [1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3], [0, 1, 2]])
    causal = np.asarray(na1d_qk(q, key, 3, is_causal=True))[0, :3, 0]
    np.testing.assert_array_equal(
        causal, [[0, -np.inf, -np.inf], [0, 1, -np.inf], [0, 1, 2]])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_qk_matches_oracle(case):
    rank, S, ks, di, ca, H, Hkv, use_rpb = _norm(case)
    B, D = 2, 3
    q, k, rpb = _rand(1, (B,) + S + (H, D), (B,) + S + (Hkv, D),
                      (H,) + tuple(2 * x - 1 for x in ks))
    rpb = rpb if use_rpb else None
    got = _qk(rank, q, k, ks, di, ca, rpb)
    assert got.shape == (B,) + S + (H, math.prod(ks)) and got.dtype == jnp.float64
    want = qk_oracle(q, k, ks, di, ca, rpb)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    np.testing.assert_allclose(np.where(np.isinf(want), 0, got), np.where(np.isinf(want), 0, want),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_av_matches_oracle(case):
    rank, S, ks, di, ca, H, Hkv, _ = _norm(case)
    B, Dv = 2, 4
    attn, v = _rand(2, (B,) + S + (H, math.prod(ks)), (B,) + S + (Hkv, Dv))
    got = _jit_av(rank, ks, di, ca)(attn, v)
    assert got.shape == (B,) + S + (H, Dv) and got.dtype == jnp.float64
    np.testing.assert_allclose(got, av_oracle(attn, v, ks, di, ca), rtol=1e-12, atol=1e-12)
    if any(ca):  # entries that are not neighbors are ignored, whatever they hold
        invalid = np.isneginf(qk_oracle(np.zeros((B,) + S + (H, 1)), np.zeros((B,) + S + (Hkv, 1)),
                                        ks, di, ca))
        assert invalid.any()
        junk = jnp.where(invalid, jnp.nan, attn)
        np.testing.assert_array_equal(_jit_av(rank, ks, di, ca)(junk, v), got)


@pytest.mark.parametrize("case", [c for c in CASES if not c[7]] + [CASES[4]],
                         ids=[i for c, i in zip(CASES, IDS) if not c[7]] + [IDS[4]])
def test_softmax_qk_av_equals_na(case):
    rank, S, ks, di, ca, H, Hkv, _ = _norm(case)
    B, D, Dv = 2, 4, 3
    q, k, v = _rand(3, (B,) + S + (H, D), (B,) + S + (Hkv, D), (B,) + S + (Hkv, Dv))
    scale = D ** -0.5

    @jax.jit
    def both(q, k, v):
        attn = jax.nn.softmax(QK[rank](q * scale, k, ks, di, ca), axis=-1)
        return AV[rank](attn, v, ks, di, ca), NA[rank](q, k, v, ks, 1, di, ca,
                                                       backend="reference")

    out, want = both(q, k, v)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)


GRAD_CASES = [CASES[1], CASES[4], CASES[6], CASES[7]]
GRAD_IDS = [IDS[CASES.index(c)] for c in GRAD_CASES]


@pytest.mark.parametrize("case", GRAD_CASES, ids=GRAD_IDS)
def test_grads_against_dense(case):
    rank, S, ks, di, ca, H, Hkv, use_rpb = _norm(case)
    B, D, Dv, W = 1, 3, 2, math.prod(ks)
    q, k, v, rpb, attn, c_qk, c_av = _rand(
        4, (B,) + S + (H, D), (B,) + S + (Hkv, D), (B,) + S + (Hkv, Dv),
        (H,) + tuple(2 * x - 1 for x in ks), (B,) + S + (H, W), (B,) + S + (H, W),
        (B,) + S + (H, Dv))
    if not use_rpb:
        rpb = jnp.zeros_like(rpb)
    valid = ~np.isneginf(qk_oracle(np.zeros(q.shape), np.zeros(k.shape), ks, di, ca))

    def qk_ours(q, k, b):
        return QK[rank](q, k, ks, di, ca, rpb=b if use_rpb else None)

    def qk_ref(q, k, b):
        return qk_dense(q, k, b if use_rpb else None, ks, di, ca)

    # PN (qk) alone: gradients w.r.t. query, key, rpb.
    def loss_qk(f):
        return lambda q, k, b: jnp.sum(jnp.where(valid, f(q, k, b), 0.0) * c_qk)

    g = jax.jit(jax.grad(loss_qk(qk_ours), argnums=(0, 1, 2)))(q, k, rpb)
    r = jax.jit(jax.grad(loss_qk(qk_ref), argnums=(0, 1, 2)))(q, k, rpb)
    for a, b in zip(g, r):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)

    # NN (av) alone: gradients w.r.t. attn, value (attn entries off the window get zero).
    def loss_av(f):
        return lambda a, v: jnp.sum(f(a, v, ks, di, ca) * c_av)

    ours_av = lambda a, v, ks, di, ca: AV[rank](a, v, ks, di, ca)  # noqa: E731
    g = jax.jit(jax.grad(loss_av(ours_av), argnums=(0, 1)))(attn, v)
    r = jax.jit(jax.grad(loss_av(av_dense), argnums=(0, 1)))(attn, v)
    for a, b in zip(g, r):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert not np.any(np.asarray(g[0])[~valid])

    # softmax(qk + rpb) -> av end to end.
    def loss_e2e(qk, av):
        def f(q, k, v, b):
            a = jax.nn.softmax(qk(q * D ** -0.5, k, b), axis=-1)
            return jnp.sum(av(a, v, ks, di, ca) * c_av)
        return f

    g = jax.jit(jax.grad(loss_e2e(qk_ours, ours_av), argnums=(0, 1, 2, 3)))(q, k, v, rpb)
    r = jax.jit(jax.grad(loss_e2e(qk_ref, av_dense), argnums=(0, 1, 2, 3)))(q, k, v, rpb)
    for a, b in zip(g, r):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2),
                                       (jnp.float16, 3e-2)])
def test_low_precision(dtype, tol):
    S, ks, di, H, Hkv = (7, 6), (3, 3), (2, 1), 2, 1
    q, k, rpb, v = _rand(5, (2,) + S + (H, 4), (2,) + S + (Hkv, 4), (H, 5, 5), (2,) + S + (Hkv, 4),
                         dtype=dtype)
    logits = jax.jit(lambda q, k, b: na2d_qk(q, k, ks, di, rpb=b))(q, k, rpb)
    assert logits.dtype == dtype
    f64 = lambda x: np.asarray(x.astype(jnp.float64))  # noqa: E731
    np.testing.assert_allclose(f64(logits), qk_oracle(f64(q), f64(k), ks, di, (False,) * 2,
                                                      f64(rpb)), rtol=tol, atol=tol * 4)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # float32 weights, value dtype
    out = jax.jit(lambda a, v: na2d_av(a, v, ks, di))(attn, v)
    assert out.dtype == dtype
    np.testing.assert_allclose(f64(out), av_oracle(f64(attn.astype(dtype)), f64(v), ks, di,
                                                   (False,) * 2), rtol=tol, atol=tol * 4)


def test_jit_and_vmap():
    S, ks, di, ca = (6, 5), (3, 3), (2, 1), (False, False)
    q, k, v, rpb = _rand(6, (3, 2) + S + (2, 4), (3, 2) + S + (1, 4), (3, 2) + S + (1, 2),
                         (3, 2, 5, 5))
    qk = lambda q, k, b: na2d_qk(q, k, ks, di, rpb=b)  # noqa: E731
    av = lambda a, v: na2d_av(a, v, ks, di)  # noqa: E731
    want_qk = np.stack([qk_oracle(q[i], k[i], ks, di, ca, rpb[i]) for i in range(3)])
    np.testing.assert_allclose(jax.jit(qk)(q[0], k[0], rpb[0]), want_qk[0], rtol=1e-12)
    logits = jax.jit(jax.vmap(qk))(q, k, rpb)
    np.testing.assert_allclose(logits, want_qk, rtol=1e-12)
    attn = jax.nn.softmax(logits, axis=-1)
    want_av = np.stack([av_oracle(attn[i], v[i], ks, di, ca) for i in range(3)])
    np.testing.assert_allclose(jax.jit(jax.vmap(av))(attn, v), want_av, rtol=1e-12)
    # vmap over the bias only (query and key closed over).
    vb = jax.jit(jax.vmap(lambda b: na2d_qk(q[0], k[0], ks, di, rpb=b)))(rpb)
    np.testing.assert_allclose(vb[1], qk_oracle(q[0], k[0], ks, di, ca, rpb[1]), rtol=1e-12)


def test_row_blocking(monkeypatch):
    """Several row blocks (lax.map) give the same values and gradients as one block."""
    S, ks, di = (9, 4, 3), (3, 3, 3), (2, 1, 1)
    q, k, v, rpb = _rand(7, (1,) + S + (2, 3), (1,) + S + (1, 3), (1,) + S + (1, 2), (2, 5, 5, 5))

    def loss(q, k, v, b):
        a = jax.nn.softmax(na3d_qk(q, k, ks, di, rpb=b), axis=-1)
        return jnp.sum(jnp.sin(na3d_av(a, v, ks, di)))

    one = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, rpb)
    from natten_jax import reference

    monkeypatch.setattr(reference, "_BLOCK_ELEMENTS", 400)  # -> one row per block, 9 blocks
    assert reference.row_blocks(9, 1 * 27 * 3 * 12) == (1, 9)
    many = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, rpb)
    np.testing.assert_allclose(many[0], one[0], rtol=1e-13)
    for a, b in zip(many[1], one[1]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def _bad_calls():
    q = jnp.zeros((1, 8, 2, 4))
    k1 = jnp.zeros((1, 8, 1, 4))
    a = jnp.zeros((1, 8, 2, 3))
    v = jnp.zeros((1, 8, 1, 5))
    q2 = jnp.zeros((1, 6, 6, 2, 4))
    return [
        (lambda: na1d_qk(q, q, 0), ValueError, "kernel_size"),
        (lambda: na1d_qk(q, q, (3, 3)), ValueError, "kernel_size"),
        (lambda: na1d_qk(q, q, 3.0), TypeError, "kernel_size"),
        (lambda: na1d_qk(q, q, None), TypeError, "kernel_size"),
        (lambda: na1d_qk(q, q, 3, dilation=0), ValueError, "dilation"),
        (lambda: na1d_qk(q, q, 3, dilation=3), ValueError, "dilation"),
        (lambda: na1d_qk(q, q, 9), ValueError, "kernel_size"),
        (lambda: na1d_qk(q, q, 3, is_causal="yes"), TypeError, "is_causal"),
        (lambda: na1d_qk(q, q, 3, stride=2), TypeError, "stride"),
        (lambda: na1d_av(a, v, 3, stride=1), TypeError, "stride"),
        (lambda: na1d_qk(q2, q2, 3), ValueError, "query"),
        (lambda: na2d_qk(q, q, 3), ValueError, "query"),
        (lambda: na1d_qk(q, jnp.zeros((1, 8, 3, 4)), 3), ValueError, "key"),
        (lambda: na1d_qk(q, jnp.zeros((1, 8, 2, 5)), 3), ValueError, "key"),
        (lambda: na1d_qk(q, jnp.zeros((1, 7, 2, 4)), 3), ValueError, "key"),
        (lambda: na1d_qk(q.astype(jnp.int32), q.astype(jnp.int32), 3), TypeError, "query"),
        (lambda: na1d_qk(q, q.astype(jnp.float32), 3), TypeError, "key"),
        (lambda: na1d_qk(np.zeros((1, 8, 2, 4)).tolist(), q, 3), TypeError, "query"),
        (lambda: na1d_qk(q, k1, 3, rpb=jnp.zeros((2, 3))), ValueError, "rpb"),
        (lambda: na1d_qk(q, k1, 3, rpb=jnp.zeros((1, 5))), ValueError, "rpb"),
        (lambda: na1d_qk(q, k1, 3, rpb=jnp.zeros((2, 5, 1))), ValueError, "rpb"),
        (lambda: na1d_qk(q, k1, 3, rpb=jnp.zeros((2, 5), jnp.int32)), TypeError, "rpb"),
        (lambda: na1d_qk(q, k1, 4, rpb=jnp.zeros((2, 7))), ValueError, "rpb"),
        (lambda: na1d_qk(q, k1, 3, is_causal=True, rpb=jnp.zeros((2, 5))),
         NotImplementedError, "rpb"),
        (lambda: na2d_qk(q2, q2, 3, is_causal=(False, True), rpb=jnp.zeros((2, 5, 5))),
         NotImplementedError, "rpb"),
        (lambda: na1d_av(a, v, 4), ValueError, "attn"),
        (lambda: na1d_av(a, v, (3, 3)), ValueError, "kernel_size"),
        (lambda: na1d_av(a, jnp.zeros((1, 8, 3, 5)), 3), ValueError, "value"),
        (lambda: na1d_av(a, jnp.zeros((1, 7, 1, 5)), 3), ValueError, "value"),
        (lambda: na1d_av(a[..., 0], v, 3), ValueError, "attn"),
        (lambda: na1d_av(a, v.astype(jnp.int32), 3), TypeError, "value"),
        (lambda: na1d_av(a, v, 3, dilation=(1, 1)), ValueError, "dilation"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_arguments(i):
    call, exc, name = _bad_calls()[i]
    with pytest.raises(exc, match=name):
        call()
