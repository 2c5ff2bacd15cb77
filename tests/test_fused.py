"""Fused (FNA) forward kernel vs the reference backend on the GPU."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natten_jax
from natten_jax.backends import fused
from natten_jax.checks import check_na_call
from natten_jax.reference import na_reference
from natten_jax.tiles import _candidates

pytestmark = pytest.mark.gpu
fused.POISON_OUTPUTS = True  # every output element must be written by the kernel

TOL = {"bfloat16": 1.5e-2, "float16": 4e-3}

# (spatial, kernel, stride, dilation, causal)
CASES = [
    ((100,), 7, 1, 1, False),
    ((257,), 64, 1, 1, False),
    ((300,), 33, 4, 3, True),
    ((64,), 64, 1, 1, False),
    ((1000,), 17, 5, 2, False),
    ((17, 23), (5, 7), (2, 3), (2, 1), (True, False)),
    ((32, 32), 8, 1, 1, False),
    ((40, 33), 11, 1, 3, False),
    ((9, 70), (9, 31), (1, 1), (1, 2), (False, True)),
    ((31, 29), (6, 4), (3, 2), (1, 1), (False, False)),
    ((6, 10, 12), (3, 5, 4), (1, 2, 2), (2, 1, 3), (True, False, False)),
    ((8, 16, 16), 7, 1, 1, False),
    ((5, 9, 20), (2, 3, 6), (2, 3, 1), (2, 3, 3), (False, True, True)),
]


def _inputs(key, spatial, B, H, Hkv, D, dtype):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (B, *spatial, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, *spatial, Hkv, D), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, *spatial, Hkv, D), jnp.float32).astype(dtype)
    return q, k, v


def _rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _check(q, k, v, out, lse, spatial, kernel, stride, dilation, causal, dtype, scale=None):
    rank = len(spatial)
    p64 = check_na_call(rank, q.astype(jnp.float64), k.astype(jnp.float64),
                        v.astype(jnp.float64), kernel, stride, dilation, causal, scale)
    ref, ref_lse = na_reference(p64, q.astype(jnp.float64), k.astype(jnp.float64),
                                v.astype(jnp.float64))
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all(), "unwritten or non-finite output elements"
    assert np.isfinite(np.asarray(lse)).all(), "unwritten or non-finite lse elements"
    assert _rel(out, ref) < TOL[dtype], _rel(out, ref)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=2e-2, rtol=2e-3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_matches_reference(case, dtype):
    spatial, kernel, stride, dilation, causal = CASES[case]
    rank = len(spatial)
    D = (32, 64, 128)[case % 3]
    H, Hkv = [(4, 4), (4, 2), (4, 1)][case % 3]
    key = jax.random.PRNGKey(1000 + case)
    q, k, v = _inputs(key, spatial, 2, H, Hkv, D, dtype)
    f = getattr(natten_jax, f"na{rank}d")
    out, lse = jax.jit(lambda q, k, v: f(q, k, v, kernel, stride, dilation, causal,
                                         backend="fused", return_lse=True))(q, k, v)
    _check(q, k, v, out, lse, spatial, kernel, stride, dilation, causal, dtype)


@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_every_tile_shape(rank, head_dim):
    """Each legal (Q tile, KV tile) shape gives the same answer (tile choice is a tuning knob;
    head dim 32 also skips 16-key chunks, whose shape follows the KV tile's)."""
    spatial = {1: (150,), 2: (21, 19), 3: (7, 9, 11)}[rank]
    kernel = {1: 13, 2: (5, 6), 3: (3, 4, 5)}[rank]
    dilation = {1: 2, 2: (1, 2), 3: (2, 1, 1)}[rank]
    q, k, v = _inputs(jax.random.PRNGKey(rank), spatial, 1, 2, 1, head_dim, "bfloat16")
    p = check_na_call(rank, q, k, v, kernel, 1, dilation, False, None)
    q_cands = _candidates(rank, 6) + _candidates(rank, 7)
    rng = np.random.default_rng(rank)
    pairs = list(itertools.product(q_cands, _candidates(rank, 6)))
    picks = [pairs[i] for i in rng.choice(len(pairs), size=min(len(pairs), 16), replace=False)]
    # every KV tile shape once more, with a random Q tile (the chunk shapes follow the KV tile)
    picks += [(q_cands[rng.integers(len(q_cands))], kt) for kt in _candidates(rank, 6)]
    for qt, kt in picks:
        out, lse = fused._forward_call(p, q, k, v, tiles=(qt, kt))
        _check(q, k, v, out, lse, spatial, kernel, 1, dilation, False, "bfloat16")


def test_scale_extra_tokens_and_vmap():
    spatial, kernel = (12, 14), (5, 3)
    q, k, v = _inputs(jax.random.PRNGKey(7), spatial, 2, 4, 2, 64, "bfloat16")
    ek = jax.random.normal(jax.random.PRNGKey(8), (2, 5, 2, 64)).astype(jnp.bfloat16)
    ev = jax.random.normal(jax.random.PRNGKey(9), (2, 5, 2, 64)).astype(jnp.bfloat16)
    out, lse = natten_jax.na2d(q, k, v, kernel, scale=0.3, additional_keys=ek,
                               additional_values=ev, backend="fused", return_lse=True)
    f64 = lambda x: x.astype(jnp.float64)  # noqa: E731
    ref, ref_lse = natten_jax.na2d(f64(q), f64(k), f64(v), kernel, scale=0.3,
                                   additional_keys=f64(ek), additional_values=f64(ev),
                                   backend="reference", return_lse=True)
    assert _rel(out.astype(jnp.float32), ref) < TOL["bfloat16"]
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=2e-2)
    # vmap over an extra leading axis folds into batch.
    qs, ks_, vs = (jnp.stack([x, x[::-1]]) for x in (q, k, v))
    outs = jax.vmap(lambda q, k, v: natten_jax.na2d(q, k, v, kernel, backend="fused"))(qs, ks_, vs)
    for i in range(2):
        one = natten_jax.na2d(qs[i], ks_[i], vs[i], kernel, backend="fused")
        np.testing.assert_array_equal(np.asarray(outs[i]), np.asarray(one))


def test_default_backend_is_fused_on_gpu():
    q, k, v = _inputs(jax.random.PRNGKey(3), (16, 16), 1, 2, 2, 32, "float16")
    p = check_na_call(2, q, k, v, 5, 1, 1, False, None)
    assert fused.can_run(p)[0]
    a = natten_jax.na2d(q, k, v, 5)
    b = natten_jax.na2d(q, k, v, 5, backend="fused")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unsupported_raises_with_reason():
    q, k, v = _inputs(jax.random.PRNGKey(4), (16,), 1, 2, 2, 48, "bfloat16")
    with pytest.raises(NotImplementedError, match="head_dim"):
        natten_jax.na1d(q, k, v, 5, backend="fused")
    q32 = q.astype(jnp.float32)
    assert natten_jax.na1d(q32, k.astype(jnp.float32), v.astype(jnp.float32), 5).shape == q.shape


def test_grad_through_fused_matches_reference():
    q, k, v = _inputs(jax.random.PRNGKey(5), (10, 12), 1, 2, 1, 32, "float16")
    loss = lambda b: lambda q, k, v: jnp.sum(  # noqa: E731
        natten_jax.na2d(q, k, v, 3, dilation=2, backend=b).astype(jnp.float32) ** 2)
    g1 = jax.grad(loss("fused"), argnums=(0, 1, 2))(q, k, v)
    g2 = jax.grad(loss("reference"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g1, g2):
        assert _rel(a.astype(jnp.float32), b.astype(jnp.float32)) < 2e-2
