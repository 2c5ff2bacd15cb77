"""Every bad input raises the contract's exception, naming the offending argument."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natten_jax

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


def test_valid_call_passes():
    for r in RANKS:
        out = call(r)
        assert out.shape == (1,) + SPATIAL[r] + (4, 8)
    assert call(1, eager=True).shape == (1, 8, 4, 8)


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
    q, k, v = qkv(2, D=8, Dv=3)
    assert call(2, q, k, v).shape == (1, 6, 7, 4, 3)


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
    call(rank, kernel_size=S)


@pytest.mark.parametrize("rank", RANKS)
def test_kernel_times_dilation_exceeds_extent(rank):
    S = SPATIAL[rank]
    # S[0] = 8, 6 or 4: kernel 3 x dilation 3 > extent; kernel 2 x dilation (S0 // 2) fits
    with pytest.raises(ValueError, match="dilation"):
        call(rank, kernel_size=3, dilation=(3,) + (1,) * (rank - 1))
    call(rank, kernel_size=2, dilation=(S[0] // 2,) + (1,) * (rank - 1))
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
    call(rank, kernel_size=3, stride=3)


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
    call(2, kernel_size=(np.int64(3), np.int32(2)), stride=np.int16(2), dilation=np.uint8(1))


@pytest.mark.parametrize("bad", [1, "yes", None, (1, 0)])
def test_bad_is_causal(bad):
    with pytest.raises((TypeError, ValueError), match="is_causal"):
        call(2, is_causal=bad)


def test_numpy_bool_is_causal_accepted():
    call(2, is_causal=(np.bool_(True), False))


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


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
def test_floating_dtypes_accepted(dtype):
    q, k, v = qkv(1, dtype=dtype)
    out = call(1, q, k, v)
    assert out.dtype == dtype


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
    out = call(2, additional_keys=extra(), additional_values=extra())
    assert out.shape == (1, 6, 7, 4, 8)


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
    q, k, v = qkv(1, D=8, Dv=3)
    out = call(1, q, k, v, additional_keys=extra(D=8), additional_values=extra(D=3))
    assert out.shape == (1, 8, 4, 3)
    with pytest.raises(ValueError, match="additional_values"):
        call(1, q, k, v, additional_keys=extra(D=8), additional_values=extra(D=8))


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
    jax.vmap(lambda q, k, v: natten_jax.na1d(q, k, v, 3, backend="reference"))(
        q[None], k[None], v[None])
    # ...and a plain 4-D input under vmap is 3-D per example: invalid
    with pytest.raises(ValueError, match="query"):
        jax.vmap(lambda q, k, v: natten_jax.na1d(q, k, v, 3, backend="reference"))(q, k, v)
