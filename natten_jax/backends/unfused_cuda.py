"""The unfused CUDA operators (``src/cuda/unfused``) through XLA FFI custom calls.

Four operators, each ``impl="gemm"`` (space-aware tiles on tensor cores; fp32 on FFMA) or
``impl="naive"`` (one thread per output element), on ``[B, *S, heads, features]`` operands of one
dtype (float32, float16, bfloat16; fp32 accumulation):

* :func:`pn` (pointwise-neighborhood): ``out[.., x, h, j] = scale * a[x, h] . bm[key(x, j),
  h // G]`` (+ ``rpb``), ``fill`` where ``j`` is no neighbor (causal) -> ``[B, *S, H, W]``;
* :func:`nn` (neighborhood-neighborhood): ``out[.., x, h] = scale * sum_j w[x, h, j] *
  bm[key(x, j), h // G]`` -> ``[B, *S, H, C]``;
* :func:`inverse` (inverse-neighborhood): ``out[.., y, hk] = scale * sum over the G heads h of
  hk and the queries x whose window holds y of w[x, h, j(x, y)] * bm[x, h]`` ->
  ``[B, *S, Hkv, C]``;
* :func:`rpb_grad`: ``d_rpb[h, r] = sum of w over the (query, neighbor) pairs at relative
  position r`` -> ``[H, 2k-1 per axis]`` float32.

``W = prod(kernel_size)``, ``G = H // Hkv``; neighbor order and RPB indexing are those of
:mod:`natten_jax.unfused`. The autodiff rules live in :mod:`natten_jax.unfused`; this module
issues the calls (a vmapped call folds the mapped axis into the batch).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from natten_jax import _ffi

TARGET_PN = "natten_jax_unfused_pn"
TARGET_NN = "natten_jax_unfused_nn"
TARGET_IN = "natten_jax_unfused_in"
TARGET_RPB_GRAD = "natten_jax_unfused_rpb_grad"
IMPLS = {"naive": 0, "gemm": 1}
DTYPES = ("float32", "float16", "bfloat16")
RPB_CHUNK_TOKENS = 64  # unfused_params.h: kRpbChunkTokens

# Tests set this: every custom call fills its output with NaN before its kernel runs, so an
# element a kernel fails to write cannot pass as a stale correct value.
POISON_OUTPUTS = False


def can_run(dtype) -> tuple:
    """(True, "") if the unfused CUDA kernels can run inputs of ``dtype`` here, else (False,
    the reason)."""
    if not _ffi.cuda_kernels_available():
        return False, _ffi.unavailable_reason()
    missing = [t for t in (TARGET_PN, TARGET_NN, TARGET_IN, TARGET_RPB_GRAD)
               if t not in _ffi.registrations()]
    if missing:
        return False, f"natten_jax._C lacks the unfused targets {missing} (rebuild it)"
    if str(jnp.dtype(dtype)) not in DTYPES:
        return False, f"dtype {jnp.dtype(dtype)} is not supported (float32, float16, bfloat16)"
    return True, ""


def _window_attrs(kernel_size, dilation, is_causal):
    i64 = lambda x: np.asarray(x, np.int64)  # noqa: E731
    return dict(kernel_size=i64(kernel_size), dilation=i64(dilation),
                is_causal=i64([int(bool(c)) for c in is_causal]))


def _impl(impl: str) -> np.int64:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {tuple(IMPLS)}, got {impl!r}")
    return np.int64(IMPLS[impl])


def _batched_call(target, out_types, attrs, n_batched):
    """``ffi_call`` of ``target`` whose first ``n_batched`` operands and all results lead with
    the batch axis (the others are broadcast); vmap folds the mapped axis into the batch."""

    def raw(*xs):
        _ffi.register()
        return jax.ffi.ffi_call(target, out_types(*xs))(*xs, **attrs)

    @jax.custom_batching.custom_vmap
    def call(*xs):
        return raw(*xs)

    @call.def_vmap
    def _vmap(axis_size, in_batched, *xs):
        if any(in_batched[n_batched:]):  # a batched broadcast operand: one call per entry
            outs = jax.lax.map(lambda ys: call(*ys), tuple(
                x if b else jnp.broadcast_to(x, (axis_size,) + x.shape)
                for x, b in zip(xs, in_batched)))
            return outs, jax.tree.map(lambda _: True, outs)
        xs = list(xs)
        for i in range(n_batched):
            x = xs[i] if in_batched[i] else jnp.broadcast_to(xs[i], (axis_size,) + xs[i].shape)
            xs[i] = x.reshape((axis_size * x.shape[1],) + x.shape[2:])
        outs = call(*xs)
        if not isinstance(outs, (tuple, list)):
            return outs.reshape((axis_size, -1) + outs.shape[1:]), True
        outs = tuple(o.reshape((axis_size, -1) + o.shape[1:]) for o in outs)
        return outs, tuple(True for _ in outs)

    return call


def pn(a, bm, kernel_size, dilation, is_causal, rpb=None, *, scale=1.0, fill=-np.inf,
       impl="gemm"):
    """Neighborhood logits ``[B, *S, H, W]`` in ``a``'s dtype (see the module docstring).

    ``rpb``: None or float32 ``[H, 2k-1 per axis]`` (odd kernels, not causal)."""
    W = math.prod(kernel_size)
    attrs = dict(_window_attrs(kernel_size, dilation, is_causal), impl=_impl(impl),
                 has_rpb=np.int64(rpb is not None), scale=np.float32(scale),
                 fill=np.float32(fill), poison=np.int64(POISON_OUTPUTS))
    r = rpb.astype(jnp.float32) if rpb is not None else jnp.zeros((1,), jnp.float32)
    out_types = lambda a, bm, r: jax.ShapeDtypeStruct(a.shape[:-1] + (W,), a.dtype)  # noqa
    return _batched_call(TARGET_PN, out_types, attrs, 2)(a, bm, r)


def nn(w, bm, kernel_size, dilation, is_causal, *, scale=1.0, impl="gemm"):
    """Weighted sums over the windows ``[B, *S, H, C]`` in ``bm``'s dtype (``w`` the same)."""
    attrs = dict(_window_attrs(kernel_size, dilation, is_causal), impl=_impl(impl),
                 scale=np.float32(scale), poison=np.int64(POISON_OUTPUTS))
    out_types = lambda w, bm: jax.ShapeDtypeStruct(  # noqa: E731
        w.shape[:-1] + bm.shape[-1:], bm.dtype)
    return _batched_call(TARGET_NN, out_types, attrs, 2)(w, bm)


