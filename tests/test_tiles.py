"""Tile choice and visited-work accounting of the fused kernel (CPU, no kernel needed)."""

import itertools
import math

import numpy as np
import pytest

from natten_jax import tiles
from natten_jax.window import group_extent, window_bounds


def _brute_visited(spatial, kernel, stride, dilation, causal, qt, kt):
    """Pairs a CTA-per-Q-tile kernel computes: for each dilation group and Q tile, the tile's
    (padded) queries times the keys of the KV boxes covering the union of its windows."""
    total = 0
    groups = itertools.product(*[range(d) for d in dilation])
    for g in groups:
        glen = [group_extent(L, d, gi) for L, d, gi in zip(spatial, dilation, g)]
        tiles_per_axis = [range(0, n, 1 << t) for n, t in zip(glen, qt)]
        for origin in itertools.product(*tiles_per_axis):
            keys = 1
            for a, o in enumerate(origin):
                first, last = o, min(o + (1 << qt[a]), glen[a]) - 1
                s0, _ = window_bounds(first * dilation[a] + g[a], kernel[a], stride[a],
                                      dilation[a], spatial[a], causal[a])
                s1, e1 = window_bounds(last * dilation[a] + g[a], kernel[a], stride[a],
                                       dilation[a], spatial[a], causal[a])
                box = 1 << kt[a]
                keys *= -(-(e1 - s0) // box) * box
            total += (1 << sum(qt)) * keys
    return total


@pytest.mark.parametrize("case", [
    ((37,), (7,), (1,), (1,), (False,), (6,), (6,)),
    ((50,), (9,), (3,), (2,), (True,), (7,), (6,)),
    ((11, 13), (5, 4), (2, 1), (1, 2), (False, True), (3, 3), (2, 4)),
    ((9, 20), (3, 7), (1, 1), (3, 1), (False, False), (1, 6), (4, 2)),
    ((5, 6, 7), (3, 3, 2), (1, 2, 1), (1, 2, 2), (True, False, False), (2, 2, 3), (1, 2, 3)),
])
def test_visited_pairs_matches_brute_force(case):
    spatial, kernel, stride, dilation, causal, qt, kt = case
    assert tiles.visited_pairs(spatial, kernel, stride, dilation, causal, qt, kt) == \
        _brute_visited(spatial, kernel, stride, dilation, causal, qt, kt)


def test_window_bounds_are_monotone():
    """The kernel bounds a Q tile's union of windows by its first and last query: window starts
    and ends must never decrease along an axis."""
    for L in range(1, 24):
        for k in range(1, L + 1):
            for s in range(1, k + 1):
                for c in (False, True):
                    start, end = window_bounds(np.arange(L), k, s, 1, L, c)
                    assert np.all(np.diff(start) >= 0) and np.all(np.diff(end) >= 0)


def test_choose_tiles_shapes_and_choices():
    for rank in (1, 2, 3):
        spatial = (40,) * rank
        qt, kt = tiles.choose_tiles(spatial, (7,) * rank, (1,) * rank, (1,) * rank,
                                    (False,) * rank, 64)
        assert len(qt) == len(kt) == rank and sum(qt) in (6, 7) and sum(kt) == 6
    # Measured on an H100 (docs/perf-log.md, v3): long 1-D windows favour 128-query tiles,
    # small head dims 64-query tiles.
    qt, _ = tiles.choose_tiles((32768,), (2047,), (1,), (1,), (False,), 128)
    assert sum(qt) == 7
    qt, _ = tiles.choose_tiles((56, 56), (7, 7), (1, 1), (1, 1), (False, False), 32)
    assert sum(qt) == 6
    # FusedConfig.q_tile restricts the forward's Q tile (the backward always takes 64 tokens)
    qt, _ = tiles.choose_tiles((32768,), (2047,), (1,), (1,), (False,), 128, q_tile=64)
    assert sum(qt) == 6
    qt, _ = tiles.choose_tiles((56, 56), (7, 7), (1, 1), (1, 1), (False, False), 32, q_tile=128)
    assert sum(qt) == 7
    qt, _ = tiles.choose_tiles((56, 56), (7, 7), (1, 1), (1, 1), (False, False), 32, q_tile=128,
                               backward=True)
    assert sum(qt) == 6
    assert tiles.q_tile_sizes() == (6, 7) and tiles.q_tile_sizes(128) == (7,)
    with pytest.raises(ValueError, match="q_tile"):
        tiles.choose_tiles((64,), (3,), (1,), (1,), (False,), 64, q_tile=96)


def test_visited_flops_counts_at_least_useful_work():
    spatial, kernel = (128, 128), (31, 31)
    useful = 4 * 2 * 3 * 64 * math.prod(spatial) * math.prod(kernel)
    visited = tiles.visited_flops(spatial, kernel, (1, 1), (1, 1), (False, False), 2, 3, 64)
    assert useful <= visited <= 2 * useful
    # the count follows the tiles the config's Q tile allows
    for q_tile in (64, 128):
        qt, kt = tiles.choose_tiles(spatial, kernel, (1, 1), (1, 1), (False, False), 64,
                                    q_tile=q_tile)
        pairs = tiles.visited_pairs(spatial, kernel, (1, 1), (1, 1), (False, False), qt, kt)
        assert tiles.visited_flops(spatial, kernel, (1, 1), (1, 1), (False, False), 2, 3, 64,
                                   q_tile=q_tile) == 4 * 2 * 3 * 64 * pairs


def test_sm90_class_tiles():
    geo = ((40, 56), (7, 9), (1, 2), (1, 1), (False, True))
    got = tiles.sm90_class_tiles(*geo)
    assert set(got) == set(tiles._SM90_PAIR_COST)
    for (qn, kn), (qt, kt) in got.items():
        assert sum(qt) == qn and sum(kt) == kn
        best = min(tiles.visited_pairs(*geo, *t) for t in tiles.tile_shapes(2, (qn,), "sm90")
                   if sum(t[1]) == kn)
        assert tiles.visited_pairs(*geo, qt, kt) == best
