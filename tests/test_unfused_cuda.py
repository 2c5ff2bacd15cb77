"""Unfused CUDA operators (backend "gemm" and "naive") vs the float64 reference, on the GPU.

Every operator and its gradients (PN = na*d_qk with RPB, NN = na*d_av, IN and the RPB gradient
through the custom VJPs), ranks 1-3, odd and even kernels, dilation, causal, GQA, extents that
no tile divides, head dims on and off the vector-load widths, float32 / float16 / bfloat16.
Outputs are poisoned with NaN before each kernel runs, so an element a kernel fails to write
shows. Cotangents and attention weights hold NaN at window entries that are no neighbor
(causal), which the kernels must never read.

Tolerances (relative to the largest reference magnitude): float32 1e-5 for the operators (both
implementations accumulate in fp32 FFMA, no TF32), float16 2e-3 and bfloat16 1e-2 (the output
rounding; inputs are compared after the same rounding).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natten_jax
from natten_jax import unfused
from natten_jax.backends import unfused_cuda

pytestmark = pytest.mark.gpu
unfused_cuda.POISON_OUTPUTS = True

IMPLS = ("gemm", "naive")
DTYPES = ("float32", "float16", "bfloat16")
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}

# (spatial, kernel_size, dilation, is_causal, heads, heads_kv, head_dim, head_dim_v, rpb)
CASES = [
    ((37,), 7, 1, False, 4, 2, 32, 32, True),
    ((100,), 6, 3, False, 2, 1, 24, 40, False),
    ((50,), 9, 2, True, 2, 2, 16, 16, False),
    ((131,), 33, 1, False, 2, 2, 64, 64, True),
    ((13, 11), (3, 5), (2, 1), False, 4, 2, 64, 64, True),
    ((17, 19), 7, 1, False, 2, 2, 128, 128, True),
    ((9, 14), (4, 3), (1, 3), (True, False), 2, 1, 8, 12, False),
    ((20, 18), (5, 8), (3, 2), False, 2, 2, 80, 72, False),
    ((6, 7, 9), 3, (1, 2, 1), False, 2, 1, 32, 32, True),
    ((5, 8, 6), (2, 3, 4), 1, (False, True, True), 2, 2, 48, 16, False),
    ((10, 9, 11), (3, 5, 3), (3, 1, 2), False, 4, 4, 64, 64, True),
]
IDS = [f"S{c[0]}-k{c[1]}-d{c[2]}-c{c[3]}-H{c[4]}/{c[5]}-D{c[6]}/{c[7]}-rpb{int(c[8])}"
       for c in CASES]


def _t(v, rank):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * rank


def _norm(case):
    S, ks, di, ca, H, Hkv, D, Dv, use_rpb = case
    r = len(S)
    return S, _t(ks, r), _t(di, r), _t(ca, r), H, Hkv, D, Dv, use_rpb


def _f64(x):
    return jnp.asarray(x).astype(jnp.float64)


def _np(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float64))


def _valid(S, ks, di, ca, H):
    """Window validity [1, *S, H, W] (False: causal entries that are no neighbor)."""
    q = jnp.zeros((1,) + S + (1, 1), jnp.float64)
    logits = unfused.na_qk_generic(len(S), q, q, ks, di, ca, backend="reference")
    return np.broadcast_to(~np.isneginf(np.asarray(logits)), (1,) + S + (H, math.prod(ks)))


def _close(got, want, tol, what):
    got, want = _np(got), _np(want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    fin = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), fin, err_msg=f"{what}: non-finite pattern")
    np.testing.assert_array_equal(got[~fin], want[~fin], err_msg=f"{what}: -inf entries")
    scale = max(float(np.max(np.abs(want[fin]), initial=0.0)), 1e-30)
    err = float(np.max(np.abs(got[fin] - want[fin]), initial=0.0))
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.0e} x {scale:.3e}"


@functools.lru_cache(maxsize=None)
def _inputs(ci, dtype):
    S, ks, di, ca, H, Hkv, D, Dv, use_rpb = _norm(CASES[ci])
    B, W = 2, math.prod(ks)
    rng = np.random.default_rng(ci)
    n = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    dt = jnp.dtype(dtype)
    valid = _valid(S, ks, di, ca, H)
    nan_off = lambda x: np.where(np.broadcast_to(valid, x.shape), x, np.nan)  # noqa: E731
    logits = np.where(np.broadcast_to(valid, (B,) + S + (H, W)), n(B, *S, H, W), -np.inf)
    attn = jax.nn.softmax(jnp.asarray(logits), axis=-1)
    return dict(
        q=jnp.asarray(n(B, *S, H, D) * 0.5, dt), k=jnp.asarray(n(B, *S, Hkv, D) * 0.5, dt),
        v=jnp.asarray(n(B, *S, Hkv, Dv), dt),
        rpb=jnp.asarray(n(H, *[2 * x - 1 for x in ks])) if use_rpb else None,
        attn=jnp.asarray(nan_off(np.asarray(attn)), dt),
        d_logits=jnp.asarray(nan_off(n(B, *S, H, W)), dt),
        d_out=jnp.asarray(n(B, *S, H, Dv), dt))


@functools.lru_cache(maxsize=None)
def _ref_qk(ci, dtype):
    """float64 reference logits and gradients of a case's inputs in ``dtype`` (shared by the
    gemm and naive tests of the case)."""
    x = _inputs(ci, dtype)
    rpb = x["rpb"]
    want, vjp_ref = jax.vjp(_qk_fn(ci, "reference"), _f64(x["q"]), _f64(x["k"]),
                            None if rpb is None else _f64(rpb))
    return (want, *vjp_ref(_f64(x["d_logits"])))


@functools.lru_cache(maxsize=None)
def _ref_av(ci, dtype):
    """float64 reference output and gradients (see :func:`_ref_qk`)."""
    x = _inputs(ci, dtype)
    want, vjp_ref = jax.vjp(_av_fn(ci, "reference"), _f64(x["attn"]), _f64(x["v"]))
    return (want, *vjp_ref(_f64(x["d_out"])))


def _qk_fn(ci, backend):
    S, ks, di, ca, *_ = _norm(CASES[ci])
    return lambda q, k, b: unfused.na_qk_generic(len(S), q, k, ks, di, ca, b, backend=backend)


def _av_fn(ci, backend):
    S, ks, di, ca, *_ = _norm(CASES[ci])
    return lambda a, v: unfused.na_av_generic(len(S), a, v, ks, di, ca, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ci", range(len(CASES)), ids=IDS)
def test_qk_and_grads(ci, impl, dtype):
    x = _inputs(ci, dtype)
    q, k, rpb, ct = x["q"], x["k"], x["rpb"], x["d_logits"]
    tol = TOL[dtype]
    got, vjp = jax.vjp(_qk_fn(ci, impl), q, k, rpb)
    want, rq, rk, rrpb = _ref_qk(ci, dtype)
    assert got.dtype == q.dtype
    _close(got, want, tol, "logits")
    dq, dk, drpb = vjp(ct)
    assert dq.dtype == q.dtype and dk.dtype == k.dtype
    _close(dq, rq, tol, "d_query")
    _close(dk, rk, tol, "d_key")
    if rpb is not None:
        assert drpb.dtype == rpb.dtype
        _close(drpb, rrpb, max(tol, 1e-5), "d_rpb")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ci", range(len(CASES)), ids=IDS)
def test_av_and_grads(ci, impl, dtype):
    x = _inputs(ci, dtype)
    a, v, ct = x["attn"], x["v"], x["d_out"]
    tol = TOL[dtype]
    got, vjp = jax.vjp(_av_fn(ci, impl), a, v)
    want, ra, rv = _ref_av(ci, dtype)
    assert got.dtype == v.dtype
    _close(got, want, tol, "output")
    da, dv = vjp(ct)
    _close(da, ra, tol, "d_attn")
    assert not np.any(_np(da)[~np.broadcast_to(np.isfinite(_np(a)), da.shape)]), \
        "d_attn must be 0 off the window"
    _close(dv, rv, tol, "d_value")


@pytest.mark.parametrize("ci", range(len(CASES)), ids=IDS)
def test_gemm_equals_naive_fp32(ci):
    x = _inputs(ci, "float32")
    for f in (_qk_fn, _av_fn):
        args = (x["q"], x["k"], x["rpb"]) if f is _qk_fn else (x["attn"], x["v"])
        g, vg = jax.vjp(f(ci, "gemm"), *args)
        n, vn = jax.vjp(f(ci, "naive"), *args)
        _close(g, n, 1e-5, "forward")
        ct = x["d_logits"] if f is _qk_fn else x["d_out"]
        for a, b in zip(vg(ct), vn(ct)):
            if a is not None:
                _close(a, b, 1e-5, "gradient")


# (spatial, kernel, dilation, causal, heads, heads_kv, head_dim)
NA_CASES = [
    ((64,), 9, 2, True, 4, 2, 64),
    ((24, 21), (5, 7), (2, 1), (False, True), 4, 1, 32),
    ((7, 9, 10), 3, (2, 1, 3), False, 2, 2, 64),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ni", range(len(NA_CASES)))
def test_na_backend_matches_reference(ni, impl, dtype):
    S, ks, di, ca, H, Hkv, D = NA_CASES[ni]
    rank = len(S)
    rng = np.random.default_rng(100 + ni)
    dt = jnp.dtype(dtype)
    q = jnp.asarray(rng.standard_normal((2,) + S + (H, D)), dt)
    k = jnp.asarray(rng.standard_normal((2,) + S + (Hkv, D)), dt)
    v = jnp.asarray(rng.standard_normal((2,) + S + (Hkv, D)), dt)
    ct = jnp.asarray(rng.standard_normal((2,) + S + (H, D)), dt)
    na = getattr(natten_jax, f"na{rank}d")

    def f(backend):
        return lambda q, k, v: na(q, k, v, ks, dilation=di, is_causal=ca, backend=backend,
                                  return_lse=True)

    (out, lse), vjp = jax.vjp(jax.jit(f(impl)), q, k, v)
    (ref, ref_lse), vjp_ref = jax.vjp(f("reference"), _f64(q), _f64(k), _f64(v))
    assert out.dtype == q.dtype and lse.dtype == jnp.float32
    rel = lambda a, b: float(np.linalg.norm(_np(a) - _np(b)) / np.linalg.norm(_np(b)))  # noqa
    tol = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 2e-2}[dtype]
    assert rel(out, ref) < tol
    assert rel(lse, ref_lse) < tol
    grads = vjp((ct, jnp.zeros_like(lse)))
    for g, r, name in zip(grads, vjp_ref((_f64(ct), jnp.zeros_like(ref_lse))), "qkv"):
        assert g.dtype == q.dtype
        assert rel(g, r) < 4 * tol, name


def test_vmap_jit_and_default_backend():
    ci = 4
    x = _inputs(ci, "float16")
    S, ks, di, ca, *_ = _norm(CASES[ci])
    qs = jnp.stack([x["q"], x["q"][::-1]])
    ks_ = jnp.stack([x["k"], x["k"] * 2])
    f = lambda q, k: unfused.na2d_qk(q, k, ks, di, ca, rpb=x["rpb"], backend="gemm")  # noqa
    batched = jax.jit(jax.vmap(f))(qs, ks_)
    for i in range(2):
        np.testing.assert_array_equal(_np(batched[i]), _np(f(qs[i], ks_[i])))
    # vmap over the bias too: one call per entry.
    rpbs = jnp.stack([x["rpb"], -x["rpb"]])
    g = lambda b: unfused.na2d_qk(x["q"], x["k"], ks, di, ca, rpb=b, backend="gemm")  # noqa
    vb = jax.vmap(g)(rpbs)
    np.testing.assert_array_equal(_np(vb[1]), _np(g(rpbs[1])))
    # The default backend on a GPU is "gemm".
    np.testing.assert_array_equal(
        _np(unfused.na2d_qk(x["q"], x["k"], ks, di, ca, rpb=x["rpb"])), _np(f(x["q"], x["k"])))
    # Grad of a vmapped loss (rpb gradient per mapped entry).
    loss = lambda b: jnp.sum(g(b).astype(jnp.float32) ** 2)  # noqa: E731
    gb = jax.vmap(jax.grad(loss))(rpbs)
    np.testing.assert_allclose(_np(gb[0]), _np(jax.grad(loss)(rpbs[0])), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("D", [256, 300, 520])
def test_large_head_dims(impl, D):
    """Head dims the GEMM tiles may not hold in shared memory (then the naive kernel runs)."""
    S, ks = (12, 10), (3, 5)
    rng = np.random.default_rng(D)
    for dtype in ("float32", "bfloat16"):
        dt = jnp.dtype(dtype)
        q = jnp.asarray(rng.standard_normal((1,) + S + (2, D)) * 0.2, dt)
        k = jnp.asarray(rng.standard_normal((1,) + S + (1, D)) * 0.2, dt)
        v = jnp.asarray(rng.standard_normal((1,) + S + (1, D)), dt)
        got = unfused.na2d_qk(q, k, ks, backend=impl)
        _close(got, unfused.na2d_qk(_f64(q), _f64(k), ks, backend="reference"), TOL[dtype],
               "logits")
        a = jax.nn.softmax(got.astype(jnp.float32), axis=-1).astype(dt)
        out, vjp = jax.vjp(lambda a, v: unfused.na2d_av(a, v, ks, backend=impl), a, v)
        ref, vjp_ref = jax.vjp(lambda a, v: unfused.na2d_av(a, v, ks, backend="reference"),
                               _f64(a), _f64(v))
        _close(out, ref, TOL[dtype], "output")
        ct = jnp.asarray(rng.standard_normal(out.shape), dt)
        for g, r in zip(vjp(ct), vjp_ref(_f64(ct))):
            _close(g, r, TOL[dtype], "grad")


def test_larger_problems_gemm_vs_naive():
    """Many tiles per axis and several dilation groups: gemm and naive agree (bf16 and fp32)."""
    for S, ks, di in (((300,), 13, 2), ((45, 38), (7, 9), (2, 3)), ((12, 14, 16), 5, (1, 2, 2))):
        rank = len(S)
        rng = np.random.default_rng(rank)
        for dtype, tol in (("float32", 1e-5), ("bfloat16", 1e-2)):
            dt = jnp.dtype(dtype)
            q = jnp.asarray(rng.standard_normal((2,) + S + (4, 64)) * 0.3, dt)
            k = jnp.asarray(rng.standard_normal((2,) + S + (2, 64)) * 0.3, dt)
            qk = lambda impl: getattr(unfused, f"na{rank}d_qk")(  # noqa: E731
                q, k, ks, di, backend=impl)
            lg = qk("gemm")
            _close(lg, qk("naive"), tol, f"{S} logits")
            a = jax.nn.softmax(lg.astype(jnp.float32), axis=-1).astype(dt)
            av = lambda impl: jax.vjp(lambda a, v: getattr(unfused, f"na{rank}d_av")(  # noqa
                a, v, ks, di, backend=impl), a, k)
            og, vg = av("gemm")
            on, vn = av("naive")
            _close(og, on, tol, f"{S} output")
            for g, n in zip(vg(og), vn(og)):
                _close(g, n, tol, f"{S} grad")
