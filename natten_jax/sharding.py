"""SPMD partitioning of the neighborhood-attention custom calls.

XLA cannot look inside a custom call, so without help it gathers every sharded operand of one
onto each device. :func:`partitioned` wraps a per-shard function (on the GPU: the FFI call of
one kernel) in :class:`jax.experimental.custom_partitioning` so that, under ``jax.jit`` with
sharded inputs (``NamedSharding`` on a ``Mesh``, auto or explicit axes; no ``shard_map``
needed), each device runs it on its own shard, without collectives:

* the batch axis may be sharded on any mesh axes whose total size divides the batch;
* the heads axis may be sharded, consistently for the query heads ``H`` and the key/value heads
  ``Hkv`` so that every shard keeps whole GQA groups (query head ``h`` uses key/value head
  ``h // (H // Hkv)``, locally as globally). With ``n`` head shards (``n`` divides ``H``):

  - ``n`` divides ``Hkv``: the kv heads are sharded the same way;
  - otherwise a leading part of the heads' mesh axes must have size exactly ``Hkv`` (``1`` for
    MQA: no axes): the kv heads are sharded on it, one per shard, and replicated over the other
    heads axes, whose shards hold different query heads of the same kv head. Results of kind
    ``k``/``v`` (gradients: sums over a group's query heads) are then summed over those axes
    (an all-reduce of dk/dv, the only collective the wrapper adds);
  - anything else (e.g. 6 query / 3 kv heads on 2 shards) replicates the heads;
* spatial axes and head dims are replicated: an operand sharded on them, or on batch/heads in a
  way that does not divide evenly, is asked for replicated (XLA inserts the all-gather).

Every operand and result of the wrapped function is described by a *kind* naming its layout
(``S...`` the spatial axes):

========  ==========================  ===================================================
kind      layout                      e.g.
========  ==========================  ===================================================
``"q"``   ``[B, S..., H, D]``         query, dq
``"k"``   ``[B, S..., Hkv, D]``       key, dk
``"v"``   ``[B, S..., Hkv, Dv]``      value, dv
``"o"``   ``[B, S..., H, Dv]``        output, d(output)
``"lse"`` ``[B, S..., H]``            logsumexp, delta
``"ext"`` ``[B, rank]``                 valid extents of a ragged batch (int32)
========  ==========================  ===================================================

An ``"ext"`` operand follows the batch sharding of the call (its rank axis is replicated) and
never decides it or the heads': each batch shard gets its samples' extents.

Both of JAX's partitioners are served. Shardy (the default) propagates shardings through a
``sharding_rule``: factors ``b``, ``s0..``, ``d``/``e`` (head dims) and ``h`` (kv heads), the
query heads being the compound factor ``(h g)`` with the group ``g = H // Hkv`` (just ``h`` if
``H == Hkv``, just ``g`` for MQA, where a size-1 factor may not be compounded), so that a heads
sharding of the query reaches the kv heads and back; spatial and head-dim factors, and the rank
factor ``r`` of an ``"ext"`` operand, need replication. GSPMD
(``jax_use_shardy_partitioner=False``) uses ``infer_sharding_from_operands``. Either way
``partition`` makes the final choice described above and hands XLA the per-shard function,
traced on local shapes (batch and heads divided).

On one device, or inside a fully manual ``shard_map``, the wrapped function is called directly;
under ``vmap`` the caller must batch it itself (``custom_partitioning`` has no batching rule:
the fused backend puts it under its ``custom_vmap``).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.experimental.custom_partitioning import (ArrayMapping, CompoundFactor, SdyShardingRule,
                                                  custom_partitioning)
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

KINDS = ("q", "k", "v", "o", "lse", "ext")
HEADS_KINDS = ("q", "k", "v", "o", "lse")  # kinds with a heads axis (all but "ext")


def _kind_rank(kind: str, ndim: int) -> int:
    """Number of spatial axes of an array of ``kind`` with ``ndim`` dims."""
    return ndim - (2 if kind == "lse" else 3)


def _heads_axis(kind: str) -> int:
    """The heads axis of an array of ``kind`` (one of HEADS_KINDS)."""
    return -1 if kind == "lse" else -2


def _check_kinds(in_kinds, out_kinds):
    for k in tuple(in_kinds) + tuple(out_kinds):
        if k not in KINDS:
            raise ValueError(f"unknown array kind {k!r}; expected one of {KINDS}")
    if "ext" in out_kinds:
        raise ValueError("an \"ext\" array (valid extents) is an operand, never a result")
    if "q" not in in_kinds and "o" not in in_kinds and "lse" not in in_kinds:
        raise ValueError("the operands must include a query-heads array (q, o or lse)")
    if "k" not in in_kinds and "v" not in in_kinds:
        raise ValueError("the operands must include a key/value-heads array (k or v)")


def _heads(kinds, shapes) -> Tuple[int, int]:
    """(H, Hkv) of the call, from the operands' shapes."""
    H = Hkv = None
    for kind, shape in zip(kinds, shapes):
        if kind in ("q", "o"):
            H = shape[-2]
        elif kind == "lse":
            H = shape[-1]
        elif kind in ("k", "v"):
            Hkv = shape[-2]
    return H, Hkv


