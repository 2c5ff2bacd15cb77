"""The fused backward, sm80 kernels, against the float64 reference's VJP, per element.

GPU tests (marked ``gpu``) force the sm80 backward kernels (``FusedConfig(backward="kernel",
backward_impl="sm80")``; tests/test_fused_backward_sm90.py runs the sm90 ones) with gradients
poisoned, and compare dQ, dK and dV element by element with FlashAttention's rule
(:func:`oracle.assert_close_to_ref64`) against the reference backend's VJP on the CPU in float64
and in the kernels' precision. Determinism: two separately compiled executables give bitwise
equal gradients.

CPU tests check the rule on the backward: an emulation of a correct kernel's arithmetic (P and
dS rounded to the input precision before their products, delta from the rounded output) passes
it, and the emulation with a wrong neighbourhood fails it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natten_jax
import oracle
from natten_jax.backends import fused
from test_fused import (CASES, CPU, EMULATED, SM80, _inputs, check_forward_case,
                        emulated_inputs, flash_like_forward, lowp_dtype, on_cpu, one_key_wrong)

fused.POISON_OUTPUTS = True  # every gradient element must be written by the kernels


def cotangents(seed, q):
    """Random cotangents of the output (q's dtype) and of the logsumexp (float32)."""
    kd, kl = jax.random.split(jax.random.PRNGKey(seed))
    dout = jax.random.normal(kd, q.shape, jnp.float32).astype(q.dtype)
    d_lse = jax.random.normal(kl, q.shape[:-1], jnp.float32)
    return dout, d_lse


def _vjp(f, args, dout, d_lse):
    """Gradients of <out, dout> + <lse, d_lse> of ``f(*args) -> (out, lse)``."""
    (out, lse), vjp = jax.vjp(f, *args)
    return vjp((jnp.asarray(dout).astype(out.dtype), jnp.asarray(d_lse).astype(lse.dtype)))


def reference_grads(q, k, v, dout, d_lse, kernel, stride=1, dilation=1, causal=False,
                    scale=None, extra=None):
    """(grads64, grads_lowp): the gradients of <out, dout> + <lse, d_lse> with respect to q, k, v
    (and the extra keys and values, if ``extra``) of the reference backend on the CPU, in
    float64 and in :func:`test_fused.lowp_dtype` of the inputs (cotangents rounded to it)."""
    f = getattr(natten_jax, f"na{q.ndim - 3}d")
    n = 3 if extra is None else 5

    def na(*a):
        kw = {} if n == 3 else dict(additional_keys=a[3], additional_values=a[4])
        return f(*a[:3], kernel, stride, dilation, causal, scale, backend="reference",
                 return_lse=True, **kw)

    def run(dtype):
        with jax.default_device(CPU):
            args = [on_cpu(x, dtype) for x in (q, k, v) + tuple(extra or ())]
            grads = _vjp(na, args, on_cpu(dout, dtype), on_cpu(d_lse))
            return tuple(np.asarray(g) for g in grads[:n])

    return run(jnp.float64), run(lowp_dtype(q.dtype))


# The backward kernels round P and dS to the inputs' precision before their products (as
# FlashAttention's do); the reference backend in that precision computes in float32 inside and
# rounds only its results, so it does not make that error (FlashAttention's low-precision
# reference, all in bf16 / fp16, does). Its per-element share reaches one unit in the last place
# of the largest gradients (tests below: an emulation of the kernels' arithmetic on the CPU uses
# up to 0.99 of FlashAttention's bound), hence twice FlashAttention's atol for gradients.
GRAD_ATOL_FACTOR = 2.0


def check_grads(got, refs, names=("dq", "dk", "dv", "d_extra_k", "d_extra_v"), scale=1.0):
    """Each of ``got`` (times ``scale``) against ``refs`` (:func:`reference_grads`), per
    element: |g - g64| <= 2 |g_lowp - g64| + GRAD_ATOL_FACTOR * rounding_atol."""
    for name, g, g64, g_lowp in zip(names, got, *refs):
        g = np.asarray(jnp.asarray(g).astype(jnp.float32), np.float64) * scale
        atol = GRAD_ATOL_FACTOR * oracle.rounding_atol(g64, g_lowp.dtype)
        oracle.assert_close_to_ref64(g, g64, g_lowp, atol=atol, name=name)


def fused_grads(q, k, v, dout, d_lse, kernel, stride=1, dilation=1, causal=False,
                config=SM80):
    """jit(grad) of <out, dout> + <lse, d_lse> through the fused backend under ``config``."""
    f = getattr(natten_jax, f"na{q.ndim - 3}d")

    def loss(q, k, v, dout, d_lse):
        out, lse = f(q, k, v, kernel, stride, dilation, causal, backend="fused",
                     backend_config=config, return_lse=True)
        return (jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32))
                + jnp.sum(lse * d_lse))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    args = (q, k, v, dout, d_lse)
    assert fused.TARGET_BACKWARD in grad.lower(*args).as_text()  # the kernels, not a fallback
    return grad(*args)


