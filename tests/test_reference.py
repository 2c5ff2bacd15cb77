"""Reference backend (``backend="reference"``) vs the brute-force float64 oracle."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import natten_jax
import oracle

NA = {1: natten_jax.na1d, 2: natten_jax.na2d, 3: natten_jax.na3d}
DTYPES = {"float64": jnp.float64, "float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "float16": jnp.float16}
TOL = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-2}


def _inputs(seed, B, S, H, Hkv, D, Dv, N, dtype="float64"):
    """Random inputs in ``dtype`` and their exact float64 values (after rounding to dtype)."""
    rng = np.random.default_rng(seed)
    shapes = [(B,) + S + (H, D), (B,) + S + (Hkv, D), (B,) + S + (Hkv, Dv)]
    if N:
        shapes += [(B, N, Hkv, D), (B, N, Hkv, Dv)]
    arrs = [jnp.asarray(rng.standard_normal(s), DTYPES[dtype]) for s in shapes]
    exact = [np.asarray(a.astype(jnp.float64)) for a in arrs]
    if not N:
        arrs += [None, None]
        exact += [None, None]
    return arrs, exact


@functools.lru_cache(maxsize=None)
def _jitted(rank, kernel_size, stride, dilation, is_causal, scale, return_lse, has_extra):
    f = NA[rank]

    if has_extra:
        def run(q, k, v, ek, ev):
            return f(q, k, v, kernel_size, stride, dilation, is_causal, scale, additional_keys=ek,
                     additional_values=ev, backend="reference", return_lse=return_lse)
    else:
        def run(q, k, v):
            return f(q, k, v, kernel_size, stride, dilation, is_causal, scale,
                     backend="reference", return_lse=return_lse)
    return jax.jit(run)


def _call(rank, arrs, kernel_size, stride, dilation, is_causal, scale=None, return_lse=True,
          jit=True):
    q, k, v, ek, ev = arrs
    if not jit:
        return NA[rank](q, k, v, kernel_size, stride, dilation, is_causal, scale,
                        additional_keys=ek, additional_values=ev, backend="reference",
                        return_lse=return_lse)
    fn = _jitted(rank, kernel_size, stride, dilation, is_causal, scale, return_lse, ek is not None)
    return fn(q, k, v, ek, ev) if ek is not None else fn(q, k, v)


def _assert_close(got, want, tol, what):
    got = np.asarray(jnp.asarray(got).astype(jnp.float64))
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.isfinite(got).all(), f"{what}: non-finite values"
    err = np.abs(got - want)
    bound = tol * (np.abs(want) + np.abs(want).max() + 1e-300)
    if not (err <= bound).all():
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(f"{what}: max abs err {err.max():.3e} (tol {tol}); at {i}: got "
                             f"{got[i]!r} want {want[i]!r}")


def check(rank, S, kernel_size, stride=1, dilation=1, is_causal=False, *, B=1, H=2, Hkv=None,
          D=4, Dv=None, N=0, scale=None, dtype="float64", seed=0, jit=True):
    Hkv = H if Hkv is None else Hkv
    Dv = D if Dv is None else Dv
    arrs, exact = _inputs(seed, B, S, H, Hkv, D, Dv, N, dtype)
    out, lse = _call(rank, arrs, kernel_size, stride, dilation, is_causal, scale, jit=jit)
    want_out, want_lse = oracle.na_oracle(*exact[:3], kernel_size, stride, dilation, is_causal,
                                          scale, exact[3], exact[4])
    desc = (f"rank={rank} S={S} k={kernel_size} s={stride} d={dilation} causal={is_causal} "
            f"B={B} H={H} Hkv={Hkv} D={D} Dv={Dv} N={N} scale={scale} {dtype}")
    assert out.dtype == DTYPES[dtype], (desc, out.dtype)
    assert out.shape == (B,) + S + (H, Dv), (desc, out.shape)
    want_lse_dtype = jnp.float64 if dtype == "float64" else jnp.float32
    assert lse.dtype == want_lse_dtype, (desc, lse.dtype)
    assert lse.shape == (B,) + S + (H,), (desc, lse.shape)
    _assert_close(out, want_out, TOL[dtype], "out " + desc)
    # lse is accumulated in float32 (float64) whatever the input dtype.
    _assert_close(lse, want_lse, 1e-10 if dtype == "float64" else 1e-5, "lse " + desc)


# ------------------------------------------------------------------------------------------
# Seeded sweeps (float64).
# ------------------------------------------------------------------------------------------

# (S, kernel_size, stride, dilation, is_causal)
CASES_1D = [
    ((1,), 1, 1, 1, False),
    ((10,), 4, 1, 1, False),       # even kernel
    ((10,), 4, 3, 1, False),       # stride, not dividing extent
    ((10,), 3, 1, 3, False),       # dilation 3 on 10: groups 4, 3, 3
    ((11,), 2, 2, 4, False),       # groups 3, 3, 3, 2
    ((12,), 5, 2, 2, True),
    ((7,), 7, 1, 1, True),         # full causal
    ((7,), 7, 7, 1, False),        # full, stride == kernel
    ((13,), 6, 6, 2, True),
]
CASES_2D = [
    ((5, 6), (2, 3), (1, 2), (2, 1), False),
    ((6, 5), (3, 2), (3, 2), (1, 2), (True, False)),
    ((7, 4), (2, 4), (2, 1), (3, 1), (False, True)),
    ((4, 7), (4, 3), (4, 3), (1, 2), (True, True)),
    ((5, 5), (1, 5), 1, 1, (False, True)),
    ((6, 7), (3, 3), (2, 2), (2, 2), False),
]
CASES_3D = [
    ((4, 3, 5), (3, 3, 2), (2, 1, 2), (1, 1, 2), (True, False, True)),
    ((5, 4, 3), (2, 2, 3), (2, 2, 3), (2, 2, 1), (False, True, False)),
    ((4, 4, 4), (4, 1, 2), (3, 1, 2), 1, True),
    ((3, 5, 4), (3, 2, 2), 1, (1, 2, 2), False),
]
ALL_CASES = ([(1,) + c for c in CASES_1D] + [(2,) + c for c in CASES_2D]
             + [(3,) + c for c in CASES_3D])


@pytest.mark.parametrize("rank,S,k,s,d,c", ALL_CASES)
def test_sweep_float64(rank, S, k, s, d, c):
    check(rank, S, k, s, d, c, B=2, H=2, D=5, seed=hash((S, k, s, d, c)) % 1000)


# (H, Hkv, D, Dv, N, scale)
HEAD_CONFIGS = [
    (4, 1, 3, 3, 0, None),     # MQA
    (6, 2, 4, 4, 0, None),     # GQA with groups of 3
    (4, 4, 2, 7, 0, 0.37),     # Dv != D, explicit scale
    (4, 2, 6, 3, 3, None),     # GQA + extra tokens + Dv < D
    (2, 1, 4, 5, 1, 1.5),      # MQA + one extra token
    (3, 3, 4, 4, 5, -0.5),     # negative scale
]


GEOMETRIES = [
    (1, (11,), 4, 3, 2, False),
    (2, (5, 6), (3, 2), (2, 2), (1, 3), (True, False)),
    (3, (3, 4, 4), (2, 3, 2), (1, 3, 2), (1, 1, 2), (False, True, True)),
]


# every head config on one or two of the three geometries (rotating), 9 cases
@pytest.mark.parametrize("rank,S,k,s,d,c,H,Hkv,D,Dv,N,scale", [
    GEOMETRIES[(i + j) % 3] + hc for i, hc in enumerate(HEAD_CONFIGS) for j in (0, 1)
    if (i, j) not in ((0, 1), (2, 1), (5, 1))])
def test_heads_dims_extras(rank, S, k, s, d, c, H, Hkv, D, Dv, N, scale):
    check(rank, S, k, s, d, c, B=2, H=H, Hkv=Hkv, D=D, Dv=Dv, N=N, scale=scale, seed=H + N)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("rank,S,k,s,d,c,Hkv,N", [
    (1, (12,), 5, 2, 2, False, 2, 0),
    (2, (6, 5), (3, 2), (3, 1), (2, 2), (True, False), 1, 2),
    (3, (3, 4, 5), (3, 2, 3), (1, 2, 3), 1, (False, False, True), 2, 0),
])
def test_low_precision_vs_float64_oracle(dtype, rank, S, k, s, d, c, Hkv, N):
    check(rank, S, k, s, d, c, B=2, H=4, Hkv=Hkv, D=8, N=N, dtype=dtype, seed=7)


def test_eager_matches_oracle():
    """No jit: the public functions run eagerly too."""
    check(2, (4, 5), (2, 3), (1, 3), (2, 1), (True, False), H=2, Hkv=1, Dv=3, N=2, jit=False)


def test_zero_query_counts_neighbors():
    """q = 0: every logit is 0, so lse = log(#neighbors + N) and out = mean of their values."""
    S, k, s, d, c = (7, 6), (3, 4), (2, 3), (2, 1), (False, True)
    N = 2
    arrs, exact = _inputs(3, 1, S, 2, 1, 4, 3, N)
    arrs[0] = jnp.zeros_like(arrs[0])
    out, lse = _call(2, arrs, k, s, d, c)
    mask = oracle.na_mask(S, k, s, d, c)
    counts = mask.sum(1).reshape(S) + N
    np.testing.assert_allclose(np.asarray(lse)[0, ..., 0], np.log(counts), rtol=1e-12)
    vals = exact[2][0, ..., 0, :].reshape(-1, 3)
    mean = (mask @ vals + exact[4][0, :, 0].sum(0)) / (mask.sum(1) + N)[:, None]
    np.testing.assert_allclose(np.asarray(out)[0, ..., 0, :].reshape(-1, 3), mean, rtol=1e-10,
                               atol=1e-12)
    np.testing.assert_allclose(np.asarray(out)[0, ..., 1, :], np.asarray(out)[0, ..., 0, :])


def test_return_lse_false_returns_array():
    arrs, exact = _inputs(0, 1, (6,), 2, 2, 4, 4, 0)
    out = _call(1, arrs, 3, 1, 1, False, return_lse=False)
    assert isinstance(out, jax.Array)
    want, _ = oracle.na_oracle(*exact[:3], 3)
    _assert_close(out, want, 1e-10, "out")


def test_default_scale_is_inverse_sqrt_head_dim():
    arrs, _ = _inputs(1, 1, (8,), 2, 2, 9, 4, 0)
    a = _call(1, arrs, 3, 1, 1, False)
    b = _call(1, arrs, 3, 1, 1, False, scale=1 / 3)
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(a[1]), np.asarray(b[1]), rtol=1e-13)


