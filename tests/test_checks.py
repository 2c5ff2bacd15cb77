"""Every bad input raises the contract's exception, naming the offending argument."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natten_jax
import oracle
from natten_jax import _ffi
from natten_jax.checks import NAProblem, check_na_call
from natten_jax.config import default_config

NA = {1: natten_jax.na1d, 2: natten_jax.na2d, 3: natten_jax.na3d}
SPATIAL = {1: (8,), 2: (6, 7), 3: (4, 5, 6)}


def arr(*shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


def qkv(rank, B=1, H=4, Hkv=None, D=8, Dv=None, dtype=jnp.float32):
    Hkv = H if Hkv is None else Hkv
    Dv = D if Dv is None else Dv
    S = SPATIAL[rank]
    return (arr(B, *S, H, D, dtype=dtype), arr(B, *S, Hkv, D, dtype=dtype),
            arr(B, *S, Hkv, Dv, dtype=dtype))


def rand(*shape, dtype=jnp.float64, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def rqkv(rank, B=1, H=4, Hkv=None, D=8, Dv=None, dtype=jnp.float64):
    """Random query, key, value (values to compute with; ``qkv`` gives zeros for the checks),
    float64 by default: compared with the float64 oracle to rounding error."""
    Hkv = H if Hkv is None else Hkv
    Dv = D if Dv is None else Dv
    S = SPATIAL[rank]
    return (rand(B, *S, H, D, dtype=dtype, seed=1), rand(B, *S, Hkv, D, dtype=dtype, seed=2),
            rand(B, *S, Hkv, Dv, dtype=dtype, seed=3))


def problem(rank, q=None, k=None, v=None, kernel_size=3, stride=1, dilation=1, is_causal=False,
            scale=None, **kw):
    """The NAProblem that check_na_call makes of one na{rank}d call."""
    dq, dk, dv = qkv(rank)
    return check_na_call(rank, dq if q is None else q, dk if k is None else k,
                         dv if v is None else v, kernel_size, stride, dilation, is_causal, scale,
                         **kw)


def assert_matches_oracle(out, q, k, v, kernel_size, tol=1e-12, **kw):
    """``out`` (an na*d result) equals the float64 brute force (tests/oracle.py) within tol."""
    want, _ = oracle.na_oracle(q, k, v, kernel_size, **kw)
    got = np.asarray(out.astype(jnp.float64))
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def call(rank, q=None, k=None, v=None, kernel_size=3, eager=False, **kw):
    """Call na{rank}d; by default under jax.eval_shape (checks run at trace time, no compute)."""
    dq, dk, dv = qkv(rank)
    q = dq if q is None else q
    k = dk if k is None else k
    v = dv if v is None else v
    kw.setdefault("backend", "reference")
    if eager:
        return NA[rank](q, k, v, kernel_size, **kw)
    ek = kw.pop("additional_keys", None)
    ev = kw.pop("additional_values", None)

    def f(q, k, v, ek, ev):
        return NA[rank](q, k, v, kernel_size, additional_keys=ek, additional_values=ev, **kw)
    return jax.eval_shape(f, q, k, v, ek, ev)


RANKS = [1, 2, 3]


@pytest.mark.parametrize("rank", RANKS)
def test_valid_call(rank):
    """A valid call's static problem has every argument per axis and the shapes' sizes; its
    result is NATTEN's neighborhood attention."""
    q, k, v = rqkv(rank)
    assert problem(rank, q, k, v) == NAProblem(
        rank=rank, spatial=SPATIAL[rank], kernel_size=(3,) * rank, stride=(1,) * rank,
        dilation=(1,) * rank, is_causal=(False,) * rank, scale=8 ** -0.5, batch=1, heads=4,
        heads_kv=4, head_dim=8, head_dim_v=8, num_extra=0, dtype="float64",
        config=default_config(), platform=_ffi.default_platform())
    assert_matches_oracle(NA[rank](q, k, v, 3, backend="reference"), q, k, v, 3)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(kernel_size=0), ValueError, "kernel_size"),
    (dict(kernel_size=2.0), TypeError, "kernel_size"),
    (dict(stride=4), ValueError, "stride"),
    (dict(dilation=0), ValueError, "dilation"),
    (dict(backend="nope"), ValueError, "backend"),
    (dict(additional_keys=jnp.zeros((1, 2, 4, 8))), ValueError, "additional_"),
])
def test_eager_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        call(1, eager=True, **kw)


