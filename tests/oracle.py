"""Brute-force float64 oracle for neighborhood attention (NATTEN's semantics).

Deliberately independent of ``natten_jax.window``: the mask is transcribed from NATTEN's
reference mask (``csrc/include/natten/cuda/reference/mask.hpp``)::

    window_left = k // 2 ; window_right = k // 2 + (k % 2) - 1
    qkv_fix_dilation(L, d, g) = L // d + 1 - ((g + (d - (L % d))) // d)
    get_win_start(i, wl, wr, s, L, causal):
      causal:     leader = min((i // s) * s + s - 1, L - 1); return max(leader - wl - wr, 0)
      not causal: leader = min((i // s) * s + s // 2, L - 1)
                  return max(leader - wl, 0) + (L - wr - leader - 1 if leader + wr >= L else 0)
    get_win_end(i, start, k, L, causal): causal: min(i + 1, L); else start + k

Key ``y`` is a neighbor of query ``x`` iff on every axis both are in the same dilation group and
``start <= y // d < end`` (start/end from the query's in-group index and its group's extent).

Everything here is plain Python loops / NumPy float64; ``dense_masked_attention`` is the same
computation in jax.numpy (differentiable) for gradient checks on tiny problems.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np


# --------------------------------------------------------------------------------------------
# NATTEN's window formulas, transcribed (scalar Python ints only).
# --------------------------------------------------------------------------------------------

def natten_window_left(k: int) -> int:
    return k // 2


def natten_window_right(k: int) -> int:
    return k // 2 + (k % 2) - 1


def qkv_fix_dilation(L: int, d: int, g: int) -> int:
    """Extent of dilation group ``g`` on an axis of ``L`` tokens."""
    return L // d + 1 - ((g + (d - (L % d))) // d)


def get_win_start(i: int, wl: int, wr: int, s: int, L: int, causal: bool) -> int:
    if causal:
        leader = min((i // s) * s + s - 1, L - 1)
        return max(leader - wl - wr, 0)
    leader = min((i // s) * s + s // 2, L - 1)
    return max(leader - wl, 0) + ((L - wr - leader - 1) if leader + wr >= L else 0)


def get_win_end(i: int, start: int, k: int, L: int, causal: bool) -> int:
    if causal:
        return min(i + 1, L)
    return start + k


def natten_bounds(x: int, k: int, s: int, d: int, L: int, causal: bool):
    """(start, end) in-group indices of global query coordinate ``x`` on one axis."""
    g = x % d
    i = x // d
    Lg = qkv_fix_dilation(L, d, g)
    start = get_win_start(i, natten_window_left(k), natten_window_right(k), s, Lg, causal)
    end = get_win_end(i, start, k, Lg, causal)
    return start, end


def natten_is_neighbor_1d(x: int, y: int, k: int, s: int, d: int, L: int, causal: bool) -> bool:
    if x % d != y % d:
        return False
    start, end = natten_bounds(x, k, s, d, L, causal)
    return start <= y // d < end


def _per_axis(v, rank, name):
    if isinstance(v, (tuple, list)):
        assert len(v) == rank, (name, v, rank)
        return tuple(v)
    return (v,) * rank


def mask_1d(L: int, k: int, s: int, d: int, causal: bool) -> np.ndarray:
    """bool [L, L]: m[x, y] = key y is a neighbor of query x on this axis."""
    m = np.zeros((L, L), bool)
    for x in range(L):
        for y in range(L):
            m[x, y] = natten_is_neighbor_1d(x, y, k, s, d, L, causal)
    return m


def na_mask(shape, kernel_size, stride=1, dilation=1, is_causal=False) -> np.ndarray:
    """bool [T, T] over row-major flattened tokens: [query, key]."""
    shape = tuple(int(s) for s in shape)
    rank = len(shape)
    ks = tuple(int(x) for x in _per_axis(kernel_size, rank, "kernel_size"))
    st = tuple(int(x) for x in _per_axis(stride, rank, "stride"))
    di = tuple(int(x) for x in _per_axis(dilation, rank, "dilation"))
    ca = tuple(bool(x) for x in _per_axis(is_causal, rank, "is_causal"))
    return _na_mask_cached(shape, ks, st, di, ca).copy()


@functools.lru_cache(maxsize=4096)
def _na_mask_cached(shape, ks, st, di, ca) -> np.ndarray:
    rank = len(shape)
    masks = [mask_1d(L, k, s, d, bool(c)) for L, k, s, d, c in zip(shape, ks, st, di, ca)]
    T = int(np.prod(shape))
    coords = list(itertools.product(*[range(L) for L in shape]))  # row-major order
    out = np.zeros((T, T), bool)
    for qi, xc in enumerate(coords):
        for ki, yc in enumerate(coords):
            out[qi, ki] = all(masks[a][xc[a], yc[a]] for a in range(rank))
    return out


# --------------------------------------------------------------------------------------------
# Attention.
# --------------------------------------------------------------------------------------------

def na_oracle(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
              additional_keys=None, additional_values=None):
    """Float64 brute force. q [B, *S, H, D], k [B, *S, Hkv, D], v [B, *S, Hkv, Dv].

    Returns (out [B, *S, H, Dv], lse [B, *S, H]) in float64.
    """
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    B = q.shape[0]
    S = q.shape[1:-2]
    H, D = q.shape[-2:]
    Hkv = k.shape[-2]
    Dv = v.shape[-1]
    assert H % Hkv == 0
    G = H // Hkv
    if scale is None:
        scale = D ** -0.5
    T = int(np.prod(S))
    mask = na_mask(S, kernel_size, stride, dilation, is_causal)
    qf = q.reshape(B, T, H, D)
    # GQA: query head h uses kv head h // G -> repeat each kv head G times.
    kf = np.repeat(k.reshape(B, T, Hkv, D), G, axis=2)
    vf = np.repeat(v.reshape(B, T, Hkv, Dv), G, axis=2)
    if additional_keys is not None:
        ek = np.repeat(np.asarray(additional_keys, np.float64), G, axis=2)  # [B, N, H, D]
        ev = np.repeat(np.asarray(additional_values, np.float64), G, axis=2)
    out = np.zeros((B, T, H, Dv))
    lse = np.zeros((B, T, H))
    for t in range(T):
        idx = np.nonzero(mask[t])[0]
        keys, vals = kf[:, idx], vf[:, idx]  # [B, n, H, D]
        if additional_keys is not None:
            keys = np.concatenate([keys, ek], axis=1)
            vals = np.concatenate([vals, ev], axis=1)
        logits = scale * np.einsum("bhd,bnhd->bhn", qf[:, t], keys)
        m = logits.max(axis=-1, keepdims=True)
        e = np.exp(logits - m)
        ssum = e.sum(axis=-1, keepdims=True)
        lse[:, t] = (m + np.log(ssum))[..., 0]
        out[:, t] = np.einsum("bhn,bnhe->bhe", e / ssum, vals)
    return out.reshape((B,) + S + (H, Dv)), lse.reshape((B,) + S + (H,))


def dense_masked_attention(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False,
                           scale=None, additional_keys=None, additional_values=None):
    """Same as ``na_oracle`` in jax.numpy over a dense [T, T] mask (differentiable).

    K/V heads are repeated explicitly for GQA. Returns (out, lse) in the inputs' dtype.
    """
    import jax
    import jax.numpy as jnp

    B = q.shape[0]
    S = tuple(q.shape[1:-2])
    H, D = q.shape[-2:]
    Hkv = k.shape[-2]
    Dv = v.shape[-1]
    G = H // Hkv
    if scale is None:
        scale = D ** -0.5
    T = int(np.prod(S))
    mask = jnp.asarray(na_mask(S, kernel_size, stride, dilation, is_causal))
    qf = q.reshape(B, T, H, D)
    kf = jnp.repeat(k.reshape(B, T, Hkv, D), G, axis=2)
    vf = jnp.repeat(v.reshape(B, T, Hkv, Dv), G, axis=2)
    logits = scale * jnp.einsum("bqhd,bkhd->bhqk", qf, kf)
    logits = jnp.where(mask[None, None], logits, -jnp.inf)
    vals = vf
    if additional_keys is not None:
        ek = jnp.repeat(additional_keys, G, axis=2)
        ev = jnp.repeat(additional_values, G, axis=2)
        logits = jnp.concatenate([logits, scale * jnp.einsum("bqhd,bnhd->bhqn", qf, ek)], -1)
        vals = jnp.concatenate([vf, ev], axis=1)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, H, T]
    p = jnp.exp(logits - lse[..., None])
    out = jnp.einsum("bhqk,bkhe->bqhe", p, vals)
    return (out.reshape((B,) + S + (H, Dv)),
            jnp.moveaxis(lse, 1, -1).reshape((B,) + S + (H,)))


# --------------------------------------------------------------------------------------------
# Per-element comparison against a float64 reference (FlashAttention's rule).
# --------------------------------------------------------------------------------------------

# FlashAttention's tests (hopper/test_flash_attn.py) accept a kernel whose error against a
# reference computed in high precision is at most RTOL_FACTOR times the error of the same
# computation in the inputs' precision, plus twice the rounding error of one addition to the
# reference in that precision (`fwd_atol = 2 * (out_ref + 0.3 - 0.3 - out_ref).abs().max()`,
# `rtol = 2`). FlashAttention compares the largest errors of whole tensors; here the bound holds
# for every element.
RTOL_FACTOR = 2.0


def rounding_atol(ref64, dtype) -> float:
    """FlashAttention's atol: ``2 * max |fl(fl(r + 0.3) - 0.3) - r|``, ``r`` the reference
    rounded to ``dtype`` and both operations in ``dtype`` (the rounding error that any
    arithmetic on the reference makes in that precision; about one unit in the last place of
    the reference's largest element, at least that of 0.3)."""
    dt = np.dtype(dtype)
    r64 = np.asarray(ref64, np.float64)
    r64 = r64[np.isfinite(r64)]
    if r64.size == 0:
        return 0.0
    r = r64.astype(dt)
    c = np.asarray(0.3, dt)
    moved = ((r + c) - c).astype(np.float64)  # ml_dtypes / numpy: each operation in `dt`
    return 2.0 * float(np.max(np.abs(moved - r.astype(np.float64))))


def assert_close_to_ref64(x, ref64, ref_lowp, *, m: float = RTOL_FACTOR, atol=None,
                          name: str = "x") -> None:
    """Assert ``|x - ref64| <= m * |ref_lowp - ref64| + atol`` for every element.

    ``ref64``: the float64 reference; ``ref_lowp``: the same computation in the precision the
    computation under test works in (its dtype sets the default ``atol``,
    :func:`rounding_atol`). Non-finite elements of ``x`` fail (the fused tests fill outputs
    with NaN before the kernels run, so an element a kernel does not write fails here) unless
    ``ref64`` has the same infinity there. On failure the message names the worst element (the
    largest excess over its bound): its index, the three values, its error and bound, and how
    many elements fail.
    """
    x64 = np.asarray(x, np.float64)
    r64 = np.asarray(ref64, np.float64)
    lowp = np.asarray(ref_lowp)
    if atol is None:
        atol = rounding_atol(r64, lowp.dtype)
    l64 = lowp.astype(np.float64)
    if not (x64.shape == r64.shape == l64.shape):
        raise AssertionError(f"{name}: shapes differ: x {x64.shape}, ref64 {r64.shape}, "
                             f"ref_lowp {l64.shape}")
    if x64.size == 0:
        raise AssertionError(f"{name}: nothing to compare (empty arrays)")
    same_inf = np.isinf(r64) & (x64 == r64)
    with np.errstate(invalid="ignore"):  # inf - inf where both are the same infinity
        err = np.where(same_inf, 0.0, np.abs(x64 - r64))
        lowp_err = np.where(np.isinf(r64) & (l64 == r64), 0.0, np.abs(l64 - r64))
    bound = m * lowp_err + atol
    bad = ~(err <= bound)  # NaN (an unwritten element) fails
    if not bad.any():
        return
    excess = np.where(np.isnan(err), np.inf, err - bound)
    i = np.unravel_index(int(np.argmax(np.where(bad, excess, -np.inf))), x64.shape)
    finite = np.isfinite(err)
    raise AssertionError(
        f"{name}: {int(bad.sum())} of {bad.size} elements exceed |x - ref64| <= m * "
        f"|ref_lowp - ref64| + atol (m={m:g}, atol={atol:.3g}); worst at index "
        f"{tuple(int(j) for j in i)}: x={float(x64[i])!r}, ref64={float(r64[i])!r}, "
        f"ref_lowp={float(l64[i])!r}, "
        f"|x - ref64|={err[i]:.3g} > bound {bound[i]:.3g}; non-finite x elements: "
        f"{int((~np.isfinite(x64) & ~same_inf).sum())}; largest finite |x - ref64|: "
        f"{float(np.max(err[finite])) if finite.any() else float('nan'):.3g}")
