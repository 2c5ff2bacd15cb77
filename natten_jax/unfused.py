"""Unfused neighborhood attention: the attention-weight operators of NATTEN < 0.20.

``na{1,2,3}d_qk`` computes the neighborhood logits ("pointwise-neighborhood", PN) and
``na{1,2,3}d_av`` applies attention weights to the neighborhood values ("neighborhood-
neighborhood", NN); their backward passes (the "inverse-neighborhood", IN, operators of NATTEN)
come from JAX autodiff. NAT and DiNAT use them with a relative positional bias (RPB)::

    attn = na2d_qk(query * scale, key, kernel_size, dilation, rpb=rpb)
    attn = jax.nn.softmax(attn, axis=-1)          # (+ dropout, etc.)
    out = na2d_av(attn, value, kernel_size, dilation)

which equals ``na2d(query, key, value, kernel_size, dilation=dilation, scale=scale)`` when
``rpb`` is None. Layout is heads-last (NATTEN < 0.20 used heads-first ``[B, H, *S, D]``):

* ``query [B, *S, H, D]``, ``key [B, *S, Hkv, D]``, ``value [B, *S, Hkv, Dv]``;
  ``Hkv`` divides ``H`` and query head ``h`` uses key/value head ``h // (H // Hkv)`` (GQA/MQA,
  an extension: NATTEN's unfused ops required equal heads).
* ``attn [B, *S, H, prod(kernel_size)]``, ``rpb [H, 2*k0 - 1, (2*k1 - 1, (2*k2 - 1))]``.

There is no ``scale`` argument (NATTEN's ``na*d_qk`` never scaled: scale the query first) and no
``stride`` (these ops are defined for stride 1 only).

**Neighbor order.** The last axis of ``attn`` enumerates the query's window row-major over the
kernel window, starting at the window start: on each axis ``a`` the window of query coordinate
``x`` is ``[start_a, end_a)`` in in-group indices of ``x``'s dilation group (see
:func:`natten_jax.window.window_bounds`, stride 1), and entry ``j_a`` of that axis is the key
coordinate ``x % d_a + d_a * (start_a + j_a)``. The flat index is
``((j_0 * k_1) + j_1) * k_2 + j_2`` (NATTEN's ``ki * KERNEL_SIZE + kj`` in the naive kernels).

**Causal windows.** With ``is_causal`` on an axis, a query near the start of that axis has
fewer than ``k`` neighbors on it (``end - start < k``); entries with ``j_a >= end_a - start_a``
on any axis are not neighbors. ``na*_qk`` returns ``-inf`` there (as NATTEN's naive kernels do),
so a softmax gives them weight 0; ``na*_av`` ignores those entries of ``attn`` (their weights are
treated as 0 whatever they hold, and receive zero gradient).

**Relative positional bias.** For odd ``k`` (NATTEN only defines RPB for odd kernels), entry
``j`` on axis ``a`` of query ``x`` adds ``rpb[h, ..., r_a + k_a - 1, ...]`` where
``r_a = (y_a - x_a) // d_a`` is the key's offset from the query in dilated steps (``-(k-1) <= r
<= k-1``; in-group indices ``start + j - x // d``). This is NATTEN's
``rpb[h, pb_start(x) + j]`` with ``get_pb_start`` of ``natten_commons.cuh``: ``k // 2`` in the
interior, ``k - 1 - x // d`` near the start and ``(L - x - 1) // d`` near the end. Restrictions
mirrored from NATTEN: ``rpb`` with any causal axis raises ``NotImplementedError``; ``rpb`` with an
even ``kernel_size`` raises ``ValueError`` (NATTEN rejected even kernels in these ops; without
``rpb`` we accept them, with the window rules of :mod:`natten_jax.window`).

**Backends.** ``backend="reference"`` is the pure-JAX code below (the ground truth; memory
grows with tokens x window: windows are gathered per axis and queries are processed in blocks of
rows of the first spatial axis by the reference backend's engine,
:func:`natten_jax.reference.map_row_blocks`, each block recomputed in the backward pass).
``"gemm"`` and ``"naive"``
run our CUDA kernels (:mod:`natten_jax.backends.unfused_cuda`: GEMM-based with space-aware
tiles on tensor cores, or one thread per output element), float32 / float16 / bfloat16 only,
with a custom VJP built from the same operators: for ``qk``, ``dq = NN(dA, key)``,
``dk = IN(dA, query)`` and ``d_rpb`` from the RPB-gradient kernel; for ``av``,
``d_attn = PN(d_out, value)`` (0 off the window) and ``d_value = IN(attn, d_out)``.
``backend=None`` picks ``"gemm"`` when the kernels can run (a CUDA build, a GPU, the call placed
on it, a supported dtype and size: :func:`natten_jax.backends.unfused_cuda.can_run`), else
``"reference"``. Argument checks are :func:`natten_jax.checks.check_qk_call` and
:func:`natten_jax.checks.check_av_call`. Inputs of
float16/bfloat16/float32 are computed in float32 (float64 stays float64); ``na*_qk`` returns the
query's dtype, ``na*_av`` the value's dtype (``attn`` is first cast to the value's dtype and
``rpb`` to the query's, as NATTEN does).

**Precision.** ``precision=`` (:mod:`natten_jax.precision`; None follows
``jax.default_matmul_precision``) sets the reference's products of float32 inputs ("highest":
float32-accurate); the CUDA kernels compute float32 with FFMA, float32-accurate at every
precision. Other dtypes ignore it.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from natten_jax import _ffi
from natten_jax import precision as precision_mod
from natten_jax.backends import unfused_cuda
from natten_jax.checks import NAProblem, UnfusedCall, check_av_call, check_qk_call
from natten_jax.reference import _compute_dtype, _gather_windows, map_row_blocks, window_mask
from natten_jax.window import window_offsets

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]

# --------------------------------------------------------------------------------------------
# Window helpers.
# --------------------------------------------------------------------------------------------

def _windows(spatial, ks, di, ca):
    """Per-axis key coordinates [L, k] (jnp), validity masks [L, k] (np; all True unless
    causal) and RPB indices [L, k] (np) of stride-1 windows."""
    offsets = window_offsets(spatial, ks, (1,) * len(spatial), di, ca)
    coords = [jnp.asarray(c) for c, _ in offsets]
    masks = [m for _, m in offsets]
    # RPB index of entry [x, j]: the key's offset from the query in dilated steps, + k - 1.
    bias_idx = [((c - np.arange(L)[:, None]) // d + (k - 1)).astype(np.int32)
                for (c, _), L, k, d in zip(offsets, spatial, ks, di)]
    return coords, masks, bias_idx


# --------------------------------------------------------------------------------------------
# Rank-generic operators.
# --------------------------------------------------------------------------------------------

def na_qk_generic(rank: int, query, key, kernel_size, dilation=1, is_causal=False, rpb=None,
                  backend=None, precision=None):
    """Neighborhood logits ``[B, *S, H, prod(kernel_size)]`` (see the module docstring)."""
    c = check_qk_call(rank, query, key, kernel_size, dilation, is_causal, rpb, backend)
    prec = precision_mod.einsum_precision(precision_mod.resolve(precision), query.dtype)
    ks, di, ca = c.kernel_size, c.dilation, c.is_causal
    impl = _cuda_impl(f"na{rank}d_qk", backend, query.dtype, c, rpb is not None, query, key)
    if impl is not None:
        rpb32 = (rpb.astype(query.dtype).astype(jnp.float32) if rpb is not None
                 else jnp.zeros((1,), jnp.float32))  # NATTEN casts the bias to the inputs' dtype
        return _qk_cuda((impl, ks, di, ca, rpb is not None, 1.0), query, key, rpb32)

    B, spatial, H, Hkv, D, W = c.batch, c.spatial, c.heads, c.heads_kv, c.dim, c.window
    G = H // Hkv
    cdt = _compute_dtype(query.dtype)
    q = query.astype(cdt).reshape((B,) + spatial + (Hkv, G, D))
    k = key.astype(cdt)
    coords, masks, bias_idx = _windows(spatial, ks, di, ca)
    if rpb is not None:
        # NATTEN casts the bias to the inputs' dtype before adding it.
        bias = rpb.astype(query.dtype).astype(cdt)
        bias_idx = [jnp.asarray(b) for b in bias_idx]
    row_valid = jnp.asarray(masks[0])

    def block(rows):
        kw = _gather_windows(k, coords, coords[0][rows])  # [B, R, L1.., k.., Hkv, D]
        kw = kw.reshape(kw.shape[: rank + 1] + (W,) + kw.shape[-2:])
        qb = jnp.take(q, rows, axis=1)  # [B, R, L1.., Hkv, G, D]
        s = jnp.einsum("...hgd,...whd->...hgw", qb, kw, precision=prec)  # [B,R,L1..,Hkv,G,W]
        if rpb is not None:
            # bias[h, I0[x0, j0], I1[x1, j1], ...] -> [H, R, k0, L1, k1, ...]
            idx = []
            for a in range(rank):
                ia = bias_idx[a][rows] if a == 0 else bias_idx[a]
                shape = [1] * (2 * rank)
                shape[2 * a], shape[2 * a + 1] = ia.shape
                idx.append(ia.reshape(shape))
            bw = bias[(slice(None),) + tuple(idx)]
            # -> [R, L1.., k0.., H] -> [R, L1.., Hkv, G, W]
            perm = ([1 + 2 * a for a in range(rank)] + [2 + 2 * a for a in range(rank)] + [0])
            bw = jnp.transpose(bw, perm)
            bw = bw.reshape(bw.shape[:rank] + (W, Hkv, G))
            s = s + jnp.moveaxis(bw, rank, -1)[None]
        if any(ca):
            m = window_mask(jnp.take(row_valid, rows, axis=0), masks, ks)  # [R, L1.., W]
            s = jnp.where(m[None, ..., None, None, :], s, -jnp.inf)
        return s

    # Per row: the gathered keys or the logits, whichever is larger.
    per_row = B * W * max(Hkv * D, H) * math.prod(spatial[1:])
    out = map_row_blocks(block, spatial[0], per_row)
    return out.reshape((B,) + spatial + (H, W)).astype(query.dtype)


def na_av_generic(rank: int, attn, value, kernel_size, dilation=1, is_causal=False,
                  backend=None, precision=None):
    """Neighborhood-weighted values ``[B, *S, H, Dv]`` (see the module docstring)."""
    c = check_av_call(rank, attn, value, kernel_size, dilation, is_causal, backend)
    prec = precision_mod.einsum_precision(precision_mod.resolve(precision), value.dtype)
    ks, di, ca = c.kernel_size, c.dilation, c.is_causal
    impl = _cuda_impl(f"na{rank}d_av", backend, value.dtype, c, False, attn, value)
    if impl is not None:
        # NATTEN casts the weights to the value's dtype.
        return _av_cuda((impl, ks, di, ca), attn.astype(value.dtype), value)

    B, spatial, H, Hkv, Dv, W = c.batch, c.spatial, c.heads, c.heads_kv, c.dim, c.window
    G = H // Hkv
    cdt = _compute_dtype(value.dtype)
    # NATTEN casts the weights to the value's dtype.
    a = attn.astype(value.dtype).astype(cdt).reshape((B,) + spatial + (Hkv, G, W))
    v = value.astype(cdt)
    coords, masks, _ = _windows(spatial, ks, di, ca)
    row_valid = jnp.asarray(masks[0])

    def block(rows):
        vw = _gather_windows(v, coords, coords[0][rows])  # [B, R, L1.., k.., Hkv, Dv]
        vw = vw.reshape(vw.shape[: rank + 1] + (W,) + vw.shape[-2:])
        ab = jnp.take(a, rows, axis=1)  # [B, R, L1.., Hkv, G, W]
        if any(ca):  # weights off the window count as 0, whatever they hold
            m = window_mask(jnp.take(row_valid, rows, axis=0), masks, ks)
            ab = jnp.where(m[None, ..., None, None, :], ab, jnp.zeros((), cdt))
        return jnp.einsum("...hgw,...whe->...hge", ab, vw,
                          precision=prec)  # [B, R, L1.., Hkv, G, Dv]

    per_row = B * W * max(Hkv * Dv, H) * math.prod(spatial[1:])
    out = map_row_blocks(block, spatial[0], per_row)
    return out.reshape((B,) + spatial + (H, Dv)).astype(value.dtype)


# --------------------------------------------------------------------------------------------
# CUDA operators (backend "gemm" / "naive") and their VJPs.
# --------------------------------------------------------------------------------------------

def _cuda_can_run(dtype, platform, c: UnfusedCall, has_rpb: bool):
    """unfused_cuda.can_run for one call (its forward and backward custom calls)."""
    return unfused_cuda.can_run(dtype, platform, batch=c.batch, tokens=math.prod(c.spatial),
                                heads=c.heads, dim=c.dim, window=c.window, rpb=has_rpb)


def _cuda_impl(op: str, backend, dtype, c: UnfusedCall, has_rpb: bool, *arrays):
    """'gemm' / 'naive' to run the CUDA operators, None for the reference. ``backend=None``
    takes "gemm" where the kernels can run the call (a CUDA build and GPU, the call placed on
    it, a supported dtype and size), else the reference; an explicit CUDA backend that cannot
    run it raises NotImplementedError with the reason."""
    if backend == "reference":
        return None
    ok, why = _cuda_can_run(dtype, _ffi.call_platform(*arrays), c, has_rpb)
    if backend is None:
        return "gemm" if ok else None
    if not ok:
        raise NotImplementedError(f"{op}: backend={backend!r} cannot run this call: {why}")
    return backend


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qk_cuda(cfg, q, k, rpb32):
    impl, ks, di, ca, has_rpb, scale = cfg
    return unfused_cuda.pn(q, k, ks, di, ca, rpb32 if has_rpb else None, scale=scale,
                           impl=impl)


def _qk_cuda_fwd(cfg, q, k, rpb32):
    return _qk_cuda(cfg, q, k, rpb32), (q, k, rpb32)


def _qk_cuda_bwd(cfg, res, d_logits):
    impl, ks, di, ca, has_rpb, scale = cfg
    q, k, rpb32 = res
    d = d_logits.astype(q.dtype)
    dq = unfused_cuda.nn(d, k, ks, di, ca, scale=scale, impl=impl)
    dk = unfused_cuda.inverse(d, q, k.shape[-2], ks, di, ca, scale=scale, impl=impl)
    d_rpb = (unfused_cuda.rpb_grad(d, ks, di, ca).reshape(rpb32.shape) if has_rpb
             else jnp.zeros_like(rpb32))
    return dq, dk, d_rpb


_qk_cuda.defvjp(_qk_cuda_fwd, _qk_cuda_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _av_cuda(cfg, a, v):
    impl, ks, di, ca = cfg
    return unfused_cuda.nn(a, v, ks, di, ca, impl=impl)


def _av_cuda_fwd(cfg, a, v):
    return _av_cuda(cfg, a, v), (a, v)


def _av_cuda_bwd(cfg, res, d_out):
    impl, ks, di, ca = cfg
    a, v = res
    d = d_out.astype(v.dtype)
    # d_attn is 0 off the window (entries that are no neighbor get no gradient).
    da = unfused_cuda.pn(d, v, ks, di, ca, fill=0.0, impl=impl)
    dv = unfused_cuda.inverse(a, d, v.shape[-2], ks, di, ca, impl=impl)
    return da, dv


_av_cuda.defvjp(_av_cuda_fwd, _av_cuda_bwd)


def na_unfused(p: NAProblem, query, key, value, impl: str):
    """Neighborhood attention of a validated problem (stride 1, no extra tokens) as
    ``softmax(qk) -> av`` over the CUDA operators ``impl`` ("gemm" / "naive"): logits in the
    query's dtype (as NATTEN's unfused path), softmax in float32. Returns (out, lse).
    NotImplementedError if the kernels cannot run ``p`` here (placement, dtype, size)."""
    c = UnfusedCall(rank=p.rank, batch=p.batch, spatial=p.spatial, heads=p.heads,
                    heads_kv=p.heads_kv, dim=max(p.head_dim, p.head_dim_v),
                    kernel_size=p.kernel_size, dilation=p.dilation, is_causal=p.is_causal)
    ok, why = _cuda_can_run(p.dtype, p.platform, c, False)
    if not ok:
        raise NotImplementedError(f"backend={impl!r} cannot run this call: {why}")
    cfg = (impl, p.kernel_size, p.dilation, p.is_causal)
    logits = _qk_cuda(cfg + (False, p.scale), query, key, jnp.zeros((1,), jnp.float32))
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    attn = jnp.exp(logits - lse[..., None])
    out = _av_cuda(cfg, attn.astype(value.dtype), value)
    return out.astype(query.dtype), lse


# --------------------------------------------------------------------------------------------
# Per-rank wrappers.
# --------------------------------------------------------------------------------------------

def _qk_doc(rank: int) -> str:
    S = ", ".join(f"S{i}" for i in range(rank))
    K = " * ".join(f"k{i}" for i in range(rank))
    R = ", ".join(f"2*k{i}-1" for i in range(rank))
    return f"""{rank}-D neighborhood logits (NATTEN's ``na{rank}d_qk``, heads-last).

    Args:
      query: ``[B, {S}, H, D]`` (already scaled: no scale is applied).
      key: ``[B, {S}, Hkv, D]``; ``Hkv`` divides ``H``.
      kernel_size: int or one per axis; ``kernel_size * dilation`` must not exceed the extent.
      dilation: int or one per axis (default 1).
      is_causal: bool or one per axis (default False).
      rpb: optional relative positional bias ``[H, {R}]`` (odd kernel sizes, not causal).
      backend: None (the CUDA kernels when they can run, else the reference), "reference",
        "gemm" or "naive" (our CUDA kernels; NotImplementedError with the reason if they
        cannot run the call).
      precision: as JAX's ``precision=`` (None: ``jax.default_matmul_precision``; "default",
        "high", "highest", a ``jax.lax.Precision``, ...: :mod:`natten_jax.precision`). The
        reference backend's products of float32 inputs run at it ("highest": float32-accurate;
        "default": XLA's default on the device, TF32 on recent NVIDIA GPUs). The CUDA kernels
        compute float32 with FFMA (float32-accurate) at every precision. On float16 /
        bfloat16 / float64 inputs it changes nothing. A bad value: ``ValueError``.

    Returns:
      ``[B, {S}, H, {K}]`` in query's dtype: ``q . k (+ rpb)`` for each neighbor, row-major over
      the kernel window from the window start; ``-inf`` where a causal window has no neighbor.
      See :mod:`natten_jax.unfused` for the neighbor order and the RPB indexing rule.
    """


def _av_doc(rank: int) -> str:
    S = ", ".join(f"S{i}" for i in range(rank))
    K = " * ".join(f"k{i}" for i in range(rank))
    return f"""{rank}-D neighborhood weighted sum of values (NATTEN's ``na{rank}d_av``, heads-last).

    Args:
      attn: ``[B, {S}, H, {K}]`` weights in the neighbor order of ``na{rank}d_qk``.
      value: ``[B, {S}, Hkv, Dv]``; ``Hkv`` divides ``H``.
      kernel_size, dilation, is_causal, backend, precision: as in ``na{rank}d_qk``.

    Returns:
      ``[B, {S}, H, Dv]`` in value's dtype: ``sum_j attn[..., j] * value[neighbor j]``; entries
      that are not neighbors (causal windows near the start) are ignored.
    """


def na1d_qk(query, key, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
            is_causal: BoolOrTuple = False, rpb=None, *, backend: Optional[str] = None,
            precision=None):
    return na_qk_generic(1, query, key, kernel_size, dilation, is_causal, rpb, backend,
                         precision)


def na2d_qk(query, key, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
            is_causal: BoolOrTuple = False, rpb=None, *, backend: Optional[str] = None,
            precision=None):
    return na_qk_generic(2, query, key, kernel_size, dilation, is_causal, rpb, backend,
                         precision)


def na3d_qk(query, key, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
            is_causal: BoolOrTuple = False, rpb=None, *, backend: Optional[str] = None,
            precision=None):
    return na_qk_generic(3, query, key, kernel_size, dilation, is_causal, rpb, backend,
                         precision)


def na1d_av(attn, value, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
            is_causal: BoolOrTuple = False, *, backend: Optional[str] = None,
            precision=None):
    return na_av_generic(1, attn, value, kernel_size, dilation, is_causal, backend,
                         precision)


def na2d_av(attn, value, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
            is_causal: BoolOrTuple = False, *, backend: Optional[str] = None,
            precision=None):
    return na_av_generic(2, attn, value, kernel_size, dilation, is_causal, backend,
                         precision)


def na3d_av(attn, value, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
            is_causal: BoolOrTuple = False, *, backend: Optional[str] = None,
            precision=None):
    return na_av_generic(3, attn, value, kernel_size, dilation, is_causal, backend,
                         precision)


for _r, _f in ((1, na1d_qk), (2, na2d_qk), (3, na3d_qk)):
    _f.__doc__ = _qk_doc(_r)
for _r, _f in ((1, na1d_av), (2, na2d_av), (3, na3d_av)):
    _f.__doc__ = _av_doc(_r)
del _r, _f

__all__ = ["na1d_qk", "na2d_qk", "na3d_qk", "na1d_av", "na2d_av", "na3d_av",
           "na_qk_generic", "na_av_generic", "na_unfused"]