def check_deterministic(config):
    """Gradients of two separately compiled executables (an unused argument of another shape
    makes the second program differ from the first, and the in-memory caches are cleared in
    between, so neither the jit cache nor a compilation cache hands back the first executable)
    and of two runs of one executable are bitwise equal."""
    q, k, v = _inputs(jax.random.PRNGKey(21), (24, 40), 2, 4, 1, 128, "bfloat16")
    dout, d_lse = cotangents(22, q)

    def compiled(salt):
        def loss(q, k, v, dout, d_lse, salt):
            out, lse = natten_jax.na2d(q, k, v, (7, 9), backend="fused", backend_config=config,
                                       return_lse=True)
            return (jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32))
                    + jnp.sum(lse * d_lse))

        exe = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), keep_unused=True).lower(
            q, k, v, dout, d_lse, salt).compile()
        assert fused.TARGET_BACKWARD in exe.as_text()
        return exe

    salts = (jnp.zeros((), jnp.float32), jnp.zeros((2,), jnp.float32))
    a = compiled(salts[0])
    jax.clear_caches()
    b = compiled(salts[1])
    assert a is not b and a.as_text() != b.as_text()
    ga = a(q, k, v, dout, d_lse, salts[0])
    again = a(q, k, v, dout, d_lse, salts[0])
    gb = b(q, k, v, dout, d_lse, salts[1])
    for name, x, y, z in zip(("dq", "dk", "dv"), ga, again, gb):
        x, y, z = (np.asarray(t.astype(jnp.float32)) for t in (x, y, z))
        assert np.isfinite(x).all(), f"{name}: unwritten or non-finite elements"
        np.testing.assert_array_equal(x, y, err_msg=f"{name}: two runs of one executable")
        np.testing.assert_array_equal(x, z, err_msg=f"{name}: two compiled executables")


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_backward_kernel_matches_reference(case, dtype):
    spatial, kernel, stride, dilation, causal = CASES[case]
    D = (32, 64, 128)[case % 3]
    H, Hkv = [(4, 4), (4, 2), (4, 1)][case % 3]
    q, k, v = _inputs(jax.random.PRNGKey(2000 + case), spatial, 2, H, Hkv, D, dtype)
    dout, d_lse = cotangents(3000 + case, q)
    got = fused_grads(q, k, v, dout, d_lse, kernel, stride, dilation, causal)
    check_grads(got, reference_grads(q, k, v, dout, d_lse, kernel, stride, dilation, causal))


@pytest.mark.gpu
def test_backward_kernel_under_vmap_and_extra_tokens():
    spatial, kernel = (12, 14), (5, 3)
    q, k, v = _inputs(jax.random.PRNGKey(11), spatial, 2, 4, 2, 64, "bfloat16")
    ek = jax.random.normal(jax.random.PRNGKey(12), (2, 3, 2, 64)).astype(jnp.bfloat16)
    ev = jax.random.normal(jax.random.PRNGKey(13), (2, 3, 2, 64)).astype(jnp.bfloat16)
    dout, d_lse = cotangents(14, q)

    def na(q, k, v, ek, ev):
        return natten_jax.na2d(q, k, v, kernel, additional_keys=ek, additional_values=ev,
                               backend="fused", backend_config=SM80, return_lse=True)

    got = jax.jit(lambda dout, d_lse, *a: _vjp(na, a, dout, d_lse))(dout, d_lse, q, k, v, ek, ev)
    check_grads(got, reference_grads(q, k, v, dout, d_lse, kernel, extra=(ek, ev)))
    # vmap over a leading axis folds into batch: each slice's dq against its reference
    qs = jnp.stack([q, q[::-1]])
    dq = jax.jit(jax.vmap(lambda q, *a: _vjp(na, (q,) + a[:4], *a[4:])[0],
                          in_axes=(0,) + (None,) * 6))(qs, k, v, ek, ev, dout, d_lse)
    for i in range(2):
        want = reference_grads(qs[i], k, v, dout, d_lse, kernel, extra=(ek, ev))
        check_grads([dq[i]], (want[0][:1], want[1][:1]), names=(f"dq of vmap slice {i}",))


