"""The fused (FNA) forward, sm80 (mma.sync) kernels, against the float64 reference, per element.

GPU tests (marked ``gpu``) force the sm80 kernels (``FusedConfig(forward_impl="sm80")``; the
sm90 ones have tests/test_fused_sm90.py) with outputs poisoned, and compare the output and the
logsumexp element by element with FlashAttention's rule (:func:`oracle.assert_close_to_ref64`):
the error against the reference backend in float64 may be at most twice that of the reference
backend in the kernels' precision, plus a rounding allowance. The reference runs on the CPU.

CPU tests check that rule itself: a NumPy emulation of a correct kernel's arithmetic
(probabilities rounded to the input precision before they multiply V) passes it, and the same
emulation with a neighbourhood wrong by a single (query, key) pair fails it, in the output and
in the logsumexp alike.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natten_jax
import oracle
from natten_jax import FusedConfig
from natten_jax.backends import fused
from natten_jax.checks import check_na_call
from natten_jax.tiles import _candidates

fused.POISON_OUTPUTS = True  # every output element must be written by the kernel

CPU = jax.devices("cpu")[0]
# The sm80 kernels in both directions (tests/test_fused_sm90.py and test_fused_backward_sm90.py
# run the sm90 ones).
SM80 = FusedConfig(forward_impl="sm80", backward_impl="sm80", backward="kernel")
# The logsumexp is float32 in the kernels and in the reference whatever the inputs' precision:
# an absolute allowance for float32 arithmetic in another order (about 1e-6 here), far below
# what one key more or less in a window changes (its probability, ~1 / window).
LSE_ATOL = 1e-4

# (spatial, kernel, stride, dilation, causal)
CASES = [
    ((100,), 7, 1, 1, False),
    ((257,), 64, 1, 1, False),
    ((300,), 33, 4, 3, True),
    ((64,), 64, 1, 1, False),
    ((1000,), 17, 5, 2, False),
    ((17, 23), (5, 7), (2, 3), (2, 1), (True, False)),
    ((32, 32), 8, 1, 1, False),
    ((40, 33), 11, 1, 3, False),
    ((9, 70), (9, 31), (1, 1), (1, 2), (False, True)),
    ((31, 29), (6, 4), (3, 2), (1, 1), (False, False)),
    ((6, 10, 12), (3, 5, 4), (1, 2, 2), (2, 1, 3), (True, False, False)),
    ((8, 16, 16), 7, 1, 1, False),
    ((5, 9, 20), (2, 3, 6), (2, 3, 1), (2, 3, 3), (False, True, True)),
]


def _inputs(key, spatial, B, H, Hkv, D, dtype):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (B, *spatial, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, *spatial, Hkv, D), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, *spatial, Hkv, D), jnp.float32).astype(dtype)
    return q, k, v


# ---------------------------------------------------------------------------------------------
# References and the per-element check (used by every fused test)


def lowp_dtype(dtype):
    """The dtype of the low-precision reference for inputs of ``dtype``: the inputs' own (the
    float32 kernels' references are chosen by precision in tests/test_fp32_fused.py)."""
    return jnp.dtype(dtype)


def on_cpu(x, dtype=None):
    """``x`` as a CPU array (in ``dtype`` if given)."""
    x = jax.device_put(np.asarray(x), CPU)
    return x if dtype is None else x.astype(dtype)


def reference_forward(q, k, v, kernel, stride=1, dilation=1, causal=False, scale=None,
                      extra=None):
    """((out64, lse64), (out_lowp, lse_lowp)): the reference backend on the CPU in float64 and
    in :func:`lowp_dtype` of the inputs. ``extra``: (additional_keys, additional_values)."""
    f = getattr(natten_jax, f"na{q.ndim - 3}d")

    def run(dtype):
        with jax.default_device(CPU):
            kw = {}
            if extra is not None:
                kw = dict(additional_keys=on_cpu(extra[0], dtype),
                          additional_values=on_cpu(extra[1], dtype))
            out, lse = f(on_cpu(q, dtype), on_cpu(k, dtype), on_cpu(v, dtype), kernel, stride,
                         dilation, causal, scale, backend="reference", return_lse=True, **kw)
            return np.asarray(out), np.asarray(lse)

    return run(jnp.float64), run(lowp_dtype(q.dtype))


