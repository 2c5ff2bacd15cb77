"""Context parallelism: neighborhood attention with the first spatial axis sharded.

:func:`na_context_parallel` splits spatial axis 0 (axis 1 of the ``[B, S0, S1.., H, D]`` arrays)
into equal contiguous slabs over one mesh axis. Inside ``shard_map`` each device

1. knows, from the window math in *global* coordinates (:mod:`natten_jax.window`), which key
   rows its slab's queries need. Window starts and ends are monotone in the query index, so the
   union of a slab's windows on axis 0 lies in one contiguous range ``[lo, hi)`` of global rows
   (with dilation, the rows of one group are strided inside it; the range covers them all);
2. fetches the key/value rows of that range it does not hold from its neighbours with
   ``jax.lax.ppermute``. Shapes must be static, so every device receives the same halo widths:
   ``left = max over devices of (slab start - lo)`` rows and ``right = max of (hi - slab
   end)`` rows, computed on the host. Borders shift windows inward, so a halo can be wider than a
   slab; it is then assembled from several neighbours (``ceil(halo / slab)`` permutes per side);
3. runs the reference computation for its slab's queries against the extended key/value slab
   ``[slab start - left, slab end + right)``, gathering with local coordinates ``global -
   offset`` (offset from ``jax.lax.axis_index``, so one program serves every device).

Nothing is all-gathered: communication is ``2 * ceil(left / slab) + 2 * ceil(right / slab)``
collective-permutes of at most one slab each (key and value), and their transposes in the
backward pass (``jax.grad`` differentiates through ``ppermute``). Numerics are the reference
backend's (float32 compute for 16/32-bit inputs, float64 for float64), so results equal
``natten_jax.na{rank}d(..., backend="reference")`` on the unsharded arrays up to rounding.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from natten_jax.checks import NAProblem, check_na_call
from natten_jax.reference import _BLOCK_ELEMENTS, _compute_dtype, _gather_windows
from natten_jax.window import window_offsets

__all__ = ["na_context_parallel", "halo_plan"]


def _shard_map(f, mesh, in_specs, out_specs):
    """``jax.shard_map`` where it exists, else ``jax.experimental.shard_map.shard_map``."""
    sm = getattr(jax, "shard_map", None)
    if sm is not None:
        return sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    from jax.experimental.shard_map import shard_map  # older JAX

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def _is_explicit(mesh: Mesh, axis_name: str) -> bool:
    types = getattr(mesh, "axis_types", None)
    if types is None:
        return False
    t = types[mesh.axis_names.index(axis_name)]
    return getattr(t, "name", str(t)) == "Explicit"


def halo_plan(extent: int, num_devices: int, kernel_size: int, stride: int, dilation: int,
              is_causal: bool):
    """Host-side plan for axis 0 split into ``num_devices`` slabs of ``extent // num_devices``.

    Returns ``(left, right, local_coords, valid)``: the halo widths (rows every device receives
    from its left and right neighbours), ``local_coords`` int32 ``[n, slab, k]`` (device ``r``'s
    axis-0 window coordinates relative to the start of its extended slab, global row ``r *
    slab - left``; masked causal entries are clamped into the slab) and ``valid`` bool ``[n,
    slab, k]`` (all True unless causal).
    """
    n = num_devices
    slab = extent // n
    ((coords, valid),) = window_offsets((extent,), (kernel_size,), (stride,), (dilation,),
                                        (is_causal,))
    coords = coords.reshape(n, slab, kernel_size).astype(np.int64)
    valid = valid.reshape(n, slab, kernel_size)
    starts = np.arange(n) * slab
    # Only valid entries need real rows (every query sees itself, so each row has one).
    lo = np.where(valid, coords, np.iinfo(np.int64).max).min(axis=(1, 2))
    hi = np.where(valid, coords, -1).max(axis=(1, 2)) + 1
    left = int(max(0, np.max(starts - lo)))
    right = int(max(0, np.max(hi - (starts + slab))))
    ext = slab + left + right
    local = coords - (starts - left)[:, None, None]
    local = np.where(valid, local, np.clip(local, 0, ext - 1))
    assert local.min() >= 0 and local.max() < ext
    return left, right, local.astype(np.int32), valid


def _extend(x, axis_name: str, n: int, slab: int, left: int, right: int):
    """Local slab ``x`` [B, slab, ...] -> [B, left + slab + right, ...] with the halo rows of the
    neighbouring devices (rows outside the global extent, at the borders, are zeros)."""
    parts = []
    j, need = 1, left
    while need > 0:  # chunk j comes from device r - j: its last w rows
        w = min(slab, need)
        perm = [(src, src + j) for src in range(n - j)]
        parts.insert(0, jax.lax.ppermute(x[:, slab - w:], axis_name, perm))
        need -= w
        j += 1
    parts.append(x)
    j, need = 1, right
    while need > 0:  # chunk j comes from device r + j: its first w rows
        w = min(slab, need)
        perm = [(src, src - j) for src in range(j, n)]
        parts.append(jax.lax.ppermute(x[:, :w], axis_name, perm))
        need -= w
        j += 1
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def _local_na(p: NAProblem, slab: int, q, k, v, row_coords, row_valid, coords, masks):
    """Reference NA of one device's query slab against its extended key/value slab.

    q [B, slab, L1.., H, D]; k, v [B, ext, L1.., Hkv, D/Dv]; row_coords [slab, k0] local axis-0
    key coordinates (row_valid their mask); coords[a] / masks[a] for axes a >= 1 (global).
    """
    cdt = _compute_dtype(q.dtype)
    rank, B = p.rank, p.batch
    G = p.heads // p.heads_kv
    W = p.window
    qc = q.astype(cdt) * jnp.asarray(p.scale, cdt)
    kc, vc = k.astype(cdt), v.astype(cdt)
    qc = qc.reshape(qc.shape[:-2] + (p.heads_kv, G, p.head_dim))
    causal = any(p.is_causal)

    per_row = B * W * p.heads_kv * max(p.head_dim, p.head_dim_v) * math.prod(p.spatial[1:])
    R = int(max(1, min(slab, _BLOCK_ELEMENTS // max(per_row, 1))))
    nblocks = -(-slab // R)

    def mask_of(rows):
        # [R, L1.., k0, k1..]: product of per-axis masks, laid out like the gathered windows.
        m = jnp.ones((), bool)
        for a in range(rank):
            ma = jnp.take(row_valid, rows, axis=0) if a == 0 else jnp.asarray(masks[a])
            shape = [1] * (2 * rank)
            shape[0 if a == 0 else a] = ma.shape[0]
            shape[rank + a] = ma.shape[1]
            m = m & ma.reshape(shape)
        m = jnp.broadcast_to(m, (rows.shape[0],) + p.spatial[1:] + p.kernel_size)
        return m.reshape((rows.shape[0],) + p.spatial[1:] + (W,))

    def block(r0):
        rows = jnp.minimum(r0 + jnp.arange(R), slab - 1)
        rc = jnp.take(row_coords, rows, axis=0)
        kw = _gather_windows(kc, coords, rc)  # [B, R, L1.., k.., Hkv, D]
        vw = _gather_windows(vc, coords, rc)
        qb = jnp.take(qc, rows, axis=1)  # [B, R, L1.., Hkv, G, D]
        kw = kw.reshape(kw.shape[: rank + 1] + (W,) + kw.shape[-2:])
        vw = vw.reshape(vw.shape[: rank + 1] + (W,) + vw.shape[-2:])
        s = jnp.einsum("...hgd,...whd->...hgw", qb, kw)  # [B, R, L1.., Hkv, G, W]
        if causal:
            s = jnp.where(mask_of(rows)[None, ..., None, None, :], s, -jnp.inf)
        lse = jax.nn.logsumexp(s, axis=-1)
        pr = jnp.exp(s - lse[..., None])
        out = jnp.einsum("...hgw,...whe->...hge", pr, vw)
        return out, lse

    if nblocks == 1:
        out, lse = block(0)
    else:
        outs, lses = jax.lax.map(block, jnp.arange(nblocks) * R)
        out = jnp.moveaxis(outs, 0, 1).reshape((B, nblocks * R) + outs.shape[3:])
        lse = jnp.moveaxis(lses, 0, 1).reshape((B, nblocks * R) + lses.shape[3:])
    out = out[:, :slab].reshape((B, slab) + p.spatial[1:] + (p.heads, p.head_dim_v))
    lse = lse[:, :slab].reshape((B, slab) + p.spatial[1:] + (p.heads,))
    return out.astype(q.dtype), lse


@functools.lru_cache(maxsize=64)
def _build(p: NAProblem, mesh: Mesh, axis_name: str):
    """The jitted shard_map program of one static problem (cached: built and compiled once)."""
    n = int(mesh.shape[axis_name])
    slab = p.spatial[0] // n
    left, right, local0, valid0 = halo_plan(p.spatial[0], n, p.kernel_size[0], p.stride[0],
                                            p.dilation[0], p.is_causal[0])
    offsets = window_offsets(p.spatial, p.kernel_size, p.stride, p.dilation, p.is_causal)
    coords = [None] + [c for c, _ in offsets[1:]]
    masks = [None] + [m for _, m in offsets[1:]]

    def per_device(q, k, v):
        r = jax.lax.axis_index(axis_name)
        ke = _extend(k, axis_name, n, slab, left, right)
        ve = _extend(v, axis_name, n, slab, left, right)
        row_coords = jnp.asarray(local0)[r]  # [slab, k0]
        row_valid = jnp.asarray(valid0)[r]
        cs = [None] + [jnp.asarray(c) for c in coords[1:]]
        return _local_na(p, slab, q, ke, ve, row_coords, row_valid, cs, masks)

    spec = PartitionSpec(None, axis_name)
    return jax.jit(_shard_map(per_device, mesh, in_specs=(spec, spec, spec),
                              out_specs=(spec, spec)))


def na_context_parallel(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False,
                        scale: Optional[float] = None, *, mesh: Mesh, axis_name: str,
                        return_lse: bool = False):
    """Neighborhood attention (rank 1-3) with spatial axis 0 sharded over ``mesh[axis_name]``.

    Arguments and results are those of :func:`natten_jax.na1d` / ``na2d`` / ``na3d`` (rank taken
    from ``query.ndim - 3``; no additional keys/values), plus:

    Args:
      mesh: a :class:`jax.sharding.Mesh`.
      axis_name: the mesh axis over which the first spatial axis (array axis 1) is split into
        equal contiguous slabs; its size must divide that extent. Other mesh axes replicate.
      return_lse: also return the logsumexp ``[B, S..., H]`` (float32; float64 for float64).

    Results are sharded ``PartitionSpec(None, axis_name)``. Exact against
    ``na{rank}d(..., backend="reference")`` on the unsharded arrays, forward and gradients; the
    halo exchange uses ``ppermute`` only (no all-gather). See the module docstring.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if not isinstance(axis_name, str):
        raise TypeError(f"`axis_name` must be the name (str) of one mesh axis, got {axis_name!r}.")
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"`axis_name` {axis_name!r} is not an axis of the mesh (axes {mesh.axis_names}).")
    if not hasattr(query, "shape") or not hasattr(query, "dtype"):
        raise TypeError(f"`query` must be an array, got {type(query).__name__}.")
    if query.ndim not in (4, 5, 6):
        raise ValueError(
            f"na_context_parallel expects `query` of rank 4, 5 or 6 ([batch, 1-3 spatial, heads, "
            f"head_dim]), got shape {tuple(query.shape)}.")
    rank = query.ndim - 3
    p = check_na_call(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale)
    n = int(mesh.shape[axis_name])
    L0 = p.spatial[0]
    if L0 % n != 0:
        raise ValueError(
            f"the first spatial extent ({L0}) must be divisible by the size of mesh axis "
            f"{axis_name!r} ({n}) for context parallelism.")

    args = (query, key, value)
    if _is_explicit(mesh, axis_name):
        # Explicit axes: shard_map wants the inputs' types to carry its in_specs already.
        spec = NamedSharding(mesh, PartitionSpec(None, axis_name))
        args = tuple(jax.reshard(x, spec) for x in args)
    out, lse = _build(p, mesh, axis_name)(*args)
    return (out, lse) if return_lse else out
