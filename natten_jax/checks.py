"""Argument normalisation and validation, done once before any computation.

Every check of the package's arguments lives here:

* :func:`check_na_call` (``na1d`` / ``na2d`` / ``na3d``) turns int-or-tuple arguments into
  per-axis tuples, validates shapes, dtypes and values, and returns an :class:`NAProblem` that
  every backend consumes (with where the call runs, for the backends' ``can_run``);
* :func:`check_qk_call` / :func:`check_av_call`: the unfused operators ``na*d_qk`` /
  ``na*d_av`` (:mod:`natten_jax.unfused`);
* :func:`check_context_parallel_call`: :func:`natten_jax.context_parallel.na_context_parallel`;
* :func:`check_layer_args` / :func:`check_layer_input`: the Flax layers' constructor arguments
  and inputs (:mod:`natten_jax.nnx`, :mod:`natten_jax.linen`, the models);
  :func:`check_image_extent`: the models' ``valid_extent``;
* :func:`check_ragged` (through :func:`check_na_call`): a ragged batch's ``valid_extent`` and
  ``additional_lengths`` (issue 24).

Each error names the argument and the value it got: ``ValueError`` for bad values and shapes,
``TypeError`` for bad types and dtypes, ``NotImplementedError`` for valid arguments a backend
does not support. What a backend's kernels can run (dtypes, head dims, launch limits, placement)
is its ``can_run`` (:mod:`natten_jax.backends`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from natten_jax import _ffi
from natten_jax import precision as precision_mod
from natten_jax.config import FusedConfig, default_config

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
    # The fused backend's kernels (natten_jax.config); part of the static problem, so jit
    # caches and auto-tuner keys see it. Omitted: default_config().
    config: FusedConfig = dataclasses.field(default_factory=default_config)
    # Where the call runs ("cuda", "cpu", ...: natten_jax._ffi.call_platform of the inputs);
    # the CUDA backends' can_run refuse anything but "cuda". None: the default device's.
    platform: Optional[str] = None
    # Ragged batch (issue 24): `valid_extent` [B, rank] given (per-sample extents), and
    # `additional_lengths` [B] given (per-sample counts of additional tokens). The arrays are
    # runtime operands of the backends' run; only their presence is static.
    ragged: bool = False
    ragged_extra: bool = False
    # The precision mode ("default" or "highest", natten_jax.precision.resolve of the call's
    # `precision` at trace time); changes float32 computation only.
    precision: str = "default"

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
    if p.ragged or p.ragged_extra:
        given = [n for n, f in (("valid_extent", p.ragged),
                                ("additional_lengths", p.ragged_extra)) if f]
        return (f"backend={backend!r} (unfused operators) does not support ragged batches "
                f"({' / '.join(given)}); use backend='fused' or 'reference'")
    if p.dtype not in ("float32", "float16", "bfloat16"):
        return (f"backend={backend!r} supports float32, float16 and bfloat16, got dtype "
                f"{p.dtype}")
    return ""


def check_backend_config(backend_config) -> FusedConfig:
    """``backend_config`` as a :class:`FusedConfig` (None: :func:`default_config`)."""
    if backend_config is None:
        return default_config()
    if not isinstance(backend_config, FusedConfig):
        raise TypeError(f"`backend_config` must be None or a natten_jax.FusedConfig, got "
                        f"{type(backend_config).__name__} {backend_config!r}.")
    return backend_config


def check_na_call(rank: int, query, key, value, kernel_size, stride, dilation, is_causal,
                  scale, additional_keys=None, additional_values=None,
                  backend_config: Optional[FusedConfig] = None, valid_extent=None,
                  additional_lengths=None, precision=None) -> NAProblem:
    """Validate one na{rank}d call and return its static description (``backend_config``:
    the fused backend's configuration, None for :func:`natten_jax.config.default_config`;
    ``valid_extent`` / ``additional_lengths``: a ragged batch, see :func:`check_ragged`;
    ``precision``: resolved by :func:`natten_jax.precision.resolve`)."""
    mode = precision_mod.resolve(precision)
    config = check_backend_config(backend_config)
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

    ks_, st_, di_, ca_ = check_window_args(rank, spatial, kernel_size, stride, dilation,
                                           is_causal)

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
            if not hasattr(x, "shape") or not hasattr(x, "dtype"):
                raise TypeError(f"`{n}` must be an array, got {type(x).__name__}.")
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

    spatial = tuple(int(s) for s in spatial)
    check_ragged(int(qs[0]), spatial, ks_, di_, valid_extent, additional_lengths,
                 None if additional_keys is None else num_extra)

    return NAProblem(rank=rank, spatial=spatial, kernel_size=ks_,
                     stride=st_, dilation=di_, is_causal=ca_, scale=scale, batch=int(qs[0]),
                     heads=int(heads), heads_kv=int(heads_kv), head_dim=int(qs[-1]),
                     head_dim_v=int(vs[-1]), num_extra=num_extra, dtype=str(query.dtype),
                     config=config, platform=_ffi.call_platform(query, key, value),
                     ragged=valid_extent is not None,
                     ragged_extra=additional_lengths is not None, precision=mode)


def is_concrete(x) -> bool:
    """Whether ``x``'s values are known now: NumPy arrays, Python sequences and committed JAX
    arrays are; a tracer (under ``jit``, ``vmap``, ``grad``, ...) is not."""
    return not isinstance(x, jax.core.Tracer)


def _int_array(name: str, x):
    """``x`` as an array with an integer dtype (Python sequences through NumPy)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        if not isinstance(x, (list, tuple)):
            raise TypeError(f"`{name}` must be an integer array, got {type(x).__name__} {x!r}.")
        try:
            x = np.asarray(x)
        except ValueError as e:
            raise ValueError(f"`{name}` must be a rectangular integer array, got {x!r}: {e}"
                             ) from None
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"`{name}` must have an integer dtype (it is converted to int32), got "
                        f"dtype {x.dtype}.")
    return x


