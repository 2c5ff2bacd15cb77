"""The fused backend follows its problem's config (CPU: lowered programs, no kernel runs)."""

import jax
import jax.numpy as jnp
import numpy as np

from natten_jax.backends import fused
from natten_jax.checks import check_na_call
from natten_jax.config import FusedConfig
from natten_jax.reference import na_reference


def _operands(seed=0, shape=(1, 12, 10, 2, 32), dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q, k, v, dout = (jax.random.normal(kk, shape, dtype) for kk in keys[:4])
    dlse = jax.random.normal(keys[4], shape[:-1], jnp.float32)
    return q, k, v, dout, dlse


def _problem(q, cfg):
    return check_na_call(2, q, q, q, (5, 3), 1, (1, 2), (False, True), None, backend_config=cfg)


def _bwd(p, q, k, v, dout, dlse):
    out, lse = na_reference(p, q, k, v)  # the forward's residuals (the kernel's, on a GPU)
    return fused._na_fused_bwd(p, (q, k, v, None, out, lse), (dout, dlse))[:3]  # no valid_extent


def test_backward_kind_comes_from_the_config():
    q, k, v, dout, dlse = _operands()
    ref_cfg, kernel_cfg = FusedConfig(backward="reference"), FusedConfig(backward="kernel")
    # "reference": the reference backend's VJP, computed here on the CPU
    got = _bwd(_problem(q, ref_cfg), q, k, v, dout, dlse)
    _, vjp = jax.vjp(lambda q, k, v: na_reference(_problem(q, ref_cfg), q, k, v), q, k, v)
    for g, w in zip(got, vjp((dout, dlse))):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
    # "kernel": the backward custom call; "reference": none
    texts = {}
    for cfg in (ref_cfg, kernel_cfg):
        f = jax.jit(lambda *a, cfg=cfg: _bwd(_problem(a[0], cfg), *a))
        texts[cfg.backward] = f.lower(q, k, v, dout, dlse).as_text()
    assert fused.TARGET_BACKWARD in texts["kernel"]
    assert fused.TARGET_BACKWARD not in texts["reference"]


def test_backward_impl_comes_from_the_config():
    q, k, v, dout, dlse = _operands(shape=(1, 12, 10, 2, 64), dtype=jnp.float16)
    impls = {}
    for impl in ("sm80", "sm90"):
        cfg = FusedConfig(backward_impl=impl, forward_impl="sm80")
        text = jax.jit(lambda *a, cfg=cfg: _bwd(_problem(a[0], cfg), *a)).lower(
            q, k, v, dout, dlse).as_text()
        line = next(x for x in text.splitlines() if f"@{fused.TARGET_BACKWARD}" in x)
        impls[impl] = line
        assert "sm80_occupancy" not in line  # a forward-only attribute
    assert "impl = 0 : i64" in impls["sm80"] and "impl = 1 : i64" in impls["sm90"]