# ------------------------------------------------------------------------------------------
# Ranks and shapes.
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("which", ["query", "key", "value"])
@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_rank(rank, which, delta):
    q, k, v = qkv(rank)
    x = {"query": q, "key": k, "value": v}
    t = x[which]
    x[which] = t[..., None] if delta > 0 else t[0]
    with pytest.raises(ValueError, match=which):
        call(rank, x["query"], x["key"], x["value"])


@pytest.mark.parametrize("rank", [1, 2])
def test_higher_rank_function_on_lower_rank_input(rank):
    q, k, v = qkv(rank)
    with pytest.raises(ValueError, match="query"):
        NA[rank + 1](q, k, v, 2, backend="reference")


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("which", ["key", "value"])
def test_batch_mismatch(rank, which):
    q, k, v = qkv(rank)
    x = {"q": q, "k": k, "v": v}
    bad = jnp.concatenate([x[which[0]]] * 2, axis=0)
    x[which[0]] = bad
    with pytest.raises(ValueError, match="batch"):
        call(rank, **x)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("which", ["key", "value"])
@pytest.mark.parametrize("axis", [0, -1])
def test_spatial_mismatch(rank, which, axis):
    q, k, v = qkv(rank)
    x = {"q": q, "k": k, "v": v}
    a = 1 + (axis % rank)
    t = x[which[0]]
    x[which[0]] = jnp.concatenate([t, t], axis=a)
    with pytest.raises(ValueError, match="spatial"):
        call(rank, **x)


@pytest.mark.parametrize("rank", RANKS)
def test_key_value_heads_mismatch(rank):
    q, k, _ = qkv(rank, H=4, Hkv=2)
    v = arr(1, *SPATIAL[rank], 4, 8)
    with pytest.raises(ValueError, match=r"(?i)head"):
        call(rank, q, k, v)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("H,Hkv", [(4, 3), (6, 4), (2, 4), (5, 2)])
def test_heads_kv_must_divide_heads(rank, H, Hkv):
    q, k, v = qkv(rank, H=H, Hkv=Hkv)
    with pytest.raises(ValueError) as e:
        call(rank, q, k, v)
    msg = str(e.value)
    assert re.search(rf"\b{H}\b", msg) and re.search(rf"\b{Hkv}\b", msg), msg


@pytest.mark.parametrize("rank", RANKS)
def test_key_head_dim_mismatch(rank):
    q, _, v = qkv(rank)
    k = arr(1, *SPATIAL[rank], 4, 6)
    with pytest.raises(ValueError, match="head_dim"):
        call(rank, q, k, v)


def test_value_head_dim_may_differ():
    q, k, v = rqkv(2, D=8, Dv=3)
    p = problem(2, q, k, v)
    assert (p.head_dim, p.head_dim_v, p.scale) == (8, 3, 8 ** -0.5)  # the scale follows q/k
    assert_matches_oracle(natten_jax.na2d(q, k, v, 3, backend="reference"), q, k, v, 3)


# ------------------------------------------------------------------------------------------
# kernel_size / stride / dilation / is_causal.
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("bad", [0, -1])
def test_kernel_size_below_one(rank, bad):
    with pytest.raises(ValueError, match="kernel_size"):
        call(rank, kernel_size=bad)
    ks = (2,) * (rank - 1) + (bad,)
    with pytest.raises(ValueError, match="kernel_size"):
        call(rank, kernel_size=ks)


@pytest.mark.parametrize("rank", RANKS)
def test_kernel_size_exceeds_extent(rank):
    S = SPATIAL[rank]
    with pytest.raises(ValueError, match=rf"kernel_size.*{S[-1] + 1}"):
        call(rank, kernel_size=(1,) * (rank - 1) + (S[-1] + 1,))
    # kernel == extent is fine
    assert problem(rank, kernel_size=S).kernel_size == S


