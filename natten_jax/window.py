"""Neighborhood-attention window math: the ground truth.

Everything here is NATTEN's definition (``csrc/include/natten/cuda/reference/mask.hpp`` in
SHI-Labs/NATTEN), written once for Python. The only other copy is the CUDA header
``src/cuda/include/natten_jax/window.cuh`` (with ``neighborhood.cuh`` on top of it); tests
compare the two.

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

* **Runs of queries and keys** (what a tiled kernel asks): :func:`tile_union` and
  :func:`tile_intersection` bound the keys some / every query of a run ``[first, last]`` sees;
  :func:`inverse_window` gives the queries whose windows meet a run of keys (the inverse
  neighborhood). The device policy ``src/cuda/include/natten_jax/neighborhood.cuh`` answers the
  same questions; tests compare the two through the ``natten_jax_window_bounds`` test target.

* **Ragged batches** (``valid_extent=`` of :func:`natten_jax.na2d` etc.): sample ``b`` of a
  padded batch occupies the leading ``E[b, a]`` positions of axis ``a``, and everything above is
  computed on those positions alone, with ``E[b, a]`` in place of the axis extent ``L``: its
  dilation groups (``group_extent(E[b, a], d, g)``), stride groups and windows, so the result is
  that of the sample cropped to its extent. Tokens at or beyond ``E[b, a]`` are padding: they
  are no query's neighbor, and their own outputs are defined as zero. The extent a backend uses
  is :func:`sample_extent`, ``clip(E, kernel_size * dilation, L)``, the same rule as the CUDA
  kernels'; concrete extents outside that range are refused by :mod:`natten_jax.checks`, so the
  clamp only acts on traced values. :func:`window_offsets` takes such extents (NumPy or traced
  JAX) and returns per-sample windows.

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


def tile_union(first, last, kernel_size: int, stride: int, group_len, is_causal: bool):
    """Union of the windows of in-group queries ``[first, last]`` (``first <= last``).

    Returns ``(lo, hi)``: the keys ``[lo, hi)`` that some query of the run sees (the keys a query
    tile, or a warp's rows, must visit). Window starts and ends are non-decreasing in the query
    and consecutive windows leave no gap, so the first and the last query bound it::

        >>> tile_union(0, 3, 3, 1, 10, False)      # windows [0, 3), [0, 3), [1, 4), [2, 5)
        (0, 5)
        >>> tile_union(4, 7, 3, 1, 10, True)       # causal: [2, 5) ... [5, 8)
        (2, 8)
    """
    start_last = window_start(last, kernel_size, stride, group_len, is_causal)
    return (window_start(first, kernel_size, stride, group_len, is_causal),
            window_end(last, start_last, kernel_size, is_causal))


def tile_intersection(first, last, kernel_size: int, stride: int, group_len, is_causal: bool):
    """Intersection of the windows of in-group queries ``[first, last]`` (``first <= last``).

    Returns ``(lo, hi)``: the keys ``[lo, hi)`` that every query of the run sees (a key box
    inside it needs no mask); empty when ``hi <= lo`` (the values are then returned as computed,
    not normalised, exactly as the device policy returns them)::

        >>> tile_intersection(0, 3, 3, 1, 10, False)   # windows [0, 3), [0, 3), [1, 4), [2, 5)
        (2, 3)
        >>> tile_intersection(4, 7, 3, 1, 10, True)    # causal: [2, 5) ... [5, 8): empty
        (5, 5)
    """
    start_first = window_start(first, kernel_size, stride, group_len, is_causal)
    return (window_start(last, kernel_size, stride, group_len, is_causal),
            window_end(first, start_first, kernel_size, is_causal))


def _first_start_at_least(t, kernel_size: int, stride: int, group_len, is_causal: bool):
    """Smallest in-group query ``i`` with ``window_start(i) >= t`` (``group_len`` if none).

    ``window_start`` is a step function of the stride group ``i // s``: not causal it is
    ``clamp(leader - left, 0, Lg - k)`` with ``leader = min(base + s // 2, Lg - 1)``, causal
    ``max(min(base + s - 1, Lg - 1) - (k - 1), 0)`` (``base = (i // s) * s``). For ``t`` above
    the largest start (``Lg - k`` in both cases) no query qualifies; for ``t <= 0`` query 0
    does; otherwise the clamps are inactive and the condition is ``base >= t + shift`` with
    ``shift = left - s // 2`` (causal ``k - s``): the first such query is that threshold rounded
    up to a multiple of ``s``.
    """
    shift = (kernel_size - stride) if is_causal else (window_left(kernel_size) - stride // 2)
    first = -((-(t + shift)) // stride) * stride  # ceil((t + shift) / s) * s
    first = _min(_max(first, 0), group_len)
    none = t > group_len - kernel_size
    if isinstance(none, (bool, np.bool_)):
        return group_len if none else (0 if t <= 0 else first)
    xp = np if _is_np(t, group_len) else _jnp()
    return xp.where(none, group_len, xp.where(t <= 0, 0, first))


def inverse_window(y0, y1, kernel_size: int, stride: int, group_len, is_causal: bool):
    """The in-group queries whose windows meet the in-group keys ``[y0, y1]``: ``(lo, hi)``.

    The queries ``i`` with ``window_end(i) > y0`` and ``window_start(i) <= y1`` (``0 <= y0 <= y1
    < group_len``) form the interval ``[lo, hi)``, since both bounds are non-decreasing in ``i``;
    it is never empty (query ``y0``'s window holds ``y0``). For one key (``y0 == y1``) these are
    the queries that attend to it: what a key-stationary kernel (dK / dV, the unfused IN product)
    visits. Example (``k = 3``, group of 10)::

        >>> inverse_window(0, 0, 3, 1, 10, False)   # key 0 is in the windows of queries 0, 1
        (0, 2)
        >>> inverse_window(5, 5, 3, 1, 10, False)   # key 5: queries 4, 5, 6
        (4, 7)
        >>> inverse_window(5, 5, 3, 1, 10, True)    # causal: queries 5, 6, 7
        (5, 8)
        >>> inverse_window(2, 6, 3, 2, 10, False)   # stride 2, keys 2..6: queries 0..7
        (0, 8)
    """
    if is_causal:  # window_end(i) = i + 1 > y0
        lo = _min(_max(y0, 0), group_len)
    else:  # window_end(i) = window_start(i) + k > y0
        lo = _first_start_at_least(y0 - kernel_size + 1, kernel_size, stride, group_len, False)
    hi = _first_start_at_least(y1 + 1, kernel_size, stride, group_len, is_causal)
    return lo, hi


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


def sample_extent(valid, kernel_size, dilation, extent):
    """The extent a ragged sample is computed on: ``clip(valid, kernel_size * dilation, extent)``.

    Elementwise; ``valid`` is an int or an integer array (NumPy or JAX, traced or not), e.g. the
    ``[B, rank]`` ``valid_extent`` of a call, with ``kernel_size``, ``dilation`` and ``extent``
    (the padded spatial shape) ints or per-axis sequences broadcast against its last axis. The
    result keeps ``valid``'s kind and dtype. Every window then fits in the sample (the smallest
    extent a neighborhood of ``kernel_size`` with ``dilation`` needs) and no sample reaches past
    the padded array. Concrete out-of-range values never get here (``natten_jax.checks`` raises
    ``ValueError`` naming ``valid_extent``); traced ones are clamped by this rule, in every
    backend (the CUDA kernels apply the same clamp to their ``valid_extent`` operand)::

        >>> sample_extent(3, 3, 2, 10), sample_extent(12, 3, 1, 10), sample_extent(7, 3, 1, 10)
        (6, 10, 7)
    """
    if all(isinstance(v, int) for v in (valid, kernel_size, dilation, extent)):
        return min(max(valid, kernel_size * dilation), extent)
    lo = np.asarray(kernel_size) * np.asarray(dilation)
    hi = np.asarray(extent)
    dtype = getattr(valid, "dtype", None)
    if dtype is not None:  # keep valid's integer dtype (no promotion to int64)
        lo, hi = lo.astype(dtype), hi.astype(dtype)
    if _is_np(valid):
        return np.minimum(np.maximum(valid, lo), hi)
    jnp = _jnp()
    return jnp.minimum(jnp.maximum(valid, lo), hi)


def sample_num_extra(lengths, num_extra: int):
    """Additional tokens a ragged sample uses: ``clip(lengths, 0, num_extra)`` (the rule for
    traced ``additional_lengths``; concrete values outside it are refused by the checks)."""
    if isinstance(lengths, int):
        return min(max(lengths, 0), num_extra)
    if _is_np(lengths):
        return np.clip(lengths, 0, num_extra)
    return _jnp().clip(lengths, 0, num_extra)


def used_extra(lengths, num_extra: int):
    """bool ``[B, num_extra]``: which additional tokens each sample of a ragged batch uses (the
    first ``sample_num_extra(lengths[b], num_extra)``); ``lengths`` int ``[B]``, NumPy or JAX."""
    xp = np if _is_np(lengths) else _jnp()
    return np.arange(num_extra)[None, :] < xp.reshape(sample_num_extra(lengths, num_extra),
                                                      (-1, 1))


def valid_tokens(shape: Sequence[int], valid_extent):
    """bool ``[B, *shape]``: which tokens of a ragged batch lie inside their sample's extent
    (``valid_extent`` ``[B, rank]``, NumPy or JAX, possibly traced; already clamped)."""
    xp = np if _is_np(valid_extent) else _jnp()
    rank = len(shape)
    m = None
    for a, L in enumerate(shape):
        bcast = [1] * (1 + rank)
        bcast[1 + a] = L
        inside = (np.arange(L).reshape(bcast)
                  < xp.reshape(valid_extent[:, a], (-1,) + (1,) * rank))
        m = inside if m is None else m & inside
    return xp.broadcast_to(m, (valid_extent.shape[0],) + tuple(shape))


def window_offsets(shape: Sequence[int], kernel_size, stride, dilation, is_causal,
                   valid_extent=None) -> Tuple:
    """Per axis, the global key coordinates of each query's window as an int array [L, k].

    Entry ``[x, j]`` is the ``j``-th neighbor of query ``x`` (``g + d * (start + j)``), and a
    bool array [L, k] says which entries are inside ``[start, end)`` (all of them unless causal).
    Used by the reference backend to gather neighborhoods.

    ``valid_extent``: None, or the per-sample extents ``[B, rank]`` of a ragged batch (an
    integer array, NumPy or JAX, possibly traced, already within :func:`sample_extent`'s
    range). The windows of sample ``b`` are then those of an axis of extent
    ``valid_extent[b, a]``, and each axis's arrays are ``[B, L, k]`` (``L`` the padded extent).
    Queries at ``x >= valid_extent[b, a]`` get some in-sample coordinates (their results are
    discarded); every coordinate is below the sample's extent, so no window reads padding.
    """
    out = []
    for a, (L, k, s, d, c) in enumerate(zip(shape, kernel_size, stride, dilation, is_causal)):
        if valid_extent is None:
            x, ext = np.arange(L), L
        else:
            x, ext = np.arange(L)[None, :], valid_extent[:, a][:, None]  # [1, L], [B, 1]
        start, end = window_bounds(x, k, s, d, ext, c)
        j = start[..., None] + np.arange(k)
        valid = j < end[..., None]
        last = group_extent(ext, d, x % d) - 1
        coord = (x % d)[..., None] + d * _min(j, last[..., None])
        out.append((coord.astype(np.int32), valid))
    return tuple(out)


def prod(xs) -> int:
    return int(math.prod(xs))
