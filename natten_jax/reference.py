"""Reference backend: neighborhood attention in plain jax.numpy.

Runs on any device, differentiable by autodiff, and is the oracle for every GPU kernel. Memory
grows with tokens x window, never tokens^2: each query's window is gathered per axis (the
window of a multi-dimensional query is the product of its per-axis windows, see
:func:`natten_jax.window.window_offsets`), and queries are processed in blocks of rows of the
first spatial axis so that one block's gathered keys stay under a fixed budget. Under autodiff
a block's gathered windows, logits and probabilities are recomputed in the backward pass, not
kept, so training memory is bounded the same way.

The row-block engine (:func:`map_row_blocks`, :func:`attend_rows`) is shared: context
parallelism (:mod:`natten_jax.context_parallel`) runs :func:`attend_rows` on each device's slab
against its halo-extended keys, and the unfused reference operators
(:mod:`natten_jax.unfused`) run their own blocks through :func:`map_row_blocks`.

Inputs of float16/bfloat16/float32 are computed in float32 (float64 stays float64); the output
takes the query's dtype and the logsumexp is float32 (float64). The products (einsums) run at
the problem's precision (``p.precision``, :func:`natten_jax.precision.lax_precision`):
``"highest"`` is float32-accurate on every device, ``"default"`` is XLA's default on the device
(TF32 on recent NVIDIA GPUs, float32 on the CPU). On float16 / bfloat16 / float64 inputs the
precision changes nothing: they run at XLA's default (16-bit operands are exact in TF32; only the
float32 probabilities are rounded there, as the 16-bit kernels round them to 16 bits).

Ragged batches (``valid_extent`` / ``additional_lengths``, issue 24) run on the same engine
with per-sample windows: :func:`natten_jax.window.window_offsets` of each sample's clamped
extent (traced values welcome, so a new extent never recompiles), gathered per sample. Padded
inputs are replaced by zeros before anything reads them (NaN padding cannot reach a value or a
gradient), additional tokens beyond a sample's length get logit ``-inf``, and padded queries
get output 0 and logsumexp 0.0 (so their cotangents, and every padded gradient, are exactly 0).
This is the ground truth of the ragged fused kernels; calls without the two arguments take the
original path unchanged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from natten_jax.checks import NAProblem
from natten_jax.precision import einsum_precision
from natten_jax.window import sample_extent, used_extra, valid_tokens, window_offsets

# Elements of gathered K (or V) per block: 2**25 fp32 = 128 MiB.
_BLOCK_ELEMENTS = 1 << 25


def _compute_dtype(*dtypes):
    return jnp.float64 if any(d == jnp.float64 for d in dtypes) else jnp.float32


def _gather_windows(x, coords, row_coords):
    """x: [B, L0, ..., Ln-1, Hkv, C] -> [B, R, L1.., k0, k1.., Hkv, C] windows of a row block.

    ``row_coords`` [R, k0] are the axis-0 key coordinates (indices into x's axis 1) of the
    block's query rows; ``coords[a]`` [La, ka] those of axis a >= 1 (``coords[0]`` is unused).
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


def window_mask(row_valid, masks, kernel_size):
    """[R, L1.., W] validity of a row block's window entries, laid out like the gathered
    windows: the product of ``row_valid`` [R, k0] (the block's axis-0 masks) and ``masks[a]``
    [La, ka] (a >= 1; ``masks[0]`` is unused)."""
    rank = len(masks)
    m = jnp.ones((), bool)
    for a in range(rank):
        ma = jnp.asarray(row_valid if a == 0 else masks[a])
        shape = [1] * (2 * rank)
        shape[a], shape[rank + a] = ma.shape
        m = m & ma.reshape(shape)
    lead = (row_valid.shape[0],) + tuple(jnp.shape(masks[a])[0] for a in range(1, rank))
    m = jnp.broadcast_to(m, lead + tuple(kernel_size))
    return m.reshape(lead + (math.prod(kernel_size),))


def row_blocks(n_rows: int, per_row: int):
    """(rows per block, number of blocks) for ``n_rows`` rows of ``per_row`` gathered elements
    each, under the budget ``_BLOCK_ELEMENTS`` (read at call time: tests lower it)."""
    R = int(max(1, min(n_rows, _BLOCK_ELEMENTS // max(per_row, 1))))
    return R, -(-n_rows // R)


def map_row_blocks(block, n_rows: int, per_row: int):
    """Runs ``block(rows)`` over the row blocks of ``n_rows`` rows and joins the results.

    ``rows`` is an int vector of one block's row indices (the ragged last block repeats row
    ``n_rows - 1``); every result of ``block`` (a pytree) is ``[B, R, ...]`` with the rows on
    axis 1; returned as ``[B, n_rows, ...]``. Each block runs under ``jax.checkpoint``: under
    autodiff the backward pass recomputes a block's gathered windows and intermediates from
    its inputs instead of keeping them, so training memory grows with the tokens, not tokens x
    window x head dim (nat_mini's training step at batch 128 asked for a 74 GiB temporary
    without it). Blocks run one after another (``lax.map``).
    """
    R, nblocks = row_blocks(n_rows, per_row)

    def run(r0):
        return block(jnp.minimum(r0 + jnp.arange(R), n_rows - 1))

    run = jax.checkpoint(run)
    if nblocks == 1:
        outs = run(0)
    else:
        outs = jax.lax.map(run, jnp.arange(nblocks) * R)  # leaves [nb, B, R, ...]
        outs = jax.tree.map(
            lambda o: jnp.moveaxis(o, 0, 1).reshape((o.shape[1], nblocks * R) + o.shape[3:]),
            outs)
    return jax.tree.map(lambda o: o[:, :n_rows], outs)


def attend_rows(p: NAProblem, query, key, value, row_coords, row_valid, coords, masks,
                additional_keys=None, additional_values=None, *, per_sample: bool = False,
                extra_valid=None):
    """Neighborhood attention of query rows against their gathered windows, block by block.

    ``query`` [B, Lq, L1.., H, D]; ``key`` / ``value`` [B, Lk, L1.., Hkv, D / Dv] (``Lk`` may
    differ from ``Lq``: context parallelism passes a slab extended by its halos);
    ``row_coords`` [Lq, k0] int: the axis-0 key coordinates, indices into key's axis 1, of each
    query row's window, and ``row_valid`` [Lq, k0] their validity (either may be traced);
    ``coords[a]`` / ``masks[a]`` [La, ka] for a >= 1 (``[0]`` unused). ``p`` gives heads,
    head dims, scale, kernel size and causality (``p.spatial[0]`` is not used). Returns
    ``(out [B, Lq, L1.., H, Dv] in query's dtype, lse [B, Lq, L1.., H])``.

    ``per_sample``: the coordinates and masks carry a leading batch axis (``[B, Lq, k0]``,
    ``[B, La, ka]``): each sample gathers its own windows (a ragged batch). ``extra_valid``:
    None or bool ``[B, N]``, which additional tokens each sample attends to (others get logit
    ``-inf``; every query keeps its window, so no row is empty).
    """
    cdt = _compute_dtype(query.dtype)
    # float32 inputs: the problem's precision; others: XLA's default whatever it is (module
    # docstring).
    prec = einsum_precision(p.precision, query.dtype)
    rank, B, Lq = p.rank, query.shape[0], row_coords.shape[1 if per_sample else 0]
    G, W = p.heads // p.heads_kv, p.window
    q = query.astype(cdt) * jnp.asarray(p.scale, cdt)
    q = q.reshape(q.shape[:-2] + (p.heads_kv, G, p.head_dim))  # [B, Lq, L1.., Hkv, G, D]
    k, v = key.astype(cdt), value.astype(cdt)
    extra = None
    if additional_keys is not None:
        extra = (additional_keys.astype(cdt), additional_values.astype(cdt))
    masked = any(p.is_causal)  # windows are full unless causal
    coords = [None] + [jnp.asarray(c) for c in coords[1:]]

    if per_sample:  # one sample's gather (and mask) per batch entry
        gather = jax.vmap(lambda x, c, rc: _gather_windows(x[None], c, rc)[0])
        sample_mask = jax.vmap(lambda rv, ms: window_mask(rv, ms, p.kernel_size))
    else:
        gather = _gather_windows
    if extra_valid is not None:  # [B, N] -> broadcast against [B, R, L1.., Hkv, G, N]
        extra_valid = extra_valid.reshape((B,) + (1,) * (rank + 2) + extra_valid.shape[-1:])

    def block(rows):
        rc = jnp.take(row_coords, rows, axis=1 if per_sample else 0)
        kw = gather(k, coords, rc)  # [B, R, L1.., k.., Hkv, D]
        vw = gather(v, coords, rc)
        qb = jnp.take(q, rows, axis=1)  # [B, R, L1.., Hkv, G, D]
        kw = kw.reshape(kw.shape[: rank + 1] + (W,) + kw.shape[-2:])
        vw = vw.reshape(vw.shape[: rank + 1] + (W,) + vw.shape[-2:])
        s = jnp.einsum("...hgd,...whd->...hgw", qb, kw, precision=prec)  # [B,R,L1..,Hkv,G,W]
        if masked and per_sample:
            m = sample_mask(jnp.take(row_valid, rows, axis=1), masks)  # [B, R, L1.., W]
            s = jnp.where(m[..., None, None, :], s, -jnp.inf)
        elif masked:
            m = window_mask(jnp.take(row_valid, rows, axis=0), masks, p.kernel_size)
            s = jnp.where(m[None, ..., None, None, :], s, -jnp.inf)
        logits = [s]
        if extra is not None:
            se = jnp.einsum("b...hgd,bnhd->b...hgn", qb, extra[0], precision=prec)
            if extra_valid is not None:
                se = jnp.where(extra_valid, se, -jnp.inf)
            logits.append(se)
        allv = jnp.concatenate(logits, axis=-1)
        lse = jax.nn.logsumexp(allv, axis=-1)
        pr = jnp.exp(allv - lse[..., None])
        out = jnp.einsum("...hgw,...whe->...hge", pr[..., :W], vw, precision=prec)
        if extra is not None:
            out = out + jnp.einsum("b...hgn,bnhe->b...hge", pr[..., W:], extra[1],
                                   precision=prec)
        return out, lse

    per_row = B * W * p.heads_kv * max(p.head_dim, p.head_dim_v) * math.prod(p.spatial[1:])
    out, lse = map_row_blocks(block, Lq, per_row)
    rest = tuple(p.spatial[1:])
    out = out.reshape((B, Lq) + rest + (p.heads, p.head_dim_v))
    lse = lse.reshape((B, Lq) + rest + (p.heads,))
    return out.astype(query.dtype), lse


def na_reference(p: NAProblem, query, key, value, additional_keys=None, additional_values=None,
                 valid_extent=None, additional_lengths=None):
    """Neighborhood attention of a validated problem ``p``. Returns (out, lse).

    ``valid_extent`` int ``[B, rank]`` / ``additional_lengths`` int ``[B]``: a ragged batch
    (unclamped; see the module docstring and :func:`na_reference_ragged`)."""
    if valid_extent is not None or additional_lengths is not None:
        return na_reference_ragged(p, query, key, value, additional_keys, additional_values,
                                   valid_extent, additional_lengths)
    offsets = window_offsets(p.spatial, p.kernel_size, p.stride, p.dilation, p.is_causal)
    coords = [c for c, _ in offsets]
    masks = [m for _, m in offsets]
    return attend_rows(p, query, key, value, jnp.asarray(coords[0]), jnp.asarray(masks[0]),
                       coords, masks, additional_keys, additional_values)


def keep(mask, x):
    """``x`` where ``mask`` (broadcast over x's trailing axes), else 0: a select, so neither a
    NaN in x nor its gradient crosses to the masked-out entries."""
    mask = mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
    return jnp.where(mask, x, jnp.zeros((), x.dtype))


def na_reference_ragged(p: NAProblem, query, key, value, additional_keys, additional_values,
                        valid_extent, additional_lengths):
    """A ragged batch: per-sample extents ``valid_extent`` (None: every sample full) and / or
    per-sample additional-token counts ``additional_lengths`` (None: all ``N``), clamped by
    :func:`natten_jax.window.sample_extent` / :func:`natten_jax.window.sample_num_extra`.
    Output 0 and logsumexp 0.0 at padded queries; padded inputs are never read."""
    extra_valid = None
    if additional_lengths is not None:
        extra_valid = used_extra(additional_lengths, p.num_extra)  # [B, N]
        additional_keys = keep(extra_valid, additional_keys)
        additional_values = keep(extra_valid, additional_values)
    if valid_extent is None:
        offsets = window_offsets(p.spatial, p.kernel_size, p.stride, p.dilation, p.is_causal)
        coords, masks = [c for c, _ in offsets], [m for _, m in offsets]
        return attend_rows(p, query, key, value, jnp.asarray(coords[0]),
                           jnp.asarray(masks[0]), coords, masks, additional_keys,
                           additional_values, extra_valid=extra_valid)
    ext = sample_extent(jnp.asarray(valid_extent), p.kernel_size, p.dilation, p.spatial)
    inside = valid_tokens(p.spatial, ext)  # [B, *spatial]
    query, key, value = (keep(inside, x) for x in (query, key, value))
    offsets = window_offsets(p.spatial, p.kernel_size, p.stride, p.dilation, p.is_causal,
                             valid_extent=ext)
    coords, masks = [c for c, _ in offsets], [m for _, m in offsets]
    out, lse = attend_rows(p, query, key, value, coords[0], masks[0], coords, masks,
                           additional_keys, additional_values, per_sample=True,
                           extra_valid=extra_valid)
    return keep(inside, out), keep(inside, lse)
