"""Tile shapes of the fused kernel and the work they visit.

A fused kernel computes, for each Q tile, every key of the KV boxes that cover the union of its
queries' windows (boxes of the same shape as the KV tile, starting at the union's first key on
each axis). Everything here is separable per axis, so the visited (query, key) pairs of a tile
shape are a product over axes of sums over Q tiles, computed exactly with NumPy.
"""

from __future__ import annotations

import functools
import itertools
from typing import Optional, Sequence, Tuple

import numpy as np

from natten_jax.config import KERNEL_IMPLS, Q_TILES
from natten_jax.window import group_extent, window_bounds

KV_TILE_LOG2 = 6  # 64 keys per KV box (every kernel)
SM90_WIDE_KV_TILE_LOG2 = 7  # 128 keys: the sm90 forward with 128-query tiles may take these
Q_TILE_LOG2 = (6, 7)  # 64 queries (one m16 tile per warp) or 128 (two per warp)

# Relative cost of one visited (query, key) pair by Q tile size (log2), measured on an H100
# (docs/perf-log.md, v3): 128-query tiles feed two MMAs per K/V fragment read from shared memory,
# 16% more visited TFLOP/s at head dim 128; at head dim 32 the kernel is latency-bound and fewer,
# larger CTAs are slower (2d_nat_t: 0.37 -> 0.52 ms).
def _pair_cost(q_log2: int, head_dim: int, impl: str = "sm80",
               kv_log2: int = KV_TILE_LOG2) -> float:
    if impl == "sm90":
        return _SM90_PAIR_COST[q_log2, kv_log2]
    if q_log2 == 6:
        return 1.0
    return 0.87 if head_dim >= 64 else 1.4


# ---- Kernel implementations (sm90 hook) -------------------------------------------------------
# "sm80": the mma.sync kernels (every GPU from sm_80 on); "sm90": the Hopper wgmma kernels
# (compute capability 9.0, head dims 64 and 128; docs/perf-log.md v4, "Backward v2"). Which one
# runs is FusedConfig.forward_impl / backward_impl (natten_jax.config), resolved per problem by
# natten_jax.autotune (impl_candidates, bwd_impl).
IMPLS = KERNEL_IMPLS
SM90_HEAD_DIMS = (64, 128)
# Per-pair cost of the sm90 kernel by (Q tile, KV box) log2 sizes, relative to sm80's 64-query
# tiles, measured on an H100 (docs/perf-log.md, v4): ~305-370 visited TFLOP/s with 64-query
# tiles, ~345-400 with 128, against sm80's ~190-216 with 64; 128-key boxes: docs/perf-log.md,
# "128-key boxes".
_SM90_PAIR_COST = {(6, 6): 0.60, (7, 6): 0.55, (7, 7): 0.495}


def kv_tile_sizes(q_log2: int, impl: str = "sm80", backward: bool = False) -> Tuple[int, ...]:
    """Log2 KV box sizes a kernel takes with ``q_log2`` Q tiles: 64 keys, and 128 in the sm90
    forward with 128-query tiles (kernel_table.h: kSm90FwdWideKvTileTokens)."""
    if not backward and impl == "sm90" and q_log2 == Q_TILE_LOG2[1]:
        return (KV_TILE_LOG2, SM90_WIDE_KV_TILE_LOG2)
    return (KV_TILE_LOG2,)


def tile_shapes(rank: int, q_sizes: Sequence[int], impl: str = "sm80", backward: bool = False):
    """Every legal (Q tile, KV box) pair of log2 extents per axis, Q tiles of ``q_sizes``."""
    for qn in q_sizes:
        for qt in _candidates(rank, qn):
            for kn in kv_tile_sizes(qn, impl, backward):
                for kt in _candidates(rank, kn):
                    yield qt, kt


# ---- float32 (issue 23) ---------------------------------------------------------------------
# float32 inputs run TF32 tensor-core variants of the sm80 kernels only (no sm90 float32
# kernels), with 64-token Q tiles in the forward too (a 128-token tile of float32 operands does
# not fit in shared memory), at head dims 32, 64 and 128; head dim 128 needs about 205 KB of
# shared memory per block, which compute capability 9.x (H100 / H200) has and 8.x does not.
F32_IMPLS = ("sm80",)
F32_Q_TILE_LOG2 = Q_TILE_LOG2[0]
# Head dims above this need compute capability F32_LARGE_SMEM_MIN_MAJOR.x (kernel_table.h:
# kFloat32MaxHeadDimBefore90).
F32_MAX_HEAD_DIM_BEFORE_MIN_MAJOR = 64
F32_LARGE_SMEM_MIN_MAJOR = 9


def is_float32(dtype) -> bool:
    """Whether ``dtype`` (a name or dtype; None: no) is float32, whose kernels differ."""
    if dtype is None:
        return False
    try:
        return np.dtype(dtype) == np.float32
    except TypeError:  # a name NumPy does not know ("bfloat16" without ml_dtypes)
        return False


def impl_supports(impl: str, head_dim: int, dtype=None) -> bool:
    """Whether kernel ``impl`` exists at ``head_dim`` (and for inputs of ``dtype``, if
    given: float32 runs sm80 only)."""
    if is_float32(dtype) and impl not in F32_IMPLS:
        return False
    return impl == "sm80" or (impl == "sm90" and head_dim in SM90_HEAD_DIMS)


def impl_code(impl: str) -> int:
    """The FFI attribute ``impl`` of the forward and backward custom calls."""
    return IMPLS.index(impl)