def check_forward(out, lse, refs, name=""):
    """``out`` and ``lse`` against ``refs`` (from :func:`reference_forward`), per element."""
    (out64, lse64), (out_lowp, lse_lowp) = refs
    prefix = f"{name}: " if name else ""
    oracle.assert_close_to_ref64(np.asarray(out.astype(jnp.float32)), out64, out_lowp,
                                 name=f"{prefix}out")
    oracle.assert_close_to_ref64(np.asarray(lse), lse64, lse_lowp, atol=LSE_ATOL,
                                 name=f"{prefix}lse")


def check_forward_case(q, k, v, out, lse, kernel, stride=1, dilation=1, causal=False,
                       scale=None, extra=None, name=""):
    check_forward(out, lse, reference_forward(q, k, v, kernel, stride, dilation, causal, scale,
                                              extra), name)


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_matches_reference(case, dtype):
    spatial, kernel, stride, dilation, causal = CASES[case]
    rank = len(spatial)
    D = (32, 64, 128)[case % 3]
    H, Hkv = [(4, 4), (4, 2), (4, 1)][case % 3]
    key = jax.random.PRNGKey(1000 + case)
    q, k, v = _inputs(key, spatial, 2, H, Hkv, D, dtype)
    f = getattr(natten_jax, f"na{rank}d")
    call = jax.jit(lambda q, k, v: f(q, k, v, kernel, stride, dilation, causal, backend="fused",
                                     backend_config=SM80, return_lse=True))
    assert fused.TARGET in call.lower(q, k, v).as_text()
    out, lse = call(q, k, v)
    check_forward_case(q, k, v, out, lse, kernel, stride, dilation, causal,
                       name=f"case {case} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_every_tile_shape(rank, head_dim):
    """Each legal (Q tile, KV tile) shape gives the same answer (tile choice is a tuning knob;
    head dim 32 also skips 16-key chunks, whose shape follows the KV tile's)."""
    spatial = {1: (150,), 2: (21, 19), 3: (7, 9, 11)}[rank]
    kernel = {1: 13, 2: (5, 6), 3: (3, 4, 5)}[rank]
    dilation = {1: 2, 2: (1, 2), 3: (2, 1, 1)}[rank]
    q, k, v = _inputs(jax.random.PRNGKey(rank), spatial, 1, 2, 1, head_dim, "bfloat16")
    p = check_na_call(rank, q, k, v, kernel, 1, dilation, False, None, backend_config=SM80)
    refs = reference_forward(q, k, v, kernel, 1, dilation, False)
    q_cands = _candidates(rank, 6) + _candidates(rank, 7)
    rng = np.random.default_rng(rank)
    pairs = list(itertools.product(q_cands, _candidates(rank, 6)))
    picks = [pairs[i] for i in rng.choice(len(pairs), size=min(len(pairs), 16), replace=False)]
    # every KV tile shape once more, with a random Q tile (the chunk shapes follow the KV tile)
    picks += [(q_cands[rng.integers(len(q_cands))], kt) for kt in _candidates(rank, 6)]
    for qt, kt in picks:
        out, lse = fused._forward_call(p, q, k, v, tiles=(qt, kt), impl="sm80")
        check_forward(out, lse, refs, name=f"tiles {qt} {kt}")


@pytest.mark.gpu
def test_scale_extra_tokens_and_vmap():
    spatial, kernel = (12, 14), (5, 3)
    q, k, v = _inputs(jax.random.PRNGKey(7), spatial, 2, 4, 2, 64, "bfloat16")
    ek = jax.random.normal(jax.random.PRNGKey(8), (2, 5, 2, 64)).astype(jnp.bfloat16)
    ev = jax.random.normal(jax.random.PRNGKey(9), (2, 5, 2, 64)).astype(jnp.bfloat16)
    out, lse = natten_jax.na2d(q, k, v, kernel, scale=0.3, additional_keys=ek,
                               additional_values=ev, backend="fused", backend_config=SM80,
                               return_lse=True)
    check_forward_case(q, k, v, out, lse, kernel, scale=0.3, extra=(ek, ev), name="extra")
    # vmap over an extra leading axis folds into batch: the same kernel on the same rows.
    qs, ks_, vs = (jnp.stack([x, x[::-1]]) for x in (q, k, v))
    na = lambda q, k, v: natten_jax.na2d(q, k, v, kernel, backend="fused",  # noqa: E731
                                         backend_config=SM80)
    outs = jax.vmap(na)(qs, ks_, vs)
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(outs[i]), np.asarray(na(qs[i], ks_[i], vs[i])))