def test_int_and_tuple_and_list_args_agree():
    arrs, _ = _inputs(2, 1, (5, 6), 2, 2, 4, 4, 0)
    a = _call(2, arrs, 3, 2, 1, True)
    b = jax.jit(lambda q, k, v: natten_jax.na2d(q, k, v, [3, 3], [2, 2], (1, 1), [True, True],
                                                backend="reference", return_lse=True))(*arrs[:3])
    c = jax.jit(lambda q, k, v: natten_jax.na2d(q, k, v, (np.int64(3), np.int32(3)), np.int64(2),
                                                1, (True, True), backend="reference",
                                                return_lse=True))(*arrs[:3])
    for x, y in ((a, b), (a, c)):
        np.testing.assert_array_equal(np.asarray(x[0]), np.asarray(y[0]))
        np.testing.assert_array_equal(np.asarray(x[1]), np.asarray(y[1]))


def test_default_backend_matches_reference():
    arrs, _ = _inputs(4, 1, (4, 5), 2, 1, 4, 4, 0)
    a = jax.jit(lambda q, k, v: natten_jax.na2d(q, k, v, 3, backend="reference"))(*arrs[:3])
    # backend=None: on CPU this must be the reference
    b = jax.jit(lambda q, k, v: natten_jax.na2d(q, k, v, 3))(*arrs[:3])
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


