"""merge_attentions: attention over disjoint key sets, combined through logsumexps, equals
attention over their union (float64, against direct dense attention)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import natten_jax
from natten_jax.backends import fused
from natten_jax.checks import check_na_call


def dense(q, k, v):
    """Attention of q [B, L, H, D] over k, v [B, N, H, D] -> (out, lse), float64."""
    s = jnp.einsum("blhd,bnhd->blhn", q, k) * q.shape[-1] ** -0.5
    lse = jax.nn.logsumexp(s, axis=-1)
    return jnp.einsum("blhn,bnhd->blhd", jnp.exp(s - lse[..., None]), v), lse


def rand(key, shape, dtype=jnp.float64):
    return jax.random.normal(jax.random.PRNGKey(key), shape, dtype)


@pytest.mark.parametrize("parts", [2, 3])
def test_merge_equals_attention_over_the_union(parts):
    q = rand(0, (2, 5, 3, 8))
    k, v = rand(1, (2, 12 * parts, 3, 8)), rand(2, (2, 12 * parts, 3, 8))
    pieces = [dense(q, k[:, 12 * i:12 * (i + 1)], v[:, 12 * i:12 * (i + 1)]) for i in range(parts)]
    out, lse = natten_jax.merge_attentions([p[0] for p in pieces], [p[1] for p in pieces])
    want, want_lse = dense(q, k, v)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-12)
    assert out.dtype == jnp.float64


def test_neighborhood_with_extra_tokens_is_the_merge_of_its_parts():
    """na1d with additional keys = merge of na1d(return_lse) and dense attention on the extras."""
    q, k, v = rand(3, (1, 16, 2, 8)), rand(4, (1, 16, 2, 8)), rand(5, (1, 16, 2, 8))
    ek, ev = rand(6, (1, 4, 2, 8)), rand(7, (1, 4, 2, 8))
    na, na_lse = natten_jax.na1d(q, k, v, 5, return_lse=True, backend="reference")
    ex, ex_lse = dense(q, ek, ev)
    out, lse = natten_jax.merge_attentions([na, ex], [na_lse, ex_lse])
    want, want_lse = natten_jax.na1d(q, k, v, 5, additional_keys=ek, additional_values=ev,
                                     return_lse=True, backend="reference")
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-12)


def test_fused_backend_merges_its_extra_tokens_exactly():
    """The fused backend's merge of the window with dense attention over the extra tokens
    (no kernel involved: fed the reference's window attention) equals the reference with extras,
    grouped-query heads included."""
    q, k, v = rand(18, (1, 16, 4, 8), jnp.float32), rand(19, (1, 16, 2, 8)), rand(20, (1, 16, 2, 8))
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    ek, ev = rand(21, (1, 3, 2, 8), jnp.float32), rand(22, (1, 3, 2, 8), jnp.float32)
    p = check_na_call(1, q, k, v, 5, 1, 1, False, None, ek, ev)
    na, na_lse = natten_jax.na1d(q, k, v, 5, return_lse=True, backend="reference")
    out, lse = fused._merge_extra(p, q, na, na_lse, ek, ev)
    want, want_lse = natten_jax.na1d(q, k, v, 5, additional_keys=ek, additional_values=ev,
                                     return_lse=True, backend="reference")
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
    assert out.dtype == jnp.float32


def test_a_query_with_no_keys_anywhere_gets_zero_and_finite_gradients():
    o1, o2 = rand(8, (1, 3, 2, 4)), rand(9, (1, 3, 2, 4))
    l1 = jnp.array([[[0.5, -jnp.inf], [1.0, 2.0], [-jnp.inf, -jnp.inf]]])
    l2 = jnp.array([[[-jnp.inf, 0.3], [0.0, -jnp.inf], [-jnp.inf, -jnp.inf]]])
    out, lse = natten_jax.merge_attentions([o1, o2], [l1, l2])
    np.testing.assert_array_equal(out[0, 2], 0.0)
    assert np.all(np.isneginf(lse[0, 2]))
    np.testing.assert_allclose(out[0, 0, 0], o1[0, 0, 0], rtol=1e-12)  # only part 1 saw keys
    np.testing.assert_allclose(out[0, 0, 1], o2[0, 0, 1], rtol=1e-12)  # only part 2
    g = jax.grad(lambda a, b, x, y: jnp.sum(natten_jax.merge_attentions([a, b], [x, y])[0]),
                 argnums=(0, 1, 2, 3))(o1, o2, l1, l2)
    assert all(np.all(np.isfinite(gi)) for gi in g)


def test_gradients_match_finite_differences():
    o1, o2 = rand(10, (1, 2, 2, 3)), rand(11, (1, 2, 2, 3))
    l1, l2 = rand(12, (1, 2, 2)), rand(13, (1, 2, 2))
    check_grads(lambda a, b, x, y: natten_jax.merge_attentions([a, b], [x, y]),
                (o1, o2, l1, l2), order=2, modes=("rev",))


def test_low_precision_outputs_keep_their_dtype_and_lse_is_float32():
    o = rand(14, (1, 4, 2, 8), jnp.bfloat16)
    l = rand(15, (1, 4, 2), jnp.float32)
    out, lse = natten_jax.merge_attentions([o, o], [l, l])
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(lse), np.asarray(l) + np.log(2.0), rtol=1e-6)


def test_bad_arguments_name_them():
    o, l = rand(16, (1, 4, 2, 8)), rand(17, (1, 4, 2))
    with pytest.raises(ValueError, match="outputs: need at least two"):
        natten_jax.merge_attentions([o], [l])
    with pytest.raises(ValueError, match="lses: need one logsumexp per output"):
        natten_jax.merge_attentions([o, o], [l])
    with pytest.raises(ValueError, match=r"outputs\[1\] has shape"):
        natten_jax.merge_attentions([o, o[:, :2]], [l, l])
    with pytest.raises(ValueError, match=r"lses\[1\] has shape"):
        natten_jax.merge_attentions([o, o], [l, l[..., :1]])
