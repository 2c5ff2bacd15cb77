"""Fused (FNA) backward kernels vs the reference backend's VJP on the GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natten_jax
from natten_jax.backends import fused
from natten_jax.checks import check_na_call
from natten_jax.reference import na_reference

from test_fused import CASES, TOL, _inputs, _rel

pytestmark = pytest.mark.gpu
fused.POISON_OUTPUTS = True  # every gradient element must be written by the kernels


def _ref_grads(q, k, v, dout, d_lse, spatial, kernel, stride, dilation, causal, scale=None):
    f64 = lambda x: x.astype(jnp.float64)  # noqa: E731
    p = check_na_call(len(spatial), f64(q), f64(k), f64(v), kernel, stride, dilation, causal,
                      scale)
    _, vjp = jax.vjp(lambda q, k, v: na_reference(p, q, k, v), f64(q), f64(k), f64(v))
    return vjp((f64(dout), f64(d_lse)))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_backward_kernel_matches_reference(case, dtype, monkeypatch):
    monkeypatch.setenv(fused.BACKWARD_ENV, "kernel")
    spatial, kernel, stride, dilation, causal = CASES[case]
    D = (32, 64, 128)[case % 3]
    H, Hkv = [(4, 4), (4, 2), (4, 1)][case % 3]
    q, k, v = _inputs(jax.random.PRNGKey(2000 + case), spatial, 2, H, Hkv, D, dtype)
    kd, kl = jax.random.split(jax.random.PRNGKey(3000 + case))
    dout = jax.random.normal(kd, q.shape, jnp.float32).astype(dtype)
    d_lse = jax.random.normal(kl, q.shape[:-1], jnp.float32)
    f = getattr(natten_jax, f"na{len(spatial)}d")

    def loss(q, k, v):
        out, lse = f(q, k, v, kernel, stride, dilation, causal, backend="fused", return_lse=True)
        return (jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32))
                + jnp.sum(lse * d_lse))

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    want = _ref_grads(q, k, v, dout, d_lse, spatial, kernel, stride, dilation, causal)
    for name, g, w in zip("qkv", got, want):
        g = np.asarray(g.astype(jnp.float32))
        assert np.isfinite(g).all(), f"d{name}: unwritten or non-finite elements"
        assert _rel(g, w) < 2 * TOL[dtype], (name, _rel(g, w))


def test_backward_kernel_under_vmap_and_extra_tokens(monkeypatch):
    monkeypatch.setenv(fused.BACKWARD_ENV, "kernel")
    spatial, kernel = (12, 14), (5, 3)
    q, k, v = _inputs(jax.random.PRNGKey(11), spatial, 2, 4, 2, 64, "bfloat16")
    ek = jax.random.normal(jax.random.PRNGKey(12), (2, 3, 2, 64)).astype(jnp.bfloat16)
    ev = jax.random.normal(jax.random.PRNGKey(13), (2, 3, 2, 64)).astype(jnp.bfloat16)

    def loss(backend):
        def f(q, k, v, ek, ev):
            out = natten_jax.na2d(q, k, v, kernel, additional_keys=ek, additional_values=ev,
                                  backend=backend)
            return jnp.sum(out.astype(jnp.float32) ** 2)
        return f

    got = jax.grad(loss("fused"), argnums=(0, 1, 2, 3, 4))(q, k, v, ek, ev)
    f64 = lambda x: x.astype(jnp.float64)  # noqa: E731
    want = jax.grad(loss("reference"), argnums=(0, 1, 2, 3, 4))(f64(q), f64(k), f64(v), f64(ek),
                                                                f64(ev))
    for g, w in zip(got, want):
        assert _rel(g.astype(jnp.float32), w) < 3e-2
    qs = jnp.stack([q, q[::-1]])
    gv = jax.vmap(jax.grad(lambda q: loss("fused")(q, k, v, ek, ev)))(qs)
    g0 = jax.grad(lambda q: loss("fused")(q, k, v, ek, ev))(q)
    np.testing.assert_allclose(np.asarray(gv[0], np.float32), np.asarray(g0, np.float32),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("case", [0, 5, 7, 11])
def test_float32_runs_fp16_kernels_forward_and_backward(case):
    """float32 inputs: fp16 kernels (TF32-like accuracy, module docstring of backends.fused);
    tiny cotangents (1e-9) must not underflow in the backward's float16 dO."""
    spatial, kernel, stride, dilation, causal = CASES[case]
    q, k, v = _inputs(jax.random.PRNGKey(4000 + case), spatial, 2, 4, 2, 64, "float32")
    dout = 1e-9 * jax.random.normal(jax.random.PRNGKey(4100 + case), q.shape, jnp.float32)
    f = getattr(natten_jax, f"na{len(spatial)}d")
    call = lambda q, k, v: f(q, k, v, kernel, stride, dilation, causal,  # noqa: E731
                             backend="fused")
    out, vjp = jax.vjp(jax.jit(call), q, k, v)
    assert out.dtype == jnp.float32
    got = vjp(dout)
    p = check_na_call(len(spatial), q, k, v, kernel, stride, dilation, causal, None)
    f64 = lambda x: x.astype(jnp.float64)  # noqa: E731
    ref_out, ref_vjp = jax.vjp(lambda q, k, v: na_reference(p, q, k, v)[0], f64(q), f64(k),
                               f64(v))
    assert _rel(np.asarray(out), ref_out) < 2e-3, _rel(np.asarray(out), ref_out)
    for name, g, w in zip("qkv", got, ref_vjp(f64(dout))):
        assert g.dtype == jnp.float32
        assert _rel(np.asarray(g), w) < 5e-3, (name, _rel(np.asarray(g), w))


def test_backward_is_deterministic():
    check_deterministic()


def check_deterministic():
    """Two calls of the fused gradient give bitwise-equal results (under whatever backward the
    environment selects; tests/test_fused_backward_sm90.py forces the sm90 kernels)."""
    q, k, v = _inputs(jax.random.PRNGKey(21), (24, 40), 2, 4, 1, 128, "bfloat16")
    g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
        natten_jax.na2d(q, k, v, (7, 9), backend="fused").astype(jnp.float32) ** 3),
        argnums=(0, 1, 2)))
    a, b = g(q, k, v), g(q, k, v)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_backward_under_checkpoint_runs_the_kernels():
    q, k, v = _inputs(jax.random.PRNGKey(22), (6, 8, 10), 1, 2, 2, 64, "float16")

    def loss(backend):
        @jax.checkpoint
        def block(q, k, v):
            return natten_jax.na3d(q, k, v, (3, 5, 3), backend=backend)
        return lambda q, k, v: jnp.sum(block(q, k, v).astype(jnp.float32) ** 2)

    grad = jax.jit(jax.grad(loss("fused"), argnums=(0, 1, 2)))
    hlo = grad.lower(q, k, v).as_text()
    assert fused.TARGET_BACKWARD in hlo
    got = grad(q, k, v)
    f64 = lambda x: x.astype(jnp.float64)  # noqa: E731
    want = jax.grad(loss("reference"), argnums=(0, 1, 2))(f64(q), f64(k), f64(v))
    for g, w in zip(got, want):
        assert _rel(np.asarray(g.astype(jnp.float32)), w) < 2e-2
