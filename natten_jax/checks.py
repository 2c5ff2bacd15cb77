"""Argument normalisation and validation, done once before any computation.

``check_na_call`` turns int-or-tuple arguments into per-axis tuples, validates shapes, dtypes
and values, and returns an :class:`NAProblem` that every backend consumes. Each error names the
argument and the value it got: ``ValueError`` for bad values and shapes, ``TypeError`` for bad
types and dtypes.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax.numpy as jnp
import numpy as np

BACKENDS = ("reference", "fused", "gemm", "naive")
# Backends of the unfused operators na*d_qk / na*d_av (and of na*d's "gemm" / "naive"): the
# pure-JAX reference and the unfused CUDA kernels (GEMM-based or naive).
UNFUSED_BACKENDS = ("reference", "gemm", "naive")
FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


@dataclasses.dataclass(frozen=True)
class NAProblem:
    """Static description of one neighborhood-attention call (hashable, jit-static)."""

    rank: int
    spatial: Tuple[int, ...]
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    is_causal: Tuple[bool, ...]
    scale: float
    batch: int
    heads: int
    heads_kv: int
    head_dim: int
    head_dim_v: int
    num_extra: int  # additional (dense) key/value tokens; 0 if none
    dtype: str

    @property
    def num_tokens(self) -> int:
        return int(np.prod(self.spatial))

    @property
    def window(self) -> int:
        return int(np.prod(self.kernel_size))


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def per_axis_ints(name: str, value, rank: int, minimum: int) -> Tuple[int, ...]:
    """Normalise an int or a length-``rank`` sequence of ints, each >= ``minimum``."""
    if _is_int(value):
        out = (int(value),) * rank
    elif isinstance(value, (tuple, list)):
        if len(value) != rank:
            raise ValueError(
                f"`{name}` must be an int or a tuple of {rank} ints (one per spatial axis), "
                f"got {value!r} of length {len(value)}.")
        if not all(_is_int(v) for v in value):
            raise TypeError(f"`{name}` must hold ints, got {value!r}.")
        out = tuple(int(v) for v in value)
    else:
        raise TypeError(
            f"`{name}` must be an int or a tuple of {rank} ints, got {type(value).__name__} "
            f"{value!r}.")
    if any(v < minimum for v in out):
        raise ValueError(f"`{name}` must be >= {minimum} on every axis, got {value!r}.")
    return out


def per_axis_bools(name: str, value, rank: int) -> Tuple[bool, ...]:
    """Normalise a bool or a length-``rank`` sequence of bools."""
    if isinstance(value, (bool, np.bool_)):
        return (bool(value),) * rank
    if isinstance(value, (tuple, list)):
        if len(value) != rank:
            raise ValueError(
                f"`{name}` must be a bool or a tuple of {rank} bools, got {value!r} of length "
                f"{len(value)}.")
        if not all(isinstance(v, (bool, np.bool_)) for v in value):
            raise TypeError(f"`{name}` must hold bools, got {value!r}.")
        return tuple(bool(v) for v in value)
    raise TypeError(f"`{name}` must be a bool or a tuple of {rank} bools, got {value!r}.")


def _check_dtype(name: str, x) -> None:
    if not any(x.dtype == d for d in FLOAT_DTYPES):
        raise TypeError(
            f"`{name}` must be float16, bfloat16, float32 or float64, got dtype {x.dtype}.")


def check_backend(backend: Optional[str]) -> Optional[str]:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"`backend` must be None or one of {BACKENDS}, got {backend!r}.")
    return backend


def check_unfused_backend(op: str, backend: Optional[str]) -> Optional[str]:
    """The ``backend`` of an unfused operator (``na*d_qk`` / ``na*d_av``)."""
    if backend is not None and backend not in UNFUSED_BACKENDS:
        raise ValueError(
            f"{op}: `backend` must be None or one of {UNFUSED_BACKENDS}, got {backend!r}.")
    return backend


def unfused_attention_unsupported(p: NAProblem, backend: str) -> str:
    """Why na*d(..., backend="gemm" / "naive") (softmax over the unfused operators) cannot run
    problem ``p`` ("" if it can, kernel availability aside)."""
    if any(s != 1 for s in p.stride):
        return (f"backend={backend!r} (unfused operators) supports stride 1 only, got "
                f"stride={p.stride}; use backend='fused' or 'reference'")
    if p.num_extra:
        return (f"backend={backend!r} (unfused operators) does not support additional_keys / "
                f"additional_values; use backend='fused' or 'reference'")
    if p.dtype not in ("float32", "float16", "bfloat16"):
        return (f"backend={backend!r} supports float32, float16 and bfloat16, got dtype "
                f"{p.dtype}")
    return ""


def check_na_call(rank: int, query, key, value, kernel_size, stride, dilation, is_causal,
                  scale, additional_keys=None, additional_values=None) -> NAProblem:
    """Validate one na{rank}d call and return its static description."""
    names = ("query", "key", "value")
    for n, x in zip(names, (query, key, value)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"`{n}` must be an array, got {type(x).__name__}.")
        if x.ndim != rank + 3:
            raise ValueError(
                f"na{rank}d expects `{n}` of rank {rank + 3} ([batch, *{rank} spatial, heads, "
                f"head_dim]), got shape {tuple(x.shape)}.")
        _check_dtype(n, x)
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"`query`, `key` and `value` must share a dtype, got {query.dtype}, {key.dtype}, "
            f"{value.dtype}.")
    qs, ks, vs = tuple(query.shape), tuple(key.shape), tuple(value.shape)
    if not (qs[0] == ks[0] == vs[0]):
        raise ValueError(f"batch sizes differ: query {qs}, key {ks}, value {vs}.")
    if not (qs[1:-2] == ks[1:-2] == vs[1:-2]):
        raise ValueError(
            f"spatial shapes differ: query {qs[1:-2]}, key {ks[1:-2]}, value {vs[1:-2]}.")
    if ks[-1] != qs[-1]:
        raise ValueError(f"`key` head_dim {ks[-1]} must equal `query` head_dim {qs[-1]}.")
    if ks[-2] != vs[-2]:
        raise ValueError(f"`key` and `value` must have the same heads, got {ks[-2]} and {vs[-2]}.")
    heads, heads_kv = qs[-2], ks[-2]
    if heads_kv < 1 or heads % heads_kv != 0:
        raise ValueError(
            f"key/value heads ({heads_kv}) must divide query heads ({heads}) for grouped-query "
            f"attention.")
    spatial = qs[1:-2]
    if any(s < 1 for s in spatial) or qs[-1] < 1 or vs[-1] < 1 or qs[0] < 1 or heads < 1:
        raise ValueError(f"empty dimensions are not supported, got query {qs}, value {vs}.")

    ks_ = per_axis_ints("kernel_size", kernel_size, rank, 1)
    st_ = per_axis_ints("stride", stride, rank, 1)
    di_ = per_axis_ints("dilation", dilation, rank, 1)
    ca_ = per_axis_bools("is_causal", is_causal, rank)
    for a in range(rank):
        if ks_[a] * di_[a] > spatial[a]:
            raise ValueError(
                f"`kernel_size` * `dilation` must not exceed the extent on every axis, got "
                f"kernel_size={ks_}, dilation={di_} for spatial shape {spatial}.")
        if st_[a] > ks_[a]:
            raise ValueError(
                f"`stride` must not exceed `kernel_size` on any axis, got stride={st_}, "
                f"kernel_size={ks_}.")

    if scale is None:
        scale = float(qs[-1]) ** -0.5
    elif isinstance(scale, (int, float, np.floating, np.integer)) and not isinstance(scale, bool):
        scale = float(scale)
    else:
        raise TypeError(f"`scale` must be a Python float or None, got {type(scale).__name__}.")

    num_extra = 0
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("`additional_keys` and `additional_values` must be given together.")
    if additional_keys is not None:
        ak, av = additional_keys, additional_values
        for n, x in (("additional_keys", ak), ("additional_values", av)):
            if x.ndim != 4:
                raise ValueError(f"`{n}` must be [batch, tokens, heads_kv, head_dim], got shape "
                                 f"{tuple(x.shape)}.")
            if x.dtype != query.dtype:
                raise TypeError(f"`{n}` dtype {x.dtype} must equal query dtype {query.dtype}.")
        want_k = (qs[0], ak.shape[1], heads_kv, qs[-1])
        want_v = (qs[0], ak.shape[1], heads_kv, vs[-1])
        if tuple(ak.shape) != want_k:
            raise ValueError(f"`additional_keys` must have shape {want_k}, got {tuple(ak.shape)}.")
        if tuple(av.shape) != want_v:
            raise ValueError(
                f"`additional_values` must have shape {want_v}, got {tuple(av.shape)}.")
        num_extra = int(ak.shape[1])

    return NAProblem(rank=rank, spatial=tuple(int(s) for s in spatial), kernel_size=ks_,
                     stride=st_, dilation=di_, is_causal=ca_, scale=scale, batch=int(qs[0]),
                     heads=int(heads), heads_kv=int(heads_kv), head_dim=int(qs[-1]),
                     head_dim_v=int(vs[-1]), num_extra=num_extra, dtype=str(query.dtype))