# ---------------------------------------------------------------------------------------------
# Shardy rule


def _head_factors(H: int, Hkv: int):
    """(query-heads factor, kv-heads factor) of the Shardy rule."""
    if H == Hkv:
        return "h", "h"
    if Hkv == 1:  # MQA: a size-1 factor may not sit in a compound factor
        return "g", "h"
    return CompoundFactor("h", "g"), "h"


def _mapping(kind: str, ndim: int, qheads, kvheads) -> ArrayMapping:
    if kind == "ext":  # [B, rank]: the batch factor and a replicated one
        return ArrayMapping("b", "r")
    rank = _kind_rank(kind, ndim)
    lead = ("b",) + tuple(f"s{i}" for i in range(rank))
    tail = {"q": (qheads, "d"), "k": (kvheads, "d"), "v": (kvheads, "e"), "o": (qheads, "e"),
            "lse": (qheads,)}[kind]
    return ArrayMapping(*(lead + tail))


def _sdy_rule(in_kinds, out_kinds, in_shapes, out_shapes) -> SdyShardingRule:
    H, Hkv = _heads(in_kinds, in_shapes)
    qheads, kvheads = _head_factors(H, Hkv)
    kinds = tuple(in_kinds) + tuple(out_kinds)
    shapes = tuple(in_shapes) + tuple(out_shapes)
    maps = [_mapping(k, len(s), qheads, kvheads) for k, s in zip(kinds, shapes)]
    factors = []  # in order of first use: Shardy wants the special factors in that order
    for m in maps:
        for d in m:
            factors += [f for f in (d if isinstance(d, CompoundFactor) else (d,))
                        if f not in factors]
    replicated = tuple(f for f in factors if f[0] == "s" or f in ("d", "e", "r"))
    sizes = {"g": H // Hkv} if isinstance(qheads, CompoundFactor) else {}
    return SdyShardingRule(tuple(maps[:len(in_kinds)]), tuple(maps[len(in_kinds):]),
                           need_replication_factors=replicated, **sizes)


# ---------------------------------------------------------------------------------------------
# The partitioning plan: which mesh axes shard batch and heads.


def _entry_axes(entry) -> Tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def _pad(spec, ndim) -> Tuple:
    spec = tuple(spec)
    return spec + (None,) * (ndim - len(spec))


def _padded_spec(x) -> Tuple:
    """The PartitionSpec entries of ``x``'s sharding, one per dim (all None if not named)."""
    sharding = getattr(x, "sharding", None)
    return _pad(sharding.spec if isinstance(sharding, NamedSharding) else (), len(x.shape))


def _explicit_mesh(avals):
    """The (abstract) mesh of the first operand typed with an explicit-axes sharding."""
    for a in avals:
        s = getattr(a, "sharding", None)
        if (isinstance(s, NamedSharding) and not s.mesh.empty
                and any(t == AxisType.Explicit for t in s.mesh.axis_types)):
            return s.mesh
    return None


def _mesh_of(mesh, arrays):
    """The mesh the shardings refer to. Without one (operands with non-named shardings and no
    mesh in context), a one-axis mesh of their devices: everything is then replicated."""
    for x in arrays:
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding):
            return s.mesh
    if mesh is not None and not mesh.empty:
        return mesh
    devices = set()
    for x in arrays:
        s = getattr(x, "sharding", None)
        if s is not None:
            devices |= set(s.device_set)
    return Mesh(np.array(sorted(devices, key=lambda d: d.id)), ("_natten_jax_devices",))