def check_ragged(batch: int, spatial, kernel_size, dilation, valid_extent, additional_lengths,
                 num_extra: Optional[int]) -> None:
    """Validate the ragged-batch arguments of one na*d call (issue 24).

    ``valid_extent``: None or integer ``[batch, rank]``; concrete values must satisfy
    ``kernel_size[a] * dilation[a] <= valid_extent[b, a] <= spatial[a]``.
    ``additional_lengths``: None or integer ``[batch]``, only with additional keys
    (``num_extra``: their count, None without them); concrete values in ``[0, num_extra]``.
    Traced values are not checked here: the backends clamp them
    (:func:`natten_jax.window.sample_extent`, :func:`natten_jax.window.sample_num_extra`).
    """
    rank = len(spatial)
    if valid_extent is not None:
        ve = _int_array("valid_extent", valid_extent)
        if tuple(ve.shape) != (batch, rank):
            raise ValueError(
                f"`valid_extent` must have shape [batch, rank] = {(batch, rank)}, got "
                f"{tuple(ve.shape)}.")
        if is_concrete(ve):
            e = np.asarray(ve).astype(np.int64)
            lo = np.asarray(kernel_size, np.int64) * np.asarray(dilation, np.int64)
            hi = np.asarray(spatial, np.int64)
            bad = np.argwhere((e < lo) | (e > hi))
            if bad.size:
                b, a = (int(i) for i in bad[0])
                raise ValueError(
                    f"`valid_extent` must satisfy kernel_size * dilation <= valid_extent[b, a] "
                    f"<= spatial extent on every axis, got valid_extent[{b}, {a}] = {e[b, a]} "
                    f"(kernel_size * dilation = {int(lo[a])}, extent {int(hi[a])}; "
                    f"{len(bad)} bad entries in all).")
    if additional_lengths is not None:
        if num_extra is None:
            raise ValueError("`additional_lengths` needs `additional_keys` / "
                             "`additional_values` (it counts the additional tokens each sample "
                             "uses).")
        al = _int_array("additional_lengths", additional_lengths)
        if tuple(al.shape) != (batch,):
            raise ValueError(f"`additional_lengths` must have shape [batch] = {(batch,)}, got "
                             f"{tuple(al.shape)}.")
        if is_concrete(al):
            n = np.asarray(al).astype(np.int64)
            bad = np.flatnonzero((n < 0) | (n > num_extra))
            if bad.size:
                b = int(bad[0])
                raise ValueError(
                    f"`additional_lengths` must lie in [0, {num_extra}] (the number of "
                    f"additional tokens), got additional_lengths[{b}] = {n[b]}.")


# ---------------------------------------------------------------------------------------------
# The unfused operators na*d_qk / na*d_av (natten_jax.unfused).


