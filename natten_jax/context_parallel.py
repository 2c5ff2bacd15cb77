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
3. runs the reference backend's row-block engine (:func:`natten_jax.reference.attend_rows`)
   for its slab's queries against the extended key/value slab ``[slab start - left, slab end +
   right)``, gathering with local coordinates ``global - offset`` (offset from
   ``jax.lax.axis_index``, so one program serves every device). As in the reference, each row
   block runs under ``jax.checkpoint``: the backward pass recomputes a block's gathered windows
   instead of keeping them, so training memory grows with the slab's tokens, not tokens x window.

Ragged batches (``valid_extent``, as in :func:`natten_jax.na2d`): the windows depend on each
sample's extent, a runtime operand, so the halo plan cannot be read off the tensor's extent.
A window holds its query, so its keys on axis 0 lie within ``(kernel - 1) * dilation`` rows of
it (none after it when causal): :func:`ragged_halo` takes those widths, which serve every
extent. Each device zeroes its slab's padded tokens before the exchange, gathers every sample's
windows (:func:`natten_jax.window.window_offsets` of its clamped extent, in global coordinates,
shifted to the extended slab) and writes output 0 and logsumexp 0.0 at padded queries, as the
reference backend does.

Nothing is all-gathered: communication is ``2 * ceil(left / slab) + 2 * ceil(right / slab)``
collective-permutes of at most one slab each (key and value), and their transposes in the
backward pass (``jax.grad`` differentiates through ``ppermute``). Numerics are the reference
backend's (float32 compute for 16/32-bit inputs, float64 for float64), so results equal
``natten_jax.na{rank}d(..., backend="reference")`` on the unsharded arrays up to rounding.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from natten_jax.checks import NAProblem, check_context_parallel_call
from natten_jax.reference import attend_rows, keep
from natten_jax.window import sample_extent, valid_tokens, window_offsets

__all__ = ["na_context_parallel", "halo_plan", "ragged_halo"]


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


