"""Tile shapes of the fused kernel and the work they visit.

A fused kernel computes, for each Q tile, every key of the KV boxes that cover the union of its
queries' windows (boxes of the same shape as the KV tile, starting at the union's first key on
each axis). Everything here is separable per axis, so the visited (query, key) pairs of a tile
shape are a product over axes of sums over Q tiles, computed exactly with NumPy.
"""

from __future__ import annotations

import functools
import itertools
from typing import Sequence, Tuple

import numpy as np

from natten_jax.window import group_extent, window_bounds

TILE_LOG2_SUM = 6  # 64 queries per Q tile and 64 keys per KV box


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


def _candidates(rank: int):
    return [t for t in itertools.product(range(TILE_LOG2_SUM + 1), repeat=rank)
            if sum(t) == TILE_LOG2_SUM]


@functools.lru_cache(maxsize=4096)
def choose_tiles(spatial: Tuple[int, ...], kernel_size, stride, dilation, is_causal):
    """Log2 (Q tile, KV tile) extents per axis that minimise the visited work.

    Ties go to the shape with more tokens on the last axes (longer contiguous runs in memory).
    """
    best = None
    for qt in _candidates(len(spatial)):
        for kt in _candidates(len(spatial)):
            cost = visited_pairs(spatial, kernel_size, stride, dilation, is_causal, qt, kt)
            key = (cost, tuple(-x for x in reversed(qt)), tuple(-x for x in reversed(kt)))
            if best is None or key < best[0]:
                best = (key, qt, kt)
    return best[1], best[2]


def visited_flops(spatial: Sequence[int], kernel_size, stride, dilation, is_causal, batch: int,
                  heads: int, head_dim: int) -> int:
    """Forward FLOPs the fused kernel performs, masked pairs included (4 per pair and dim)."""
    args = tuple(tuple(x) for x in (spatial, kernel_size, stride, dilation, is_causal))
    qt, kt = choose_tiles(*args)
    return 4 * batch * heads * head_dim * visited_pairs(*args, qt, kt)