@pytest.mark.parametrize("rank", RANKS)
def test_kernel_times_dilation_exceeds_extent(rank):
    S = SPATIAL[rank]
    # S[0] = 8, 6 or 4: kernel 3 x dilation 3 > extent; kernel 2 x dilation (S0 // 2) fits
    with pytest.raises(ValueError, match="dilation"):
        call(rank, kernel_size=3, dilation=(3,) + (1,) * (rank - 1))
    p = problem(rank, kernel_size=2, dilation=(S[0] // 2,) + (1,) * (rank - 1))
    assert (p.kernel_size, p.dilation) == ((2,) * rank, (S[0] // 2,) + (1,) * (rank - 1))
    with pytest.raises(ValueError, match="kernel_size"):
        call(rank, kernel_size=2, dilation=(S[0] // 2 + 1,) + (1,) * (rank - 1))


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("bad", [0, -2])
def test_stride_below_one(rank, bad):
    with pytest.raises(ValueError, match="stride"):
        call(rank, stride=bad)
    with pytest.raises(ValueError, match="stride"):
        call(rank, stride=(1,) * (rank - 1) + (bad,))


@pytest.mark.parametrize("rank", RANKS)
def test_stride_above_kernel(rank):
    with pytest.raises(ValueError, match="stride"):
        call(rank, kernel_size=3, stride=4)
    with pytest.raises(ValueError, match="stride"):
        call(rank, kernel_size=(3,) * rank, stride=(3,) * (rank - 1) + (4,))
    assert problem(rank, kernel_size=3, stride=3).stride == (3,) * rank


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("bad", [0, -1])
def test_dilation_below_one(rank, bad):
    with pytest.raises(ValueError, match="dilation"):
        call(rank, dilation=bad)
    with pytest.raises(ValueError, match="dilation"):
        call(rank, dilation=(bad,) + (1,) * (rank - 1))


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("name,good", [("kernel_size", 2), ("stride", 1), ("dilation", 1),
                                       ("is_causal", False)])
@pytest.mark.parametrize("delta", [-1, 1])
def test_tuple_of_wrong_length(rank, name, good, delta):
    n = rank + delta
    if n == 0:
        val = ()
    else:
        val = (good,) * n
    kw = {name: val}
    if name != "kernel_size":
        kw["kernel_size"] = 2
    with pytest.raises(ValueError, match=name):
        call(rank, **kw)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("bad", [3.0, None, "3", True, 2.5, [3.0] * 3, np.float32(3)])
def test_non_int_kernel_size(rank, bad):
    if isinstance(bad, list):
        bad = tuple(bad[:rank])
    with pytest.raises(TypeError, match="kernel_size"):
        call(rank, kernel_size=bad)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("name", ["stride", "dilation"])
@pytest.mark.parametrize("bad", [1.0, None, "1"])
def test_non_int_stride_dilation(rank, name, bad):
    with pytest.raises(TypeError, match=name):
        call(rank, **{name: bad})
    with pytest.raises(TypeError, match=name):
        call(rank, **{name: (1,) * (rank - 1) + (bad,)})


@pytest.mark.parametrize("rank", [2, 3])
def test_mixed_int_tuple_inside_tuple(rank):
    with pytest.raises(TypeError, match="kernel_size"):
        call(rank, kernel_size=(3,) * (rank - 1) + ((3,),))


def test_numpy_int_scalars_accepted():
    """NumPy integer scalars become Python ints: the same (hashable, jit-static) problem and the
    same result as with Python ints."""
    q, k, v = rqkv(2)
    np_args = dict(kernel_size=(np.int64(3), np.int32(2)), stride=np.int16(2),
                   dilation=np.uint8(1))
    p = problem(2, q, k, v, **np_args)
    assert (p.kernel_size, p.stride, p.dilation) == ((3, 2), (2, 2), (1, 1))
    assert all(type(x) is int for x in p.kernel_size + p.stride + p.dilation)
    py = problem(2, q, k, v, kernel_size=(3, 2), stride=2, dilation=1)
    assert p == py and hash(p) == hash(py)
    out = natten_jax.na2d(q, k, v, backend="reference", **np_args)
    assert_matches_oracle(out, q, k, v, (3, 2), stride=2)


@pytest.mark.parametrize("bad", [1, "yes", None, (1, 0)])
def test_bad_is_causal(bad):
    with pytest.raises((TypeError, ValueError), match="is_causal"):
        call(2, is_causal=bad)


def test_numpy_bool_is_causal_accepted():
    q, k, v = rqkv(2)
    p = problem(2, q, k, v, is_causal=(np.bool_(True), False))
    assert p.is_causal == (True, False) and all(type(c) is bool for c in p.is_causal)
    assert p == problem(2, q, k, v, is_causal=(True, False))
    out = natten_jax.na2d(q, k, v, 3, is_causal=(np.bool_(True), False), backend="reference")
    assert_matches_oracle(out, q, k, v, 3, is_causal=(True, False))


# ------------------------------------------------------------------------------------------
# dtypes.
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.bool_, jnp.complex64, jnp.uint8])
def test_non_floating_dtype(rank, dtype):
    q, k, v = qkv(rank, dtype=dtype)
    with pytest.raises(TypeError, match="query"):
        call(rank, q, k, v)
    # only one of them bad
    fq, fk, fv = qkv(rank)
    with pytest.raises(TypeError, match="key"):
        call(rank, fq, k, fv)
    with pytest.raises(TypeError, match="value"):
        call(rank, fq, fk, v)


@pytest.mark.parametrize("dtype,tol", [(jnp.float16, 4e-3), (jnp.bfloat16, 3e-2),
                                       (jnp.float32, 1e-5), (jnp.float64, 1e-12)])
def test_floating_dtypes_accepted(dtype, tol):
    """Each floating dtype runs in its own precision (float64 is not computed in float32) and
    returns its dtype."""
    q, k, v = rqkv(1, dtype=dtype)
    assert problem(1, q, k, v).dtype == jnp.dtype(dtype).name
    with jax.default_matmul_precision("highest"):  # not a GPU's TF32 default for float32
        out = natten_jax.na1d(q, k, v, 3, backend="reference")
    assert out.dtype == dtype
    assert_matches_oracle(out, q, k, v, 3, tol=tol)


def test_mixed_float_dtypes_rejected():
    q, k, v = qkv(1)
    with pytest.raises(TypeError):
        call(1, q, k.astype(jnp.float16), v)
    with pytest.raises(TypeError):
        call(1, q.astype(jnp.bfloat16), k, v)


def test_numpy_inputs_with_bad_dtype():
    q, k, v = (np.zeros((1, 8, 2, 4), np.int64) for _ in range(3))
    with pytest.raises(TypeError, match="query"):
        natten_jax.na1d(q, k, v, 3, backend="reference")


# ------------------------------------------------------------------------------------------
# backend.
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["cuda", "Reference", "", "natten"])
def test_unknown_backend(bad):
    with pytest.raises(ValueError, match="backend"):
        call(1, backend=bad)


def test_fused_backend_on_cpu_raises_not_implemented():
    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("a GPU is visible")
    q, k, v = qkv(1, dtype=jnp.float16, D=32)
    with pytest.raises(NotImplementedError) as e:
        call(1, q, k, v, backend="fused")
    assert str(e.value).strip(), "NotImplementedError must say why"


# ------------------------------------------------------------------------------------------
# additional keys / values.
# ------------------------------------------------------------------------------------------

def extra(B=1, N=3, Hkv=4, D=8, dtype=jnp.float32):
    return arr(B, N, Hkv, D, dtype=dtype)


@pytest.mark.parametrize("rank", RANKS)
def test_additional_keys_without_values(rank):
    with pytest.raises(ValueError, match="additional_"):
        call(rank, additional_keys=extra())
    with pytest.raises(ValueError, match="additional_"):
        call(rank, additional_values=extra())


def test_additional_kv_valid():
    """Additional tokens (here with grouped-query heads) are attended by every query."""
    q, k, v = rqkv(2, H=4, Hkv=2)
    ek, ev = rand(1, 3, 2, 8, seed=4), rand(1, 3, 2, 8, seed=5)
    p = problem(2, q, k, v, additional_keys=ek, additional_values=ev)
    assert (p.num_extra, p.heads, p.heads_kv) == (3, 4, 2)
    out = natten_jax.na2d(q, k, v, 3, additional_keys=ek, additional_values=ev,
                          backend="reference")
    assert_matches_oracle(out, q, k, v, 3, additional_keys=ek, additional_values=ev)


@pytest.mark.parametrize("which,shape", [
    ("additional_keys", (2, 3, 4, 8)),     # batch
    ("additional_keys", (1, 3, 2, 8)),     # kv heads
    ("additional_keys", (1, 3, 4, 5)),     # head dim
    ("additional_keys", (1, 3, 4)),        # rank
    ("additional_keys", (1, 3, 1, 4, 8)),  # rank
    ("additional_values", (1, 2, 4, 8)),   # N differs from keys
    ("additional_values", (1, 3, 4, 8, 1)),
    ("additional_values", (1, 3, 3, 8)),
    ("additional_values", (2, 3, 4, 8)),
])
def test_additional_kv_bad_shapes(which, shape):
    kw = {"additional_keys": extra(), "additional_values": extra()}
    kw[which] = arr(*shape)
    with pytest.raises(ValueError, match=which):
        call(1, **kw)


def test_additional_values_head_dim_follows_value():
    q, k, v = rqkv(1, D=8, Dv=3)
    ek, ev = rand(1, 3, 4, 8, seed=4), rand(1, 3, 4, 3, seed=5)
    p = problem(1, q, k, v, additional_keys=ek, additional_values=ev)
    assert (p.head_dim, p.head_dim_v, p.num_extra) == (8, 3, 3)
    out = natten_jax.na1d(q, k, v, 3, additional_keys=ek, additional_values=ev,
                          backend="reference")
    assert_matches_oracle(out, q, k, v, 3, additional_keys=ek, additional_values=ev)
    with pytest.raises(ValueError, match="additional_values"):
        call(1, q, k, v, additional_keys=ek, additional_values=rand(1, 3, 4, 8))


def test_additional_kv_bad_dtype():
    with pytest.raises((TypeError, ValueError), match="additional_keys"):
        call(1, additional_keys=extra(dtype=jnp.int32), additional_values=extra())


# ------------------------------------------------------------------------------------------
# Checks fire under transformations too (shapes are static).
# ------------------------------------------------------------------------------------------

def test_checks_under_jit_and_vmap():
    q, k, v = qkv(1)
    with pytest.raises(ValueError, match="kernel_size"):
        jax.jit(lambda q, k, v: natten_jax.na1d(q, k, v, 9, backend="reference"))(q, k, v)
    with pytest.raises(ValueError, match="stride"):
        jax.vmap(lambda q, k, v: natten_jax.na1d(q, k, v, 3, 4, backend="reference"))(
            q[None], k[None], v[None])
    # vmap strips the leading axis: a 4-D input is rank-1 per example and valid...
    rq, rk, rv = rqkv(1)
    out = jax.vmap(lambda q, k, v: natten_jax.na1d(q, k, v, 3, backend="reference"))(
        rq[None], rk[None], rv[None])
    assert_matches_oracle(out[0], rq, rk, rv, 3)
    # ...and a plain 4-D input under vmap is 3-D per example: invalid
    with pytest.raises(ValueError, match="query"):
        jax.vmap(lambda q, k, v: natten_jax.na1d(q, k, v, 3, backend="reference"))(q, k, v)


def test_additional_kv_not_arrays():
    with pytest.raises(TypeError, match="additional_keys"):
        call(1, eager=True, additional_keys=[[0.0]], additional_values=extra())
    with pytest.raises(TypeError, match="additional_values"):
        call(1, eager=True, additional_keys=extra(), additional_values="v")


# ------------------------------------------------------------------------------------------
# Flax layers' arguments (natten_jax.checks.check_layer_args / check_layer_input).
# ------------------------------------------------------------------------------------------

LAYER_OK = dict(rank=2, embed_dim=64, num_heads=4, kernel_size=7, dilation=1, stride=1,
                is_causal=False, num_kv_heads=None, qk_scale=None, proj_drop=0.0,
                backend=None)


def test_layer_args_normalised():
    from natten_jax.checks import check_layer_args

    assert check_layer_args(**LAYER_OK) == (4, (7, 7), (1, 1), (1, 1), (False, False))
    got = check_layer_args(**dict(LAYER_OK, num_kv_heads=np.int64(2), kernel_size=(3, 5),
                                  stride=(3, 1), is_causal=(True, False), qk_scale=0.5,
                                  backend_config=natten_jax.FusedConfig()))
    assert got == (2, (3, 5), (1, 1), (3, 1), (True, False))


@pytest.mark.parametrize("change,exc,match", [
    (dict(rank=4), ValueError, "rank"),
    (dict(embed_dim=0), ValueError, "embed_dim"),
    (dict(embed_dim=64.0), TypeError, "embed_dim"),
    (dict(num_heads=True), TypeError, "num_heads"),
    (dict(num_heads=3), ValueError, r"embed_dim.*64.*num_heads.*3"),
    (dict(num_kv_heads=3), ValueError, "num_kv_heads"),
    (dict(num_kv_heads=0), ValueError, "num_kv_heads"),
    (dict(kernel_size=(3,)), ValueError, "kernel_size"),
    (dict(dilation=0), ValueError, "dilation"),
    (dict(stride=8), ValueError, "stride"),
    (dict(is_causal="no"), TypeError, "is_causal"),
    (dict(qk_scale="1"), TypeError, "qk_scale"),
    (dict(qk_scale=-1.0), ValueError, "qk_scale"),
    (dict(proj_drop=None), TypeError, "proj_drop"),
    (dict(proj_drop=1.5), ValueError, "proj_drop"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(backend_config="fast"), TypeError, "backend_config"),
])
def test_layer_args_errors(change, exc, match):
    from natten_jax.checks import check_layer_args

    with pytest.raises(exc, match=match):
        check_layer_args(**dict(LAYER_OK, **change))


def test_layer_input():
    from natten_jax.checks import check_layer_input

    check_layer_input("Layer", 2, 64, arr(1, 5, 6, 64))
    with pytest.raises(ValueError, match=r"Layer expects input of rank 4.*\(1, 5, 64\)"):
        check_layer_input("Layer", 2, 64, arr(1, 5, 64))
    with pytest.raises(ValueError, match="embed_dim=64"):
        check_layer_input("Layer", 2, 64, arr(1, 5, 6, 32))
    with pytest.raises(TypeError, match="array"):
        check_layer_input("Layer", 2, 64, [[0.0]])


def test_image_extent():
    from natten_jax.checks import check_image_extent

    x = arr(2, 10, 12, 3)
    got = check_image_extent("NAT", x, [[10, 12], [3, 1]])
    assert isinstance(got, np.ndarray) and got.dtype == np.int32
    np.testing.assert_array_equal(got, [[10, 12], [3, 1]])
    with pytest.raises(ValueError, match=r"NAT: `valid_extent` must lie in \[1, 12\] on axis 1.*"
                                         r"valid_extent\[1, 1\] = 13"):
        check_image_extent("NAT", x, np.array([[10, 12], [3, 13]]))
    with pytest.raises(ValueError, match=r"`valid_extent` must have shape \[batch, 2\]"):
        check_image_extent("NAT", x, np.array([[10, 12]]))
    with pytest.raises(TypeError, match="`valid_extent` must have an integer dtype"):
        check_image_extent("NAT", x, np.ones((2, 2)))
    # traced: clamped into [1, H] x [1, W], not checked
    clamped = jax.jit(lambda e: check_image_extent("NAT", x, e))(jnp.array([[0, 99], [5, 5]]))
    np.testing.assert_array_equal(clamped, [[1, 12], [5, 5]])


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_ragged_args_checked_per_rank(rank):
    q, k, v = qkv(rank, B=2)
    S = SPATIAL[rank]
    good = np.tile(np.asarray(S), (2, 1))
    p = check_na_call(rank, q, k, v, 2, 1, 1, False, None, valid_extent=good)
    assert p.ragged and not p.ragged_extra
    small = good.copy()
    small[1, rank - 1] = 1
    with pytest.raises(ValueError, match=rf"valid_extent\[1, {rank - 1}\] = 1"):
        check_na_call(rank, q, k, v, 2, 1, 1, False, None, valid_extent=small)
    with pytest.raises(ValueError, match=rf"\[batch, rank\] = \(2, {rank}\)"):
        check_na_call(rank, q, k, v, 2, 1, 1, False, None, valid_extent=good[:, :1].repeat(
            rank + 1, axis=1))