@pytest.mark.gpu
def test_default_backend_is_fused_on_gpu():
    q, k, v = _inputs(jax.random.PRNGKey(3), (16, 16), 1, 2, 2, 32, "float16")
    default = jax.jit(lambda q, k, v: natten_jax.na2d(q, k, v, 5))
    assert fused.TARGET in default.lower(q, k, v).as_text()
    explicit = jax.jit(lambda q, k, v: natten_jax.na2d(q, k, v, 5, backend="fused"))
    np.testing.assert_array_equal(np.asarray(default(q, k, v)), np.asarray(explicit(q, k, v)))


@pytest.mark.gpu
def test_unsupported_head_dim_raises_and_default_falls_back():
    """Above the largest built head dim (smaller ones run zero-padded: test_head_dim_padding)."""
    q, k, v = _inputs(jax.random.PRNGKey(4), (16,), 1, 2, 2, 160, "bfloat16")
    with pytest.raises(NotImplementedError, match="head_dim"):
        natten_jax.na1d(q, k, v, 5, backend="fused")
    # backend=None: the reference backend runs it (no fused custom call), with its result.
    default = jax.jit(lambda q, k, v: natten_jax.na1d(q, k, v, 5))
    assert fused.TARGET not in default.lower(q, k, v).as_text()
    reference = jax.jit(lambda q, k, v: natten_jax.na1d(q, k, v, 5, backend="reference"))
    np.testing.assert_array_equal(np.asarray(default(q, k, v)), np.asarray(reference(q, k, v)))


# ---------------------------------------------------------------------------------------------
# CPU: the comparison rule admits a correct kernel's rounding and rejects a wrong neighbourhood


def flash_like_forward(q, k, v, mask, scale=None):
    """What a correct fused kernel computes, emulated in NumPy: float32 logits of the inputs,
    probabilities exp(s - max) in float32, rounded to the inputs' precision before they multiply
    V (FlashAttention's arithmetic), float32 sums and accumulation, the output rounded to the
    inputs' precision; the logsumexp in float32. ``mask``: bool [T, T] (query, key); MHA
    (equal heads). Returns (out, lse) as NumPy arrays."""
    dt = np.dtype(q.dtype)
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    S = q.shape[1:-2]
    T = int(np.prod(S))
    scale = D ** -0.5 if scale is None else scale
    f32 = lambda x: np.asarray(x).astype(np.float32).reshape(B, T, H, -1)  # noqa: E731
    qf, kf, vf = f32(q), f32(k), f32(v)
    s = np.einsum("bqhd,bkhd->bhqk", qf, kf) * np.float32(scale)
    s = np.where(mask[None, None], s, -np.inf).astype(np.float32)
    mx = s.max(-1, keepdims=True)
    p = np.exp(s - mx).astype(np.float32)
    total = p.sum(-1, keepdims=True)
    p_lowp = p.astype(dt).astype(np.float32)
    out = np.einsum("bhqk,bkhe->bqhe", p_lowp, vf) / np.moveaxis(total, 1, 2)
    lse = np.moveaxis((mx + np.log(total))[..., 0], 1, 2)
    return out.astype(dt).reshape(q.shape), lse.astype(np.float32).reshape(q.shape[:-1])


# (spatial, kernel, stride, dilation, causal): small enough for dense [T, T] masks on the CPU.
EMULATED = [
    ((60,), 7, 1, 1, False),
    ((120,), 33, 4, 3, True),
    ((200,), 150, 1, 1, False),  # a large window: one key is 1/150 of the weight
    ((17, 13), (5, 6), (2, 3), (2, 1), (True, False)),
    ((6, 7, 8), (3, 5, 4), (1, 2, 2), (2, 1, 2), (False, True, False)),
]


def emulated_inputs(case, dtype):
    """CPU inputs of EMULATED[case] and its dense mask (tests/oracle.py)."""
    spatial, kernel, stride, dilation, causal = EMULATED[case]
    q, k, v = _inputs(jax.random.PRNGKey(case), spatial, 2, 2, 2, 64, dtype)
    return tuple(on_cpu(x) for x in (q, k, v)), oracle.na_mask(spatial, kernel, stride, dilation,
                                                               causal)


