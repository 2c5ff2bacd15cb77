"""The sm90 (Hopper, wgmma) fused backward kernels against the float64 reference, per element.

GPU tests (marked ``gpu``) run the case grid of ``test_fused_backward.py`` with
``FusedConfig(backward="kernel", backward_impl="sm90")`` (gradients poisoned: every element must
be written), at the head dims the kernels implement (64, 128), plus large problems (many Q boxes
per key tile, more than the pipeline's stages, GQA groups, causal and dilated windows) and the
sm80 kernels on the same large 2-D problem, each element within the rule of
``test_fused_backward.py``. They skip where the GPU is not compute capability 9.0 or the module
lacks sm_90a code. The CPU test checks which backward kernel a configuration selects.
"""

import jax
import jax.numpy as jnp
import pytest

from natten_jax import FusedConfig, autotune, tiles
from natten_jax.backends import fused
from natten_jax.checks import check_na_call
from test_fused import CASES, _inputs
from test_fused_backward import (check_deterministic, check_grads, cotangents,  # POISON_OUTPUTS
                                 fused_grads, reference_grads)
from test_fused_sm90 import _sm90_ready

SM90_BWD = FusedConfig(backward="kernel", backward_impl="sm90")


@pytest.fixture
def sm90_bwd():
    ok, why = _sm90_ready()
    if not ok:
        pytest.skip(why)


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
    p = check_na_call(len(spatial), q, k, v, kernel, stride, dilation, causal, None,
                      backend_config=SM90_BWD)
    assert fused._attrs(p, backward=True)["impl"] == tiles.impl_code("sm90")
    dout, d_lse = cotangents(3000 + case, q)
    got = fused_grads(q, k, v, dout, d_lse, kernel, stride, dilation, causal, config=SM90_BWD)
    check_grads(got, reference_grads(q, k, v, dout, d_lse, kernel, stride, dilation, causal))


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
    dout, d_lse = cotangents(400 + case, q)
    got = fused_grads(q, k, v, dout, d_lse, kernel, stride, dilation, causal, config=SM90_BWD)
    check_grads(got, reference_grads(q, k, v, dout, d_lse, kernel, stride, dilation, causal))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_backward_sm90_and_sm80_large_2d(sm90_bwd, dtype):
    """Same forward, same tiles, both backward kernels: each gradient within the rule."""
    spatial, kernel = (96, 112), (21, 17)
    q, k, v = _inputs(jax.random.PRNGKey(7), spatial, 1, 8, 2, 128, dtype)
    p = check_na_call(2, q, k, v, kernel, 1, 1, False, None, backend_config=FusedConfig())
    out, lse = fused._forward_call(p, q, k, v, impl="sm80")
    dout, d_lse = cotangents(8, q)
    delta = (jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
             - d_lse.astype(jnp.float32))
    refs = reference_grads(q, k, v, dout, d_lse, kernel)
    for impl in ("sm80", "sm90"):
        got = fused._backward_call(p, q, k, v, dout, lse, delta, impl=impl)
        check_grads(got, refs, names=tuple(f"{impl} {n}" for n in ("dq", "dk", "dv")))


@pytest.mark.gpu
def test_backward_sm90_is_deterministic(sm90_bwd):
    check_deterministic(SM90_BWD)


@pytest.mark.gpu
def test_backward_sm90_head_dim_32_runs_sm80(sm90_bwd):
    q, k, v = _inputs(jax.random.PRNGKey(6), (20, 20), 1, 2, 2, 32, "float16")
    p = check_na_call(2, q, k, v, 5, 1, 1, False, None, backend_config=SM90_BWD)
    assert fused._attrs(p, backward=True)["impl"] == tiles.impl_code("sm80")
    dout, d_lse = cotangents(9, q)
    got = fused_grads(q, k, v, dout, d_lse, 5, config=SM90_BWD)
    check_grads(got, reference_grads(q, k, v, dout, d_lse, 5))


# ---------------------------------------------------------------------------------------------
# CPU: which backward kernel a configuration selects


def test_bwd_impl(monkeypatch):
    head_dims = (32, 64, 128)
    for runs in (True, False):  # an explicit sm90 does not depend on where it runs
        monkeypatch.setattr(autotune, "sm90_runs", lambda: runs)
        assert [autotune.bwd_impl(d, SM90_BWD) for d in head_dims] == ["sm80", "sm90", "sm90"]
        sm80 = FusedConfig(backward_impl="sm80")
        assert [autotune.bwd_impl(d, sm80) for d in head_dims] == ["sm80"] * 3
    auto = FusedConfig(backward_impl="auto")  # the default: sm90 where it runs
    assert [autotune.bwd_impl(d, auto) for d in head_dims] == ["sm80"] * 3
    monkeypatch.setattr(autotune, "sm90_runs", lambda: True)
    assert [autotune.bwd_impl(d, auto) for d in head_dims] == ["sm80", "sm90", "sm90"]
    # the forward's setting does not move the backward's
    assert autotune.bwd_impl(64, FusedConfig(backward_impl="sm80", forward_impl="sm90")) == \
        "sm80"