def _axis_pairs(extent, kernel, stride, dilation, causal, q_log2, kv_log2) -> int:
    """Visited (query, key) pairs on one axis, summed over dilation groups and Q tiles.

    Padded query rows of a partial tile count as visited, as the kernel computes them.
    """
    tq, tk = 1 << q_log2, 1 << kv_log2
    total = 0
    for g in range(dilation):
        glen = group_extent(extent, dilation, g)
        i = np.arange(glen)
        start, end = window_bounds(i * dilation + g, kernel, stride, dilation, extent, causal)
        first = np.arange(0, glen, tq)
        last = np.minimum(first + tq, glen) - 1
        span = end[last] - start[first]
        total += int(np.sum(tq * (-(-span // tk)) * tk))
    return total


@functools.lru_cache(maxsize=4096)
def visited_pairs(spatial: Tuple[int, ...], kernel_size, stride, dilation, is_causal,
                  q_tile: Tuple[int, ...], kv_tile: Tuple[int, ...]) -> int:
    """(query, key) pairs a kernel with these log2 tile extents computes for one (batch, head)."""
    out = 1
    for a in range(len(spatial)):
        out *= _axis_pairs(spatial[a], kernel_size[a], stride[a], dilation[a], is_causal[a],
                           q_tile[a], kv_tile[a])
    return out


def sm90_class_tiles(spatial: Tuple[int, ...], kernel_size, stride, dilation, is_causal):
    """Per size class of the sm90 forward ((Q tile, KV box) log2 token counts, the keys of its
    per-pair costs): the shape of that class with the fewest visited pairs, for timing or
    running each kernel variant (scripts/sm90_box_sizes.py, scripts/sanitize_fna.py)."""
    geo = (tuple(spatial), tuple(kernel_size), tuple(stride), tuple(dilation), tuple(is_causal))
    out = {}
    for qn, kn in _SM90_PAIR_COST:
        shapes = [t for t in tile_shapes(len(spatial), (qn,), "sm90") if sum(t[1]) == kn]
        if shapes:
            out[(qn, kn)] = min(shapes, key=lambda t: visited_pairs(*geo, *t))
    return out


def _candidates(rank: int, log2_sum: int):
    return [t for t in itertools.product(range(log2_sum + 1), repeat=rank) if sum(t) == log2_sum]


def q_tile_sizes(q_tile: Optional[int] = None, dtype=None) -> Tuple[int, ...]:
    """Log2 Q tile sizes of the forward kernel: both (64 and 128 tokens), or only ``q_tile``
    (:attr:`natten_jax.config.FusedConfig.q_tile`) when given; for float32 inputs (``dtype``)
    64 tokens only (``q_tile=128`` is a ``ValueError`` then: the fused backend's ``can_run``
    refuses it first)."""
    if q_tile is not None and q_tile not in Q_TILES:
        raise ValueError(f"`q_tile` must be None or one of {Q_TILES}, got {q_tile!r}")
    if is_float32(dtype):
        if q_tile is not None and q_tile != 1 << F32_Q_TILE_LOG2:
            raise ValueError(f"`q_tile` must be None or {1 << F32_Q_TILE_LOG2} for float32 "
                             f"inputs (their kernels take 64-token Q tiles), got {q_tile!r}")
        return (F32_Q_TILE_LOG2,)
    if q_tile is None:
        return Q_TILE_LOG2
    return (Q_TILE_LOG2[Q_TILES.index(q_tile)],)


def choose_tiles(spatial: Tuple[int, ...], kernel_size, stride, dilation, is_causal,
                 head_dim: int = 128, backward: bool = False, impl: str = "sm80",
                 q_tile: Optional[int] = None, dtype=None):
    """Log2 (Q tile, KV tile) extents per axis that minimise the modelled cost.

    Cost = visited pairs x the per-pair cost of the Q tile size at this head dim (and forward
    kernel ``impl``). Ties go to the shape with more tokens on the last axes (longer contiguous
    runs in memory). ``q_tile`` (64 or 128 tokens) restricts the forward's Q tile; the backward
    kernels, and the float32 forward (``dtype``), take 64-token Q tiles only.
    """
    q_sizes = (Q_TILE_LOG2[0],) if backward else q_tile_sizes(q_tile, dtype)
    return _choose_tiles(tuple(spatial), tuple(kernel_size), tuple(stride), tuple(dilation),
                         tuple(is_causal), int(head_dim), q_sizes,
                         "sm80" if backward else impl)


@functools.lru_cache(maxsize=4096)
def _choose_tiles(spatial, kernel_size, stride, dilation, is_causal, head_dim, q_sizes,
                  impl="sm80"):
    best = None
    rank = len(spatial)
    for qt, kt in tile_shapes(rank, q_sizes, impl):
        pairs = visited_pairs(spatial, kernel_size, stride, dilation, is_causal, qt, kt)
        cost = pairs * _pair_cost(sum(qt), head_dim, impl, sum(kt))
        key = (cost, tuple(-x for x in reversed(qt)), tuple(-x for x in reversed(kt)))
        if best is None or key < best[0]:
            best = (key, qt, kt)
    return best[1], best[2]


def visited_flops(spatial: Sequence[int], kernel_size, stride, dilation, is_causal, batch: int,
                  heads: int, head_dim: int, impl: str = "sm80",
                  q_tile: Optional[int] = None, dtype=None) -> int:
    """Forward FLOPs the fused kernel performs, masked pairs included (4 per pair and dim;
    ``dtype``: the inputs', float32 restricting the tiles)."""
    args = tuple(tuple(x) for x in (spatial, kernel_size, stride, dilation, is_causal))
    qt, kt = choose_tiles(*args, head_dim, impl=impl, q_tile=q_tile, dtype=dtype)
    return 4 * batch * heads * head_dim * visited_pairs(*args, qt, kt)
