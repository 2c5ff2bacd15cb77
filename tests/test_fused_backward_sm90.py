"""The sm90 (Hopper, wgmma) fused backward kernels against the float64 reference.

GPU tests (marked ``gpu``) run the case grid of ``test_fused_backward.py`` with
``NATTEN_JAX_FNA_BWD_IMPL=sm90`` (gradients poisoned: every element must be written), at the head
dims the kernels implement (64, 128), plus large problems (many Q boxes per key tile, more than
the pipeline's stages, GQA groups, causal and dilated windows) and a comparison with the sm80
kernels on a large 2-D problem. They skip where the GPU is not compute capability 9.0 or the
module lacks sm_90a code. The CPU tests check the switch (environment, custom-call attribute).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natten_jax
from natten_jax import autotune, tiles
from natten_jax.backends import fused
from natten_jax.checks import check_na_call
from test_fused import CASES, TOL, _inputs, _rel
from test_fused_backward import check_deterministic
from test_fused_backward import _ref_grads  # also sets fused.POISON_OUTPUTS
from test_fused_sm90 import _sm90_ready

BWD_ENV = tiles.BWD_IMPL_ENV


@pytest.fixture
def sm90_bwd(monkeypatch):
    ok, why = _sm90_ready()
    if not ok:
        pytest.skip(why)
    monkeypatch.setenv(fused.BACKWARD_ENV, "kernel")
    monkeypatch.setenv(BWD_ENV, "sm90")


def _grads(spatial, kernel, stride, dilation, causal, q, k, v, dout, d_lse):
    f = getattr(natten_jax, f"na{len(spatial)}d")

    def loss(q, k, v):
        out, lse = f(q, k, v, kernel, stride, dilation, causal, backend="fused", return_lse=True)
        return (jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32))
                + jnp.sum(lse * d_lse))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _check_grads(got, want, dtype, factor=2):
    for name, g, w in zip("qkv", got, want):
        g = np.asarray(g.astype(jnp.float32))
        assert np.isfinite(g).all(), f"d{name}: unwritten or non-finite elements"
        assert _rel(g, w) < factor * TOL[dtype], (name, _rel(g, w))


def _cotangents(seed, q):
    kd, kl = jax.random.split(jax.random.PRNGKey(seed))
    dout = jax.random.normal(kd, q.shape, jnp.float32).astype(q.dtype)
    d_lse = jax.random.normal(kl, q.shape[:-1], jnp.float32)
    return dout, d_lse


# ---------------------------------------------------------------------------------------------
# GPU: correctness


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_backward_sm90_matches_reference(sm90_bwd, case, dtype):
    spatial, kernel, stride, dilation, causal = CASES[case]
    D = (64, 128)[case % 2]
    H, Hkv = [(4, 4), (4, 2), (4, 1)][case % 3]
    q, k, v = _inputs(jax.random.PRNGKey(2000 + case), spatial, 2, H, Hkv, D, dtype)
    p = check_na_call(len(spatial), q, k, v, kernel, stride, dilation, causal, None)
    assert fused._attrs(p, backward=True)["impl"] == tiles.impl_code("sm90")
    dout, d_lse = _cotangents(3000 + case, q)
    got = _grads(spatial, kernel, stride, dilation, causal, q, k, v, dout, d_lse)
    want = _ref_grads(q, k, v, dout, d_lse, spatial, kernel, stride, dilation, causal)
    _check_grads(got, want, dtype)


# Many Q boxes per key tile (more than the stages of the pipeline, odd counts so that the two
# consumer warpgroups get unequal shares), many KV boxes per Q tile, GQA groups of 4, causal and
# dilated windows, partial tiles, every rank.
LARGE = [
    ((1500,), 301, 1, 1, False),
    ((1200,), 200, 1, 2, True),
    ((60, 72), (23, 31), (1, 1), (1, 1), (False, False)),
    ((40, 64), (13, 17), (2, 1), (2, 3), (True, False)),
    ((10, 24, 24), (5, 9, 9), (1, 1, 1), (1, 1, 1), (True, False, False)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", range(len(LARGE)))
def test_backward_sm90_large_windows(sm90_bwd, case, D):
    spatial, kernel, stride, dilation, causal = LARGE[case]
    q, k, v = _inputs(jax.random.PRNGKey(300 + case), spatial, 1, 4, 1, D, "bfloat16")
    dout, d_lse = _cotangents(400 + case, q)
    got = _grads(spatial, kernel, stride, dilation, causal, q, k, v, dout, d_lse)
    want = _ref_grads(q, k, v, dout, d_lse, spatial, kernel, stride, dilation, causal)
    _check_grads(got, want, "bfloat16")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_backward_sm90_matches_sm80_large_2d(sm90_bwd, dtype):
    """Same forward, same tiles, both backward kernels: equal up to accumulation order."""
    spatial, kernel = (96, 112), (21, 17)
    q, k, v = _inputs(jax.random.PRNGKey(7), spatial, 2, 8, 2, 128, dtype)
    p = check_na_call(2, q, k, v, kernel, 1, 1, False, None)
    out, lse = fused._forward_call(p, q, k, v, impl="sm80")
    dout, d_lse = _cotangents(8, q)
    delta = (jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
             - d_lse.astype(jnp.float32))
    a = fused._backward_call(p, q, k, v, dout, lse, delta, impl="sm80")
    b = fused._backward_call(p, q, k, v, dout, lse, delta, impl="sm90")
    for name, x, y in zip("qkv", a, b):
        x = np.asarray(x.astype(jnp.float32))
        y = np.asarray(y.astype(jnp.float32))
        assert np.isfinite(y).all(), f"d{name}: unwritten or non-finite elements"
        assert _rel(y, x) < TOL[dtype] / 2, (name, _rel(y, x))


@pytest.mark.gpu
def test_backward_sm90_is_deterministic(sm90_bwd):
    check_deterministic()


@pytest.mark.gpu
def test_backward_sm90_head_dim_32_runs_sm80(sm90_bwd):
    q, k, v = _inputs(jax.random.PRNGKey(6), (20, 20), 1, 2, 2, 32, "float16")
    p = check_na_call(2, q, k, v, 5, 1, 1, False, None)
    assert fused._attrs(p, backward=True)["impl"] == tiles.impl_code("sm80")
    dout, d_lse = _cotangents(9, q)
    got = _grads((20, 20), 5, 1, 1, False, q, k, v, dout, d_lse)
    want = _ref_grads(q, k, v, dout, d_lse, (20, 20), 5, 1, 1, False)
    _check_grads(got, want, "float16")


# ---------------------------------------------------------------------------------------------
# CPU: the switch


def _problem(D=64):
    q = np.zeros((1, 12, 10, 2, D), np.float32)
    return check_na_call(2, q, q, q, (5, 3), 1, 1, False, None)


def test_bwd_impl_setting(monkeypatch):
    monkeypatch.delenv(BWD_ENV, raising=False)
    assert tiles.bwd_impl_setting() == "auto"
    for s in ("sm80", " SM90 ", "Auto"):
        monkeypatch.setenv(BWD_ENV, s)
        assert tiles.bwd_impl_setting() == s.strip().lower()
    for bad in ("sm100", "fast"):
        monkeypatch.setenv(BWD_ENV, bad)
        with pytest.raises(ValueError, match=BWD_ENV):
            tiles.bwd_impl_setting()
    monkeypatch.setenv(BWD_ENV, "sm90")
    assert [autotune.bwd_impl(d) for d in (32, 64, 128)] == ["sm80", "sm90", "sm90"]
    monkeypatch.setattr(autotune, "sm90_runs", lambda: False)
    assert [autotune.bwd_impl(d) for d in (32, 64, 128)] == ["sm80", "sm90", "sm90"]
    for s in ("auto", ""):  # the default: sm90 where it runs
        monkeypatch.setenv(BWD_ENV, s)
        assert [autotune.bwd_impl(d) for d in (32, 64, 128)] == ["sm80"] * 3
        monkeypatch.setattr(autotune, "sm90_runs", lambda: True)
        assert [autotune.bwd_impl(d) for d in (32, 64, 128)] == ["sm80", "sm90", "sm90"]
        monkeypatch.setattr(autotune, "sm90_runs", lambda: False)
    monkeypatch.setenv(BWD_ENV, "sm80")
    monkeypatch.setattr(autotune, "sm90_runs", lambda: True)
    assert [autotune.bwd_impl(d) for d in (32, 64, 128)] == ["sm80"] * 3


def test_backward_attrs_carry_bwd_impl(monkeypatch):
    p = _problem()
    monkeypatch.setenv(BWD_ENV, "sm80")
    monkeypatch.setenv(tiles.IMPL_ENV, "sm90")  # the forward's switch does not move the backward
    assert fused._attrs(p, backward=True)["impl"] == 0
    monkeypatch.setenv(BWD_ENV, "sm90")
    assert fused._attrs(p, backward=True)["impl"] == 1
    assert fused._attrs(p, ((3, 3), (3, 3)), backward=True)["impl"] == 1
    assert fused._attrs(p, backward=True, impl="sm80")["impl"] == 0
    monkeypatch.setenv(tiles.IMPL_ENV, "sm80")
    assert fused._attrs(p)["impl"] == 0  # and the backward's does not move the forward
    assert fused._attrs(_problem(32), backward=True)["impl"] == 0
