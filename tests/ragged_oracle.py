"""Float64 oracle for ragged batches (issue 24): crop each sample, run it alone, pad back.

A ragged call ``na{rank}d(q, k, v, ..., valid_extent=E, additional_lengths=N)`` must equal, per
sample ``b``, neighborhood attention on the sample cropped to its extent ``E[b]`` (its own
windows, stride groups and dilation groups) with its first ``N[b]`` additional tokens, and zeros
(output) / 0.0 (logsumexp) outside the extent. :func:`crop_oracle` computes exactly that with
the reference backend on each cropped sample in float64: a definition by cropping that shares
no ragged code with the backends under test. Crop sizes are static (``valid_extent`` and
``additional_lengths`` are concrete NumPy), so the oracle is differentiable in q, k, v and the
additional tokens with ``jax.vjp``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import natten_jax


def _na(rank: int):
    return {1: natten_jax.na1d, 2: natten_jax.na2d, 3: natten_jax.na3d}[rank]


def valid_mask(spatial, valid_extent) -> np.ndarray:
    """bool ``[B, *spatial]``: True at the tokens inside each sample's extent."""
    ext = np.asarray(valid_extent)
    spatial = tuple(int(s) for s in spatial)
    assert ext.ndim == 2 and ext.shape[1] == len(spatial), (ext.shape, spatial)
    m = np.ones((ext.shape[0],) + spatial, bool)
    for a, L in enumerate(spatial):
        shape = [1] * (1 + len(spatial))
        shape[1 + a] = L
        m &= (np.arange(L).reshape(shape) < ext[:, a].reshape((-1,) + (1,) * len(spatial)))
    return m


def poison_padding(x, valid_extent, value=np.nan):
    """``x`` ``[B, *S, ...]`` with every token outside its sample's extent set to ``value``."""
    rank = np.asarray(valid_extent).shape[1]
    m = valid_mask(x.shape[1:1 + rank], valid_extent)
    m = m.reshape(m.shape + (1,) * (x.ndim - 1 - rank))
    if isinstance(x, np.ndarray):
        return np.where(m, x, np.asarray(value, x.dtype))
    return jnp.where(m, x, jnp.asarray(value, x.dtype))


def crop_oracle(rank: int, q, k, v, valid_extent, *, additional_keys=None,
                additional_values=None, additional_lengths=None, **na_kwargs):
    """Per sample: crop, run ``na{rank}d(..., backend="reference")`` in float64, pad, stack.

    ``valid_extent`` ``[B, rank]`` and ``additional_lengths`` ``[B]`` (optional) are concrete.
    ``valid_extent=None`` means full extents (useful for additional_lengths alone).
    ``na_kwargs``: kernel_size, stride, dilation, is_causal, scale. Returns ``(out [B, *S, H,
    Dv], lse [B, *S, H])`` float64, zeros / 0.0 outside each sample's extent.
    """
    q, k, v = (jnp.asarray(x, jnp.float64) for x in (q, k, v))
    B, spatial = q.shape[0], tuple(q.shape[1:1 + rank])
    if valid_extent is None:
        ext = np.tile(np.asarray(spatial, np.int64), (B, 1))
    else:
        ext = np.asarray(valid_extent).astype(np.int64)
    assert ext.shape == (B, rank), (ext.shape, B, rank)
    if additional_keys is not None:
        ek = jnp.asarray(additional_keys, jnp.float64)
        ev = jnp.asarray(additional_values, jnp.float64)
        n = ek.shape[1]
        lens = (np.full(B, n, np.int64) if additional_lengths is None
                else np.asarray(additional_lengths).astype(np.int64))
        assert lens.shape == (B,), lens.shape
    else:
        assert additional_lengths is None, "additional_lengths needs additional_keys"
    key = (rank, tuple(map(tuple, ext.tolist())),
           None if additional_keys is None else tuple(lens.tolist()),
           tuple(sorted((n, _hashable(x)) for n, x in na_kwargs.items())))
    extra = () if additional_keys is None else (ek, ev)
    return _jitted_oracle(key)(q, k, v, *extra)


def _hashable(x):
    return tuple(_hashable(v) for v in x) if isinstance(x, (list, tuple, np.ndarray)) else x


@functools.lru_cache(maxsize=256)
def _jitted_oracle(key):
    """One jitted function per (rank, extents, lengths, window arguments): a single compile
    for all samples instead of op-by-op dispatch on every crop shape (much faster on CPU)."""
    rank, ext, lens, kw = key
    return jax.jit(functools.partial(_crop_and_run, rank, np.asarray(ext),
                                     None if lens is None else np.asarray(lens), dict(kw)))


def _crop_and_run(rank, ext, lens, na_kwargs, q, k, v, ek=None, ev=None):
    B, spatial = q.shape[0], tuple(q.shape[1:1 + rank])
    fn = _na(rank)
    outs, lses = [], []
    for b in range(B):
        crop = (slice(b, b + 1),) + tuple(slice(0, int(e)) for e in ext[b])
        extra = {}
        if ek is not None and lens[b] > 0:
            extra = dict(additional_keys=ek[b:b + 1, :int(lens[b])],
                         additional_values=ev[b:b + 1, :int(lens[b])])
        o, l = fn(q[crop], k[crop], v[crop], backend="reference", return_lse=True, **extra,
                  **na_kwargs)
        pad = [(0, 0)] + [(0, L - int(e)) for L, e in zip(spatial, ext[b])]
        outs.append(jnp.pad(o.astype(jnp.float64), pad + [(0, 0), (0, 0)]))
        lses.append(jnp.pad(l.astype(jnp.float64), pad + [(0, 0)]))
    return jnp.concatenate(outs, axis=0), jnp.concatenate(lses, axis=0)


def random_extents(rng: np.random.Generator, batch: int, spatial, kernel_size, dilation=1):
    """Random concrete extents ``[B, rank]`` int32 in ``[k * d, spatial]`` per axis, with sample
    0 at full extent (the mix a ragged batch has)."""
    rank = len(spatial)
    ks = kernel_size if isinstance(kernel_size, (tuple, list)) else (kernel_size,) * rank
    di = dilation if isinstance(dilation, (tuple, list)) else (dilation,) * rank
    lo = np.asarray([k * d for k, d in zip(ks, di)])
    hi = np.asarray(spatial)
    ext = rng.integers(lo, hi + 1, size=(batch, rank))
    ext[0] = hi
    return ext.astype(np.int32)


def _check():
    """Self-check: full extents give the plain call."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 7, 2, 4))
    o, l = crop_oracle(1, q, q, q, np.array([[7], [7]]), kernel_size=3)
    r, rl = natten_jax.na1d(jnp.asarray(q), jnp.asarray(q), jnp.asarray(q), 3,
                            backend="reference", return_lse=True)
    np.testing.assert_allclose(o, r)
    np.testing.assert_allclose(l, rl)


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    _check()
    print("ok")