@pytest.mark.gpu
def test_backward_is_deterministic():
    check_deterministic(SM80)


@pytest.mark.gpu
def test_backward_under_checkpoint_runs_the_kernels():
    q, k, v = _inputs(jax.random.PRNGKey(22), (6, 8, 10), 1, 2, 2, 64, "float16")
    dout, _ = cotangents(23, q)

    @jax.checkpoint
    def block(q, k, v):
        return natten_jax.na3d(q, k, v, (3, 5, 3), backend="fused", backend_config=SM80)

    grad = jax.jit(jax.grad(lambda q, k, v, dout: jnp.sum(block(q, k, v).astype(jnp.float32)
                                                          * dout.astype(jnp.float32)),
                            argnums=(0, 1, 2)))
    assert fused.TARGET_BACKWARD in grad.lower(q, k, v, dout).as_text()
    check_grads(grad(q, k, v, dout),
                reference_grads(q, k, v, dout, np.zeros(q.shape[:-1]), (3, 5, 3)))


# ---------------------------------------------------------------------------------------------
# CPU: the rule on the backward


def flash_like_backward(q, k, v, out, lse, dout, d_lse, mask, scale=None):
    """A correct fused backward's arithmetic, emulated in NumPy (MHA, dense ``mask`` [T, T]):
    P = exp(s - lse) in float32, rounded to the inputs' precision before dV = P^T dO; dP = dO V^T
    and delta = rowsum(dO * O) - d_lse in float32 from the (rounded) output; dS = P (dP - delta)
    rounded before dQ = scale dS K and dK = scale dS^T Q; float32 accumulation; gradients
    rounded to the inputs' precision."""
    dt = np.dtype(q.dtype)
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    T = int(np.prod(q.shape[1:-2]))
    scale = np.float32(D ** -0.5 if scale is None else scale)
    f32 = lambda x: np.asarray(x).astype(np.float32).reshape(B, T, H, -1)  # noqa: E731

    def rows(x):  # [B, *S, H] -> [B, H, T, 1]
        return np.moveaxis(np.asarray(x, np.float32).reshape(B, T, H), 1, 2)[..., None]

    qf, kf, vf, of, dof = f32(q), f32(k), f32(v), f32(out), f32(dout)
    s = np.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    p = np.where(mask[None, None], np.exp(s - rows(lse)), 0).astype(np.float32)
    lowp = lambda x: x.astype(dt).astype(np.float32)  # noqa: E731
    dv = np.einsum("bhqk,bqhe->bkhe", lowp(p), dof)
    dp = np.einsum("bqhe,bkhe->bhqk", dof, vf)
    delta = rows(np.sum(dof * of, -1)) - rows(d_lse)
    ds = lowp(p * (dp - delta))
    dq = scale * np.einsum("bhqk,bkhd->bqhd", ds, kf)
    dk = scale * np.einsum("bhqk,bqhd->bkhd", ds, qf)
    return tuple(g.astype(dt).reshape(x.shape) for g, x in ((dq, q), (dk, k), (dv, v)))


def _emulated_grads(case, dtype, wrong=None):
    """(emulated gradients, reference_grads) of EMULATED[case]; ``wrong``: ``drop`` / ``add``
    one (query, key) pair in the backward's mask (the forward's stays right)."""
    (q, k, v), mask = emulated_inputs(case, dtype)
    _, kernel, stride, dilation, causal = EMULATED[case]
    dout, d_lse = (on_cpu(x) for x in cotangents(50 + case, q))
    out, lse = flash_like_forward(q, k, v, mask)
    if wrong is not None:
        mask, _ = one_key_wrong(mask, wrong, np.random.default_rng(case))
    got = flash_like_backward(q, k, v, out, lse, dout, d_lse, mask)
    return got, reference_grads(q, k, v, dout, d_lse, kernel, stride, dilation, causal)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", range(len(EMULATED)))
def test_rule_admits_backward_kernel_arithmetic(case, dtype):
    check_grads(*_emulated_grads(case, dtype))


@pytest.mark.parametrize("how", ["drop", "add"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", range(len(EMULATED)))
def test_rule_rejects_a_wrong_backward_mask(case, dtype, how):
    """The forward right, the backward's neighbourhood wrong by one (query, key) pair of one
    query (in every batch and head): some gradient fails."""
    with pytest.raises(AssertionError, match="exceed"):
        check_grads(*_emulated_grads(case, dtype, wrong=how))