@dataclasses.dataclass(frozen=True)
class UnfusedCall:
    """Normalised arguments of one ``na{rank}d_qk`` / ``na{rank}d_av`` call."""

    rank: int
    batch: int
    spatial: Tuple[int, ...]
    heads: int  # of query / attn
    heads_kv: int  # of key / value
    dim: int  # head dim of query and key (qk) or of value (av)
    kernel_size: Tuple[int, ...]
    dilation: Tuple[int, ...]
    is_causal: Tuple[bool, ...]

    @property
    def window(self) -> int:
        return int(np.prod(self.kernel_size))


def _check_unfused_array(op: str, name: str, x, rank: int, layout: str) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{op}: `{name}` must be an array, got {type(x).__name__}.")
    if x.ndim != rank + 3:
        raise ValueError(
            f"{op} expects `{name}` of rank {rank + 3} ({layout}), got shape {tuple(x.shape)}.")
    if not any(x.dtype == d for d in FLOAT_DTYPES):
        raise TypeError(
            f"{op}: `{name}` must be float16, bfloat16, float32 or float64, got dtype {x.dtype}.")
    if any(s < 1 for s in x.shape):
        raise ValueError(f"{op}: empty dimensions are not supported, got `{name}` shape "
                         f"{tuple(x.shape)}.")


def check_window_args(rank: int, spatial, kernel_size, stride, dilation, is_causal,
                      op: str = ""):
    """Per-axis ``kernel_size``, ``stride`` (the unfused operators pass 1), ``dilation`` and
    ``is_causal``, checked against the spatial extents (``op``: the operator named in the
    errors)."""
    pre = f"{op}: " if op else ""
    ks = per_axis_ints("kernel_size", kernel_size, rank, 1)
    st = per_axis_ints("stride", stride, rank, 1)
    di = per_axis_ints("dilation", dilation, rank, 1)
    ca = per_axis_bools("is_causal", is_causal, rank)
    for a in range(rank):
        if ks[a] * di[a] > spatial[a]:
            raise ValueError(
                f"{pre}`kernel_size` * `dilation` must not exceed the extent on every axis, got "
                f"kernel_size={ks}, dilation={di} for spatial shape {tuple(spatial)}.")
        if st[a] > ks[a]:
            raise ValueError(
                f"{pre}`stride` must not exceed `kernel_size` on any axis, got stride={st}, "
                f"kernel_size={ks}.")
    return ks, st, di, ca


def _check_unfused_heads(op: str, a_name: str, heads: int, b_name: str, heads_kv: int) -> None:
    if heads % heads_kv != 0:
        raise ValueError(
            f"{op}: `{b_name}` heads ({heads_kv}) must divide `{a_name}` heads ({heads}) for "
            f"grouped-query attention.")


def _check_rpb(op: str, rpb, heads: int, ks, ca) -> None:
    if not hasattr(rpb, "shape") or not hasattr(rpb, "dtype"):
        raise TypeError(f"{op}: `rpb` must be an array or None, got {type(rpb).__name__}.")
    if any(ca):
        raise NotImplementedError(
            f"{op}: relative positional bias (`rpb`) is not supported with causal masking "
            f"(is_causal={ca}), as in NATTEN.")
    if any(k % 2 == 0 for k in ks):
        raise ValueError(
            f"{op}: relative positional bias (`rpb`) needs an odd `kernel_size` on every axis "
            f"(NATTEN defines RPB for odd kernels only), got kernel_size={ks}.")
    want = (heads,) + tuple(2 * k - 1 for k in ks)
    if tuple(rpb.shape) != want:
        raise ValueError(
            f"{op}: `rpb` must have shape [heads, 2 * kernel_size - 1 per axis] = {want}, got "
            f"{tuple(rpb.shape)}.")
    if not any(rpb.dtype == d for d in FLOAT_DTYPES):
        raise TypeError(
            f"{op}: `rpb` must be float16, bfloat16, float32 or float64, got dtype {rpb.dtype}.")