def test_positional_defaults():
    arrs, exact = _inputs(5, 1, (9,), 2, 2, 4, 4, 0)
    out = jax.jit(lambda q, k, v: natten_jax.na1d(q, k, v, 3))(*arrs[:3])
    want, _ = oracle.na_oracle(*exact[:3], 3, 1, 1, False)
    _assert_close(out, want, 1e-10, "out")


@pytest.mark.parametrize("rank,S,k,s,d,c,N", [
    (1, (23,), 5, 2, 3, False, 0),
    (2, (7, 5), (3, 2), (2, 1), (2, 2), (True, False), 2),
    (3, (5, 3, 4), (2, 3, 2), (2, 1, 1), (2, 1, 2), (False, True, True), 0),
])
def test_blocked_rows_path(monkeypatch, rank, S, k, s, d, c, N):
    """Force the reference's row-blocked (lax.map) path with a ragged last block."""
    from natten_jax import reference

    monkeypatch.setattr(reference, "_BLOCK_ELEMENTS", 1)  # one query row per block
    check(rank, S, k, s, d, c, B=2, H=2, Hkv=1, N=N, jit=False, seed=11)
    monkeypatch.setattr(reference, "_BLOCK_ELEMENTS", 2 * 2 * 1 * 4 * int(np.prod(k)) *
                        int(np.prod(S[1:])) + 1)  # two rows per block
    check(rank, S, k, s, d, c, B=2, H=2, Hkv=1, N=N, jit=False, seed=12)


