"""Head dims the fused kernels are not built at (32, 64, 128) run zero-padded to the next built
one (natten_jax.backends.fused.kernel_head_dim), and so do value head dims that differ from the
query's.

CPU tests check the padding around the reference backend standing in for the kernels: the
padded call hands the kernels built head dims only and equals the unpadded reference, outputs,
logsumexp and gradients, with GQA, additional keys and ragged batches. The GPU test runs the
kernels themselves at such head dims against the float64 reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natten_jax
from natten_jax import FusedConfig, autotune
from natten_jax.backends import fused, reference
from natten_jax.checks import check_na_call


def test_kernel_head_dim():
    f = fused.kernel_head_dim
    assert [f(d, d) for d in (8, 16, 32, 40, 48, 64, 72, 80, 96, 128)] == \
        [32, 32, 32, 64, 64, 64, 128, 128, 128, 128]
    assert f(64, 96) == f(96, 64) == 128 and f(24, 40) == 64
    assert f(136, 136) is None and f(64, 160) is None and f(256, 64) is None


def _problem(q, k, v, **kw):
    return check_na_call(2, q, k, v, (3, 5), 1, (1, 2), (False, True), None, **kw)


def test_can_run_takes_small_head_dims_and_names_the_limit(monkeypatch):
    monkeypatch.setattr(fused._ffi, "cuda_kernels_available", lambda: True)
    monkeypatch.setattr(fused._ffi, "default_platform", lambda: "cuda")
    monkeypatch.setattr(autotune, "sm90_runs", lambda: False)
    x = lambda d: jnp.zeros((1, 8, 10, 2, d), jnp.bfloat16)  # noqa: E731
    assert fused.can_run(_problem(x(80), x(80), x(80))) == (True, "")
    assert fused.can_run(_problem(x(48), x(48), x(96))) == (True, "")
    ok, why = fused.can_run(_problem(x(160), x(160), x(160)))
    assert not ok and "up to 128" in why and "160" in why


CASES = [  # q / k head dim, v head dim, heads, kv heads, extra tokens, ragged
    (80, 80, 4, 2, 0, False),
    (48, 96, 2, 1, 3, False),
    (20, 20, 2, 2, 0, True),
    (96, 40, 4, 1, 2, True),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_padded_call_equals_the_unpadded_reference(monkeypatch, case):
    d, dv, heads, heads_kv, extra, ragged = CASES[case]
    seen = []

    def kernels(p, q, k, v, valid_extent):  # the reference in place of the custom calls
        seen.append((p.head_dim, p.head_dim_v, q.shape[-1], k.shape[-1], v.shape[-1]))
        return reference.run(p, q, k, v, valid_extent=valid_extent)

    monkeypatch.setattr(fused, "_na_fused", kernels)
    keys = jax.random.split(jax.random.PRNGKey(case), 7)
    q = jax.random.normal(keys[0], (2, 8, 10, heads, d), jnp.float32)
    k = jax.random.normal(keys[1], (2, 8, 10, heads_kv, d), jnp.float32)
    v = jax.random.normal(keys[2], (2, 8, 10, heads_kv, dv), jnp.float32)
    g = jax.random.normal(keys[3], (2, 8, 10, heads, dv), jnp.float32)
    ek = jax.random.normal(keys[4], (2, extra, heads_kv, d), jnp.float32) if extra else None
    ev = jax.random.normal(keys[5], (2, extra, heads_kv, dv), jnp.float32) if extra else None
    ve = jnp.asarray([[8, 10], [5, 10]], jnp.int32) if ragged else None
    p = _problem(q, k, v, additional_keys=ek, additional_values=ev, valid_extent=ve,
                 precision="highest")

    def loss(run, q, k, v):
        out, lse = run(p, q, k, v, ek, ev, valid_extent=ve)
        return jnp.sum(out * g) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)

    (_, (out, lse)), grads = jax.value_and_grad(
        lambda *a: loss(fused.run, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, (out_r, lse_r)), grads_r = jax.value_and_grad(
        lambda *a: loss(reference.run, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    kd = fused.kernel_head_dim(d, dv)
    assert seen and all(s == (kd, kd, kd, kd, kd) for s in seen)
    assert out.shape == q.shape[:-1] + (dv,)
    np.testing.assert_allclose(out, out_r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, lse_r, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_r):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("d, dv", [(16, 16), (48, 48), (80, 80), (96, 96), (64, 96)])
def test_fused_kernels_at_padded_head_dims(d, dv):
    """The kernels (default configuration) at head dims they are not built at, forward and
    gradients, against the float64 reference per element; outputs poisoned (test_fused)."""
    from test_fused import check_forward, reference_forward
    from test_fused_backward import check_grads, fused_grads, reference_grads

    keys = jax.random.split(jax.random.PRNGKey(d + dv), 5)
    shape = (2, 13, 17)
    q = jax.random.normal(keys[0], shape + (4, d), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(keys[1], shape + (2, d), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(keys[2], shape + (2, dv), jnp.float32).astype(jnp.bfloat16)
    geo = ((5, 7), 1, (2, 1), (False, True))  # kernel, stride, dilation, causal
    call = jax.jit(lambda q, k, v: natten_jax.na2d(q, k, v, *geo, backend="fused",
                                                   return_lse=True))
    assert fused.TARGET in call.lower(q, k, v).as_text()  # the kernels, not a fallback
    out, lse = call(q, k, v)
    assert out.shape == q.shape[:-1] + (dv,)
    check_forward(out, lse, reference_forward(q, k, v, *geo), name=f"d={d} dv={dv}")
    dout = jax.random.normal(keys[3], out.shape, jnp.float32).astype(jnp.bfloat16)
    d_lse = jax.random.normal(keys[4], lse.shape, jnp.float32)
    got = fused_grads(q, k, v, dout, d_lse, *geo, config=FusedConfig())
    check_grads(got, reference_grads(q, k, v, dout, d_lse, *geo))