def check_qk_call(rank: int, query, key, kernel_size, dilation, is_causal, rpb,
                  backend) -> UnfusedCall:
    """Validate one ``na{rank}d_qk`` call (query ``[B, *S, H, D]``, key ``[B, *S, Hkv, D]``,
    optional ``rpb [H, 2k-1 per axis]``)."""
    op = f"na{rank}d_qk"
    check_unfused_backend(op, backend)
    layout = f"[batch, *{rank} spatial, heads, head_dim]"
    _check_unfused_array(op, "query", query, rank, layout)
    _check_unfused_array(op, "key", key, rank, layout)
    if query.dtype != key.dtype:
        raise TypeError(f"{op}: `query` and `key` must share a dtype, got {query.dtype} and "
                        f"{key.dtype}.")
    qs, kss = tuple(query.shape), tuple(key.shape)
    if qs[0] != kss[0] or qs[1:-2] != kss[1:-2]:
        raise ValueError(f"{op}: `query` {qs} and `key` {kss} must match in batch and spatial "
                         f"shape.")
    if qs[-1] != kss[-1]:
        raise ValueError(f"{op}: `key` head_dim {kss[-1]} must equal `query` head_dim "
                         f"{qs[-1]}.")
    _check_unfused_heads(op, "query", qs[-2], "key", kss[-2])
    ks, _, di, ca = check_window_args(rank, qs[1:-2], kernel_size, 1, dilation, is_causal,
                                      op)
    if rpb is not None:
        _check_rpb(op, rpb, qs[-2], ks, ca)
    return UnfusedCall(rank=rank, batch=qs[0], spatial=qs[1:-2], heads=qs[-2], heads_kv=kss[-2],
                       dim=qs[-1], kernel_size=ks, dilation=di, is_causal=ca)


def check_av_call(rank: int, attn, value, kernel_size, dilation, is_causal,
                  backend) -> UnfusedCall:
    """Validate one ``na{rank}d_av`` call (attn ``[B, *S, H, prod(kernel_size)]``, value
    ``[B, *S, Hkv, Dv]``)."""
    op = f"na{rank}d_av"
    check_unfused_backend(op, backend)
    _check_unfused_array(op, "attn", attn, rank,
                         f"[batch, *{rank} spatial, heads, prod(kernel_size)]")
    _check_unfused_array(op, "value", value, rank, f"[batch, *{rank} spatial, heads, head_dim]")
    as_, vs = tuple(attn.shape), tuple(value.shape)
    if as_[0] != vs[0] or as_[1:-2] != vs[1:-2]:
        raise ValueError(f"{op}: `attn` {as_} and `value` {vs} must match in batch and spatial "
                         f"shape.")
    _check_unfused_heads(op, "attn", as_[-2], "value", vs[-2])
    ks, _, di, ca = check_window_args(rank, as_[1:-2], kernel_size, 1, dilation, is_causal,
                                      op)
    W = int(np.prod(ks))
    if as_[-1] != W:
        raise ValueError(
            f"{op}: the last axis of `attn` must be prod(kernel_size) = {W} for kernel_size="
            f"{ks}, got {as_[-1]} (attn shape {as_}).")
    return UnfusedCall(rank=rank, batch=as_[0], spatial=as_[1:-2], heads=as_[-2],
                       heads_kv=vs[-2], dim=vs[-1], kernel_size=ks, dilation=di, is_causal=ca)


# ---------------------------------------------------------------------------------------------
# Context parallelism (natten_jax.context_parallel).


def check_context_parallel_call(query, key, value, kernel_size, stride, dilation, is_causal,
                                scale, mesh, axis_name, precision=None,
                                valid_extent=None) -> NAProblem:
    """Validate one ``na_context_parallel`` call: the mesh and its axis, then the usual
    ``na{rank}d`` checks (rank from ``query.ndim - 3``; ``precision`` and ``valid_extent`` as
    there), then that the axis's size divides the first spatial extent."""
    from jax.sharding import Mesh

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
    p = check_na_call(query.ndim - 3, query, key, value, kernel_size, stride, dilation,
                      is_causal, scale, valid_extent=valid_extent, precision=precision)
    n = int(mesh.shape[axis_name])
    if p.spatial[0] % n != 0:
        raise ValueError(
            f"the first spatial extent ({p.spatial[0]}) must be divisible by the size of mesh "
            f"axis {axis_name!r} ({n}) for context parallelism.")
    return p


# ---------------------------------------------------------------------------------------------
# Flax layers (natten_jax.nnx, natten_jax.linen, natten_jax.models).


def _positive_int(name: str, value) -> int:
    if not _is_int(value):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}.")
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {value!r}.")
    return int(value)


