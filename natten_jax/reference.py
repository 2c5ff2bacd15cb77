"""Reference backend: neighborhood attention in plain jax.numpy.

Runs on any device, differentiable by autodiff, and is the oracle for every GPU kernel. Memory
grows with tokens x window, never tokens^2: each query's window is gathered per axis (the
window of a multi-dimensional query is the product of its per-axis windows, see
:func:`natten_jax.window.window_offsets`), and queries are processed in blocks of rows of the
first spatial axis so that one block's gathered keys stay under a fixed budget. Under autodiff
a block's gathered windows, logits and probabilities are recomputed in the backward pass, not
kept, so training memory is bounded the same way.

Inputs of float16/bfloat16/float32 are computed in float32 (float64 stays float64); the output
takes the query's dtype and the logsumexp is float32 (float64).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from natten_jax.checks import NAProblem
from natten_jax.window import window_offsets

# Elements of gathered K (or V) per block: 2**25 fp32 = 128 MiB.
_BLOCK_ELEMENTS = 1 << 25


def _compute_dtype(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _gather_windows(x, coords, row_coords):
    """x: [B, L0, ..., Ln-1, Hkv, C] -> [B, R, L1.., k0, k1.., Hkv, C] windows of a row block.

    ``row_coords`` [R, k0] are the global axis-0 key coordinates of the block's query rows;
    ``coords[a]`` [La, ka] those of axis a >= 1.
    """
    rank = len(coords)
    g = jnp.take(x, row_coords, axis=1)  # [B, R, k0, L1, ..., Hkv, C]
    for a in range(1, rank):
        # Axis a of the spatial dims now sits at position 1 + 2a (after its predecessors' (L, k)).
        g = jnp.take(g, coords[a], axis=1 + 2 * a)
    # g: [B, R, k0, L1, k1, ..., Hkv, C] -> [B, R, L1, ..., k0, k1, ..., Hkv, C]
    q_axes = [1] + [1 + 2 * a for a in range(1, rank)]
    k_axes = [2] + [2 + 2 * a for a in range(1, rank)]
    n = g.ndim
    return jnp.transpose(g, [0] + q_axes + k_axes + [n - 2, n - 1])


def window_gather_plan(spatial, kernel_size, stride, dilation, is_causal):
    """Per-axis key coordinates ``[L, k]`` (jnp) of every query's window, the window validity
    mask ``[L0.., k0..]`` (np; all True unless causal) and the raw per-axis offsets."""
    rank = len(spatial)
    offsets = window_offsets(spatial, kernel_size, stride, dilation, is_causal)
    coords = [jnp.asarray(c) for c, _ in offsets]
    valid = np.ones((), bool)
    for a, (_, m) in enumerate(offsets):  # product of per-axis masks -> [L0.., k0..]
        shape = [1] * (2 * rank)
        shape[a], shape[rank + a] = m.shape
        valid = valid & m.reshape(shape)
    return coords, np.broadcast_to(valid, tuple(spatial) + tuple(kernel_size)), offsets


def na_reference(p: NAProblem, query, key, value, additional_keys=None, additional_values=None):
    """Neighborhood attention of a validated problem ``p``. Returns (out, lse)."""
    cdt = _compute_dtype(query.dtype)
    q = query.astype(cdt) * jnp.asarray(p.scale, cdt)
    k = key.astype(cdt)
    v = value.astype(cdt)
    rank, B = p.rank, p.batch
    G = p.heads // p.heads_kv
    coords, valid, _ = window_gather_plan(p.spatial, p.kernel_size, p.stride, p.dilation,
                                          p.is_causal)
    valid = jnp.asarray(valid)
    W = p.window

    # [B, L.., H, D] -> [B, L.., Hkv, G, D]
    q = q.reshape(q.shape[:-2] + (p.heads_kv, G, p.head_dim))
    extra = None
    if additional_keys is not None:
        extra = (additional_keys.astype(cdt), additional_values.astype(cdt))

    L0 = p.spatial[0]
    per_row = B * W * p.heads_kv * max(p.head_dim, p.head_dim_v) * math.prod(p.spatial[1:])
    R = int(max(1, min(L0, _BLOCK_ELEMENTS // max(per_row, 1))))
    nblocks = -(-L0 // R)

    def block(r0):
        rows = jnp.minimum(r0 + jnp.arange(R), L0 - 1)
        kw = _gather_windows(k, coords, coords[0][rows])  # [B, R, L1.., k.., Hkv, D]
        vw = _gather_windows(v, coords, coords[0][rows])
        qb = jnp.take(q, rows, axis=1)  # [B, R, L1.., Hkv, G, D]
        kw = kw.reshape(kw.shape[: rank + 1] + (W,) + kw.shape[-2:])
        vw = vw.reshape(vw.shape[: rank + 1] + (W,) + vw.shape[-2:])
        s = jnp.einsum("...hgd,...whd->...hgw", qb, kw)  # [B, R, L1.., Hkv, G, W]
        m = jnp.take(valid, rows, axis=0).reshape((R,) + valid.shape[1:rank] + (W,))
        s = jnp.where(m[None, ..., None, None, :], s, -jnp.inf)
        logits = [s]
        if extra is not None:
            se = jnp.einsum("b...hgd,bnhd->b...hgn", qb, extra[0])
            logits.append(se)
        allv = jnp.concatenate(logits, axis=-1)
        lse = jax.nn.logsumexp(allv, axis=-1)
        pr = jnp.exp(allv - lse[..., None])
        out = jnp.einsum("...hgw,...whe->...hge", pr[..., :W], vw)
        if extra is not None:
            out = out + jnp.einsum("b...hgn,bnhe->b...hge", pr[..., W:], extra[1])
        return out, lse

    # Under autodiff a block keeps none of its gathered windows, logits or probabilities for the
    # backward pass: they are recomputed from q, k, v (remat), so training memory grows with the
    # tokens, not tokens x window x head dim (nat_mini's training step at batch 128 asked for a
    # 74 GiB temporary without this).
    block = jax.checkpoint(block)
    if nblocks == 1:
        out, lse = block(0)
    else:
        outs, lses = jax.lax.map(block, jnp.arange(nblocks) * R)
        # [nb, B, R, ...] -> [B, nb*R, ...]
        out = jnp.moveaxis(outs, 0, 1).reshape((B, nblocks * R) + outs.shape[3:])
        lse = jnp.moveaxis(lses, 0, 1).reshape((B, nblocks * R) + lses.shape[3:])
    out = out[:, :L0].reshape((B,) + p.spatial + (p.heads, p.head_dim_v))
    lse = lse[:, :L0].reshape((B,) + p.spatial + (p.heads,))
    return out.astype(query.dtype), lse