def inverse(w, bm, heads_kv, kernel_size, dilation, is_causal, *, scale=1.0, impl="gemm"):
    """Inverse-neighborhood sums ``[B, *S, heads_kv, C]`` in ``bm``'s dtype (``w`` the same)."""
    attrs = dict(_window_attrs(kernel_size, dilation, is_causal), impl=_impl(impl),
                 scale=np.float32(scale), poison=np.int64(POISON_OUTPUTS))
    out_types = lambda w, bm: jax.ShapeDtypeStruct(  # noqa: E731
        bm.shape[:-2] + (heads_kv, bm.shape[-1]), bm.dtype)
    return _batched_call(TARGET_IN, out_types, attrs, 2)(w, bm)


def rpb_grad(w, kernel_size, dilation, is_causal):
    """RPB gradient ``[H, 2k-1 per axis]`` float32: the deterministic per-chunk partial sums of
    the kernel, added up here."""
    spatial, H = w.shape[1:-2], w.shape[-2]
    chunks = -(-math.prod(spatial) // RPB_CHUNK_TOKENS)
    R = math.prod(2 * k - 1 for k in kernel_size)
    attrs = dict(_window_attrs(kernel_size, dilation, is_causal),
                 poison=np.int64(POISON_OUTPUTS))
    out_types = lambda w: jax.ShapeDtypeStruct((chunks, H, R), jnp.float32)  # noqa: E731

    def raw(w):
        _ffi.register()
        return jax.ffi.ffi_call(TARGET_RPB_GRAD, out_types(w))(w, **attrs)

    # The partial sums have no batch axis: vmap runs one call per mapped entry.
    partial = jax.custom_batching.sequential_vmap(raw)(w)
    return jnp.sum(partial, axis=0).reshape((H,) + tuple(2 * k - 1 for k in kernel_size))