def check_layer_args(rank, embed_dim, num_heads, kernel_size, dilation, stride, is_causal,
                     num_kv_heads, qk_scale, proj_drop, backend, backend_config=None,
                     precision=None):
    """Validate (and normalise) the constructor arguments shared by the NNX and Linen layers.

    Returns ``(num_kv_heads, kernel_size, dilation, stride, is_causal)`` with per-axis tuples.
    Extent-dependent limits (``kernel_size * dilation`` against the input) are checked when the
    layer is called, by :func:`check_na_call`.
    """
    import numbers

    if rank not in (1, 2, 3):
        raise ValueError(f"`rank` must be 1, 2 or 3, got {rank!r}.")
    embed_dim = _positive_int("embed_dim", embed_dim)
    num_heads = _positive_int("num_heads", num_heads)
    if embed_dim % num_heads != 0:
        raise ValueError(
            f"`embed_dim` ({embed_dim}) must be divisible by `num_heads` ({num_heads}).")
    if num_kv_heads is None:
        num_kv_heads = num_heads
    num_kv_heads = _positive_int("num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads != 0:
        raise ValueError(
            f"`num_kv_heads` ({num_kv_heads}) must divide `num_heads` ({num_heads}).")
    kernel_size = per_axis_ints("kernel_size", kernel_size, rank, 1)
    dilation = per_axis_ints("dilation", dilation, rank, 1)
    stride = per_axis_ints("stride", stride, rank, 1)
    if any(s > k for s, k in zip(stride, kernel_size)):
        raise ValueError(
            f"`stride` must not exceed `kernel_size` on any axis, got stride={stride}, "
            f"kernel_size={kernel_size}.")
    is_causal = per_axis_bools("is_causal", is_causal, rank)
    if qk_scale is not None:
        if isinstance(qk_scale, (bool, np.bool_)) or not isinstance(qk_scale, numbers.Real):
            raise TypeError(f"`qk_scale` must be a float or None, got {qk_scale!r}.")
        if not qk_scale > 0:
            raise ValueError(f"`qk_scale` must be > 0, got {qk_scale!r}.")
    if isinstance(proj_drop, (bool, np.bool_)) or not isinstance(proj_drop, numbers.Real):
        raise TypeError(f"`proj_drop` must be a float, got {proj_drop!r}.")
    if not 0.0 <= proj_drop <= 1.0:
        raise ValueError(f"`proj_drop` must be in [0, 1], got {proj_drop!r}.")
    check_backend(backend)
    check_backend_config(backend_config)
    if precision is not None:  # None follows jax.default_matmul_precision at call time
        precision_mod.resolve(precision)
    return num_kv_heads, kernel_size, dilation, stride, is_causal


def check_image_extent(cls_name: str, x, valid_extent):
    """The ``valid_extent`` (pixel extents ``[batch, 2]`` of each image of a padded NHWC batch
    ``x``) of a model call: an integer array of that shape, concrete values in ``[1, H]`` /
    ``[1, W]``. Returns it as NumPy int32 when concrete, else as a JAX int32 array clamped
    into those ranges."""
    ve = _int_array("valid_extent", valid_extent)
    want = (int(x.shape[0]), 2)
    if tuple(ve.shape) != want:
        raise ValueError(f"{cls_name}: `valid_extent` must have shape [batch, 2] = {want} (the "
                         f"height and width of each image), got {tuple(ve.shape)}.")
    hi = np.asarray(x.shape[1:3], np.int64)
    if not is_concrete(ve):
        return jnp.clip(jnp.asarray(ve).astype(jnp.int32), 1, hi.astype(np.int32))
    e = np.asarray(ve).astype(np.int64)
    bad = np.argwhere((e < 1) | (e > hi))
    if bad.size:
        b, a = (int(i) for i in bad[0])
        raise ValueError(f"{cls_name}: `valid_extent` must lie in [1, {int(hi[a])}] on axis "
                         f"{a} (input shape {tuple(x.shape)}), got valid_extent[{b}, {a}] = "
                         f"{e[b, a]}.")
    return e.astype(np.int32)


def check_layer_input(cls_name: str, rank: int, embed_dim: int, x) -> None:
    """Raise ``ValueError`` unless ``x`` is ``[batch, *rank spatial, embed_dim]`` (``TypeError``
    if it is no array)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{cls_name} expects an array input, got {type(x).__name__}.")
    shape = tuple(x.shape)
    if len(shape) != rank + 2:
        raise ValueError(
            f"{cls_name} expects input of rank {rank + 2} ([batch, *{rank} spatial axes, "
            f"embed_dim]), got shape {shape}.")
    if shape[-1] != embed_dim:
        raise ValueError(
            f"{cls_name} expects the last input axis to be embed_dim={embed_dim}, got shape "
            f"{shape}.")