def ragged_halo(extent: int, num_devices: int, kernel_size: int, dilation: int,
                is_causal: bool):
    """Halo widths ``(left, right)`` on axis 0 that serve a ragged batch whatever its extents:
    a window holds its query, so its keys lie within ``(kernel_size - 1) * dilation`` rows of it
    (none after it when causal), and no device needs more rows than the others hold."""
    reach = min((kernel_size - 1) * dilation, extent - extent // num_devices)
    return reach, 0 if is_causal else reach


def _ragged_rows(p: NAProblem, valid_extent, r, slab: int, left: int, right: int):
    """Device ``r``'s view of a ragged batch: its slab's tokens inside their samples (bool ``[B,
    slab, *rest]``), the axis-0 window coordinates of its queries in the extended slab and their
    validity (``[B, slab, k0]``), and the windows of the other axes (``[B, La, ka]``)."""
    ext = sample_extent(valid_extent, p.kernel_size, p.dilation, p.spatial)
    start = r * slab
    inside = jax.lax.dynamic_slice_in_dim(valid_tokens(p.spatial, ext), start, slab, axis=1)
    offsets = window_offsets(p.spatial, p.kernel_size, p.stride, p.dilation, p.is_causal,
                             valid_extent=ext)
    coords0, valid0 = (jax.lax.dynamic_slice_in_dim(jnp.asarray(x), start, slab, axis=1)
                       for x in offsets[0])
    local = coords0 - (start - left)
    # Masked (causal) entries may point anywhere in the sample: clamp them into the slab.
    local = jnp.where(valid0, local, jnp.clip(local, 0, slab + left + right - 1))
    return (inside, local, valid0, [None] + [c for c, _ in offsets[1:]],
            [None] + [m for _, m in offsets[1:]])


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


@functools.lru_cache(maxsize=64)
def _build(p: NAProblem, mesh: Mesh, axis_name: str):
    """The jitted shard_map program of one static problem (cached: built and compiled once)."""
    n = int(mesh.shape[axis_name])
    slab = p.spatial[0] // n
    spec = PartitionSpec(None, axis_name)
    if p.ragged:
        left, right = ragged_halo(p.spatial[0], n, p.kernel_size[0], p.dilation[0],
                                  p.is_causal[0])

        def per_device_ragged(q, k, v, valid_extent):
            # Padded tokens zeroed before anything reads them (halos included: each device
            # zeroes its own slab before the exchange); every sample gathers its own windows.
            r = jax.lax.axis_index(axis_name)
            inside, local, valid, coords, masks = _ragged_rows(p, valid_extent, r, slab, left,
                                                               right)
            q, k, v = (keep(inside, x) for x in (q, k, v))
            ke = _extend(k, axis_name, n, slab, left, right)
            ve = _extend(v, axis_name, n, slab, left, right)
            out, lse = attend_rows(p, q, ke, ve, local, valid, coords, masks, per_sample=True)
            return keep(inside, out), keep(inside, lse)

        return jax.jit(_shard_map(per_device_ragged, mesh,
                                  in_specs=(spec, spec, spec, PartitionSpec()),
                                  out_specs=(spec, spec)))

    left, right, local0, valid0 = halo_plan(p.spatial[0], n, p.kernel_size[0], p.stride[0],
                                            p.dilation[0], p.is_causal[0])
    offsets = window_offsets(p.spatial, p.kernel_size, p.stride, p.dilation, p.is_causal)
    coords = [None] + [c for c, _ in offsets[1:]]
    masks = [None] + [m for _, m in offsets[1:]]

    def per_device(q, k, v):
        # The reference's row-block engine on this device's slab of queries against its
        # halo-extended keys and values, with slab-local axis-0 window coordinates (each block
        # under jax.checkpoint, so training memory stays bounded as in the reference).
        r = jax.lax.axis_index(axis_name)
        ke = _extend(k, axis_name, n, slab, left, right)
        ve = _extend(v, axis_name, n, slab, left, right)
        row_coords = jnp.asarray(local0)[r]  # [slab, k0]
        row_valid = jnp.asarray(valid0)[r]
        return attend_rows(p, q, ke, ve, row_coords, row_valid, coords, masks)

    return jax.jit(_shard_map(per_device, mesh, in_specs=(spec, spec, spec),
                              out_specs=(spec, spec)))


def na_context_parallel(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False,
                        scale: Optional[float] = None, *, mesh: Mesh, axis_name: str,
                        return_lse: bool = False, precision=None, valid_extent=None):
    """Neighborhood attention (rank 1-3) with spatial axis 0 sharded over ``mesh[axis_name]``.

    Arguments and results are those of :func:`natten_jax.na1d` / ``na2d`` / ``na3d`` (rank taken
    from ``query.ndim - 3``; no additional keys/values), plus:

    Args:
      mesh: a :class:`jax.sharding.Mesh`.
      axis_name: the mesh axis over which the first spatial axis (array axis 1) is split into
        equal contiguous slabs; its size must divide that extent. Other mesh axes replicate.
      return_lse: also return the logsumexp ``[B, S..., H]`` (float32; float64 for float64).
      precision: how accurately float32 inputs are computed, as in :func:`natten_jax.na2d`
        (None follows ``jax.default_matmul_precision`` when traced; 16-bit inputs ignore it).
      valid_extent: a ragged batch, as in :func:`natten_jax.na2d`: integer ``[batch, rank]``,
        sample ``b`` occupying the leading ``valid_extent[b, a]`` positions of each spatial
        axis (a runtime operand, replicated on every device; concrete values are checked,
        traced ones clamped). Output 0 and logsumexp 0.0 at padded queries, zero gradients for
        padded tokens.

    Results are sharded ``PartitionSpec(None, axis_name)``. Exact against
    ``na{rank}d(..., backend="reference")`` on the unsharded arrays, forward and gradients; the
    halo exchange uses ``ppermute`` only (no all-gather). See the module docstring.
    """
    p = check_context_parallel_call(query, key, value, kernel_size, stride, dilation, is_causal,
                                    scale, mesh, axis_name, precision, valid_extent)
    args = (query, key, value)
    specs = (PartitionSpec(None, axis_name),) * 3
    if valid_extent is not None:  # replicated on every device
        args += (jnp.asarray(valid_extent, jnp.int32),)
        specs += (PartitionSpec(),)
    if _is_explicit(mesh, axis_name):
        # Explicit axes: shard_map wants the inputs' types to carry its in_specs already.
        args = tuple(jax.reshard(x, NamedSharding(mesh, s)) for x, s in zip(args, specs))
    out, lse = _build(p, mesh, axis_name)(*args)
    return (out, lse) if return_lse else out