def _size(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _batch_axes(mesh, axes, B, used=()) -> Tuple[str, ...]:
    """The longest prefix of ``axes`` whose size divides ``B`` (and that avoids ``used``)."""
    out = ()
    for a in axes:
        if a in used or B % (_size(mesh, out) * mesh.shape[a]) != 0:
            break
        out += (a,)
    return out


def _heads_axes(mesh, axes, H, Hkv, used=()):
    """(query-heads axes, kv-heads axes) from a heads sharding ``axes`` (major to minor).

    The query heads take the longest prefix ``A`` of ``axes`` (avoiding ``used``) whose size
    ``n`` divides ``H`` and for which whole GQA groups stay together: either ``n`` divides
    ``Hkv`` (the kv heads are sharded on ``A`` too), or a prefix of ``A`` has size exactly
    ``Hkv`` (the kv heads are sharded on it, one per shard, and replicated over the rest of
    ``A``; with ``Hkv == 1`` the empty prefix: MQA keeps its kv head everywhere).
    """
    cand = ()
    for a in axes:
        if a in used:
            break
        cand += (a,)
    for n in range(len(cand), 0, -1):
        A = cand[:n]
        size = _size(mesh, A)
        if H % size:
            continue
        if Hkv % size == 0:
            return A, A
        for m in range(n - 1, -1, -1):
            if _size(mesh, A[:m]) == Hkv:
                return A, A[:m]
    return (), ()


def plan(mesh, in_kinds, arrays):
    """(batch axes, query-heads axes, kv-heads axes): the mesh axes that shard every operand
    and result of the call. Batch and heads shardings are read from the first operand sharded
    on them (in operand order; an ``"ext"`` operand is never read), then cut back to what
    divides evenly (see ``_heads_axes``)."""
    H, Hkv = _heads(in_kinds, [x.shape for x in arrays])
    B = arrays[0].shape[0]
    specs = [_padded_spec(x) for x in arrays]
    batch = ()
    for kind, spec in zip(in_kinds, specs):
        if spec[0] is not None and kind in HEADS_KINDS:  # a tiny "ext" operand follows
            batch = _batch_axes(mesh, _entry_axes(spec[0]), B)
            break
    qheads = kvheads = ()
    for kind, spec in zip(in_kinds, specs):
        if kind not in HEADS_KINDS:
            continue
        entry = spec[_heads_axis(kind)]
        if entry is None:
            continue
        axes = _entry_axes(entry)
        if kind in ("k", "v"):
            # A kv-heads sharding: the query heads follow it, unless it does not divide Hkv.
            qheads, kvheads = _heads_axes(mesh, axes, Hkv, Hkv, used=batch)
        else:
            qheads, kvheads = _heads_axes(mesh, axes, H, Hkv, used=batch)
        break
    return batch, qheads, kvheads


def _entry(axes):
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else tuple(axes)


def _spec(kind: str, ndim: int, batch, qheads, kvheads) -> PartitionSpec:
    entries = [None] * ndim
    entries[0] = _entry(batch)
    if kind in HEADS_KINDS:
        entries[_heads_axis(kind)] = _entry(kvheads if kind in ("k", "v") else qheads)
    return PartitionSpec(*entries)


def _shardings(mesh, kinds, shapes, axes):
    return tuple(NamedSharding(mesh, _spec(k, len(s), *axes)) for k, s in zip(kinds, shapes))


# ---------------------------------------------------------------------------------------------


def partitioned(fn: Callable, in_kinds: Sequence[str], out_kinds: Sequence[str],
                name: Optional[str] = None) -> Callable:
    """``fn`` (arrays -> tuple of arrays, laid out as ``in_kinds`` / ``out_kinds``) made
    SPMD-partitionable over batch and heads.

    ``fn`` is traced on the global shapes (for shape inference and the single-device path) and,
    under a multi-device jit, on each shard's local shapes; it must derive everything
    shape-dependent (batch, heads) from its arguments' shapes, and may not close over arrays
    (``custom_partitioning`` refuses constants: wrap such an ``fn`` in ``jax.jit``, which keeps
    them inside; the FFI call has none and stays unwrapped, so that eager calls keep JAX's
    per-primitive compile cache). Results of kind ``k``/``v`` must
    be sums over the query heads of each kv head's group (as gradients are): where shards
    share kv heads they are summed across them. ``name`` names the per-shard function.
    Returns a function with ``fn``'s signature returning a tuple of ``len(out_kinds)`` arrays.
    """
    in_kinds, out_kinds = tuple(in_kinds), tuple(out_kinds)
    _check_kinds(in_kinds, out_kinds)
    n_in = len(in_kinds)

    def per_shard(*xs):
        if len(xs) != n_in:
            raise TypeError(f"expected {n_in} operands ({in_kinds}), got {len(xs)}")
        outs = fn(*xs)
        outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
        if len(outs) != len(out_kinds):
            raise ValueError(f"expected {len(out_kinds)} results ({out_kinds}), got {len(outs)}")
        return outs

    if name is not None:
        per_shard.__name__ = per_shard.__qualname__ = name

    def global_fn(*xs):
        # Traced on the global shapes: gives the results' types (and is what runs on a single
        # device). With explicit mesh axes (sharding in types, e.g. ``jax.make_mesh``'s
        # default) the results must be typed with the shardings ``partition`` produces, or
        # the caller would see them replicated and gather them.
        outs = per_shard(*xs)
        avals = [jax.typeof(x) for x in xs]
        mesh = _explicit_mesh(avals)
        if mesh is None:
            return outs
        want = _shardings(mesh, out_kinds, [o.shape for o in outs], plan(mesh, in_kinds, avals))
        return tuple(o if _padded_spec(jax.typeof(o)) == _pad(w.spec, o.ndim)
                     else jax.sharding.reshard(o, w) for o, w in zip(outs, want))

    call = custom_partitioning(global_fn)

    def infer_sharding_from_operands(mesh, arg_shapes, result_shape):
        mesh = _mesh_of(mesh, arg_shapes)
        axes = plan(mesh, in_kinds, arg_shapes)
        return _shardings(mesh, out_kinds, [r.shape for r in result_shape], axes)

    def partition(mesh, arg_shapes, result_shape):
        mesh = _mesh_of(mesh, arg_shapes)
        axes = plan(mesh, in_kinds, arg_shapes)
        arg_shardings = _shardings(mesh, in_kinds, [a.shape for a in arg_shapes], axes)
        out_shardings = _shardings(mesh, out_kinds, [r.shape for r in result_shape], axes)
        _, qheads, kvheads = axes
        shared = tuple(a for a in qheads if a not in kvheads)
        if not shared or not any(k in ("k", "v") for k in out_kinds):
            return mesh, per_shard, out_shardings, arg_shardings

        # The shards along `shared` hold different query heads of the same kv heads: each one's
        # kv-kind results (gradients: sums over a group's query heads) are partial sums.
        def lower_fn(*xs):
            outs = per_shard(*xs)
            return tuple(jax.lax.psum(o, shared) if k in ("k", "v") else o
                         for o, k in zip(outs, out_kinds))

        return mesh, lower_fn, out_shardings, arg_shardings

    def sharding_rule(mesh, value_types, result_types):
        return _sdy_rule(in_kinds, out_kinds, [tuple(t.shape) for t in value_types],
                         [tuple(t.shape) for t in result_types])

    call.def_partition(partition=partition,
                       infer_sharding_from_operands=infer_sharding_from_operands,
                       sharding_rule=sharding_rule)

    def wrapped(*xs):
        return tuple(call(*xs))

    return wrapped