# ------------------------------------------------------------------------------------------
# Hypothesis.
# ------------------------------------------------------------------------------------------

@st.composite
def axis_params(draw, max_extent):
    L = draw(st.integers(1, max_extent))
    k = draw(st.integers(1, L))
    d = draw(st.integers(1, L // k))
    s = draw(st.integers(1, k))
    c = draw(st.booleans())
    return L, k, s, d, c


@st.composite
def problems(draw):
    rank = draw(st.integers(1, 3))
    max_extent = {1: 16, 2: 7, 3: 4}[rank]
    axes = [draw(axis_params(max_extent)) for _ in range(rank)]
    S, k, s, d, c = (tuple(x) for x in zip(*axes))
    # exercise int-vs-tuple normalisation when all axes agree
    k = k[0] if len(set(k)) == 1 and draw(st.booleans()) else k
    s = s[0] if len(set(s)) == 1 and draw(st.booleans()) else s
    d = d[0] if len(set(d)) == 1 and draw(st.booleans()) else d
    c = c[0] if len(set(c)) == 1 and draw(st.booleans()) else c
    Hkv = draw(st.sampled_from([1, 2]))
    H = Hkv * draw(st.sampled_from([1, 2, 3]))
    D = draw(st.integers(1, 6))
    Dv = draw(st.one_of(st.just(D), st.integers(1, 6)))
    N = draw(st.sampled_from([0, 0, 1, 3]))
    scale = draw(st.one_of(st.none(), st.floats(-2.0, 2.0, allow_nan=False, width=32)))
    B = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2 ** 16))
    return dict(rank=rank, S=S, kernel_size=k, stride=s, dilation=d, is_causal=c, B=B, H=H,
                Hkv=Hkv, D=D, Dv=Dv, N=N, scale=scale, seed=seed)


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_hypothesis_float64(prob):
    prob = dict(prob)
    check(prob.pop("rank"), prob.pop("S"), prob.pop("kernel_size"), prob.pop("stride"),
          prob.pop("dilation"), prob.pop("is_causal"), **prob)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from(["float32", "bfloat16", "float16"]))
def test_hypothesis_low_precision(prob, dtype):
    prob = dict(prob)
    if prob["scale"] is not None:
        prob["scale"] = max(-1.0, min(1.0, prob["scale"]))
    check(prob.pop("rank"), prob.pop("S"), prob.pop("kernel_size"), prob.pop("stride"),
          prob.pop("dilation"), prob.pop("is_causal"), dtype=dtype, **prob)
