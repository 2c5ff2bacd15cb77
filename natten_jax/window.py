"""Neighborhood-attention window math: the ground truth.

Everything here is NATTEN's definition (``csrc/include/natten/cuda/reference/mask.hpp`` in
SHI-Labs/NATTEN), written once for Python. The only other copy is the CUDA header
``src/cuda/include/natten_jax/window.cuh``; tests compare the two.

Per spatial axis of extent ``L`` with kernel size ``k``, stride ``s``, dilation ``d`` and a
causal flag:

* **Dilation groups.** Token ``x`` belongs to group ``g = x % d`` at in-group index ``i = x // d``.
  Group ``g`` holds ``ceil((L - g) / d)`` tokens (groups may differ in length by one). Attention
  never crosses groups; inside a group the problem is undilated NA over the group's tokens.
* **Window in a group** (indices ``[start, end)`` of the group, extent ``Lg``), with
  ``left = k // 2`` and ``right = k // 2 + k % 2 - 1`` (so ``left + right = k - 1``; an even ``k``
  has one more token on the left):

  - not causal: the *stride-group leader* ``c = min((i // s) * s + s // 2, Lg - 1)`` is centred:
    ``start = clamp(c - left, 0, Lg - k)``, ``end = start + k``. Every query of one stride group
    (``i // s`` equal) shares its leader's window, which is shifted to stay inside the extent.
  - causal: the leader is the last token of the stride group, ``c = min((i // s) * s + s - 1,
    Lg - 1)``; ``start = max(c - k + 1, 0)``, ``end = i + 1``. A query never sees a later token.

  Key ``y`` is a neighbor of query ``x`` iff both are in the same group on every axis and each
  axis's in-group index of ``y`` lies in the query's ``[start, end)``.

Examples (``L = 10``, ``k = 3``)::

    >>> [window_start(i, 3, 1, 10, False) for i in range(10)]
    [0, 0, 1, 2, 3, 4, 5, 6, 7, 7]
    >>> [window_start(i, 3, 2, 10, False) for i in range(10)]   # stride 2: pairs share a window
    [0, 0, 2, 2, 4, 4, 6, 6, 7, 7]
    >>> [window_start(i, 3, 1, 10, True) for i in range(5)]     # causal: i-2 .. i
    [0, 0, 0, 1, 2]

The functions take Python ints or integer arrays (NumPy or JAX) alike.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np


def _min(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return np.minimum(a, b) if _is_np(a, b) else _jnp().minimum(a, b)


def _max(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    return np.maximum(a, b) if _is_np(a, b) else _jnp().maximum(a, b)


def _is_np(*xs):
    return all(isinstance(x, (int, np.ndarray, np.integer)) for x in xs)


def _jnp():
    import jax.numpy as jnp

    return jnp


def window_left(kernel_size: int) -> int:
    """Tokens a centred window holds before the query."""
    return kernel_size // 2


def window_right(kernel_size: int) -> int:
    """Tokens a centred window holds after the query (one fewer than left when k is even)."""
    return kernel_size // 2 + kernel_size % 2 - 1


def group_extent(extent: int, dilation: int, group):
    """Number of tokens of dilation group ``group`` on an axis of ``extent`` tokens."""
    return (extent - group + dilation - 1) // dilation


def window_start(index, kernel_size: int, stride: int, group_len, is_causal: bool):
    """First in-group index of the window of in-group query ``index`` (group of ``group_len``)."""
    if is_causal:
        leader = _min((index // stride) * stride + stride - 1, group_len - 1)
        return _max(leader - (kernel_size - 1), 0)
    leader = _min((index // stride) * stride + stride // 2, group_len - 1)
    return _min(_max(leader - window_left(kernel_size), 0), group_len - kernel_size)


def window_end(index, start, kernel_size: int, is_causal: bool):
    """One past the last in-group index of the window (``start + k`` unless causal)."""
    if is_causal:
        return index + 1
    return start + kernel_size


def window_bounds(x, kernel_size: int, stride: int, dilation: int, extent: int, is_causal: bool):
    """Window of global query coordinate ``x`` on one axis.

    Returns ``(start, end)`` as in-group indices of ``x``'s dilation group; the neighbors on this
    axis are the global coordinates ``g + d * j`` for ``j`` in ``[start, end)``, ``g = x % d``.
    """
    g = x % dilation
    i = x // dilation
    glen = group_extent(extent, dilation, g)
    start = window_start(i, kernel_size, stride, glen, is_causal)
    return start, window_end(i, start, kernel_size, is_causal)


def is_neighbor_1d(x, y, kernel_size, stride, dilation, extent, is_causal):
    """Whether key ``y`` is in the window of query ``x`` on one axis (global coordinates)."""
    start, end = window_bounds(x, kernel_size, stride, dilation, extent, is_causal)
    j = y // dilation
    same_group = (x % dilation) == (y % dilation)
    return same_group & (j >= start) & (j < end)


def num_neighbors(shape: Sequence[int], kernel_size, stride, dilation, is_causal) -> int:
    """Total (query, key) pairs of the neighborhood: the useful work of a forward pass."""
    total = 1
    for L, k, s, d, c in zip(shape, kernel_size, stride, dilation, is_causal):
        x = np.arange(L)
        start, end = window_bounds(x, k, s, d, L, c)
        total *= int(np.sum(end - start))
    return total


def window_offsets(shape: Sequence[int], kernel_size, stride, dilation, is_causal) -> Tuple:
    """Per axis, the global key coordinates of each query's window as an int array [L, k].

    Entry ``[x, j]`` is the ``j``-th neighbor of query ``x`` (``g + d * (start + j)``), and a
    bool array [L, k] says which entries are inside ``[start, end)`` (all of them unless causal).
    Used by the reference backend to gather neighborhoods.
    """
    out = []
    for L, k, s, d, c in zip(shape, kernel_size, stride, dilation, is_causal):
        x = np.arange(L)
        start, end = window_bounds(x, k, s, d, L, c)
        j = start[:, None] + np.arange(k)[None, :]
        valid = j < end[:, None]
        coord = (x % d)[:, None] + d * np.minimum(j, (group_extent(L, d, x % d) - 1)[:, None])
        out.append((coord.astype(np.int32), valid))
    return tuple(out)


def prod(xs) -> int:
    return int(math.prod(xs))