def _emulated_case(case, dtype):
    (q, k, v), mask = emulated_inputs(case, dtype)
    _, kernel, stride, dilation, causal = EMULATED[case]
    return (q, k, v), mask, reference_forward(q, k, v, kernel, stride, dilation, causal)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", range(len(EMULATED)))
def test_rule_admits_kernel_arithmetic(case, dtype):
    (q, k, v), mask, refs = _emulated_case(case, dtype)
    out, lse = flash_like_forward(q, k, v, mask)
    check_forward(out, lse, refs, name="emulated kernel")


def one_key_wrong(mask, how, rng):
    """``mask`` with a single (query, key) pair wrong: ``drop`` a neighbour of one query,
    ``add`` a non-neighbour to one query."""
    bad = mask.copy()
    want = mask if how == "drop" else ~mask
    rows = np.nonzero(want.any(1) & (mask.sum(1) > 1 if how == "drop" else True))[0]
    qi = int(rng.choice(rows))
    ki = int(rng.choice(np.nonzero(want[qi])[0]))
    bad[qi, ki] = not bad[qi, ki]
    return bad, qi


@pytest.mark.parametrize("how", ["drop", "add"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", range(len(EMULATED)))
def test_rule_rejects_one_wrong_key(case, dtype, how):
    """One (query, key) pair masked wrongly, in every batch and head: the output check fails and
    the logsumexp check fails, each on its own; the latter at that query (its atol is far below
    one key's probability)."""
    (q, k, v), mask, refs = _emulated_case(case, dtype)
    bad, qi = one_key_wrong(mask, how, np.random.default_rng(case))
    out, lse = flash_like_forward(q, k, v, bad)
    with pytest.raises(AssertionError, match="out: .* exceed"):
        oracle.assert_close_to_ref64(out.astype(np.float32), refs[0][0], refs[1][0], name="out")
    with pytest.raises(AssertionError, match="lse: .* worst at index") as info:
        oracle.assert_close_to_ref64(lse, refs[0][1], refs[1][1], atol=LSE_ATOL, name="lse")
    # the worst element is at the wrong query (flattened token index qi)
    idx = tuple(int(x) for x in str(info.value).split("worst at index (")[1].split(")")[0]
                .split(","))
    assert np.ravel_multi_index(idx[1:-1], EMULATED[case][0]) == qi


def test_rule_rejects_unwritten_elements():
    """A NaN (an element the kernel did not write, the custom call poisons outputs) fails, and
    the message names it."""
    (q, k, v), mask, refs = _emulated_case(0, "bfloat16")
    out, lse = flash_like_forward(q, k, v, mask)
    out = out.astype(np.float32)
    out[1, 17, 0, 5] = np.nan
    with pytest.raises(AssertionError, match=r"worst at index \(1, 17, 0, 5\): x=nan.*"
                                             r"non-finite x elements: 1"):
        oracle.assert_close_to_ref64(out, refs[0][0], refs[1][0], name="out")


def test_rule_error_message_and_atol():
    ref64 = np.array([[1.0, -2.0], [0.5, 3.0]])
    lowp = ref64.astype(jnp.bfloat16)
    x = ref64.copy()
    oracle.assert_close_to_ref64(x, ref64, lowp)
    atol = oracle.rounding_atol(ref64, jnp.bfloat16)
    assert atol == 2 * 2.0 ** -8  # in bfloat16, 1.0 + 0.3 = 1.296875, minus 0.3 = 0.99609375
    x[1, 0] += 1.01 * atol
    with pytest.raises(AssertionError) as info:
        oracle.assert_close_to_ref64(x, ref64, lowp, name="t")
    msg = str(info.value)
    assert msg.startswith("t: 1 of 4 elements") and "worst at index (1, 0)" in msg
    oracle.assert_close_to_ref64(x, ref64, lowp, atol=1.02 * atol)
    # the multiple of the low-precision reference's error counts per element
    lowp = ref64.copy()
    lowp[1, 0] += atol
    oracle.assert_close_to_ref64(x, ref64, lowp, atol=0.0, m=1.02)
    with pytest.raises(AssertionError):
        oracle.assert_close_to_ref64(x, ref64, lowp, atol=0.0, m=1.0)
    with pytest.raises(AssertionError, match="shapes differ"):
        oracle.assert_close_to_ref64(x[0], ref64, lowp)
