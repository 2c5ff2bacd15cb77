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
issues the calls through :func:`natten_jax._ffi.batched_call` (a vmapped call folds the mapped
axis into the batch).
"""

from __future__ import annotations

import math
from typing import Optional

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


def can_run(dtype, platform: Optional[str] = None, *, batch: int = 1, tokens: int = 1,
            heads: int = 1, dim: int = 1, window: int = 1, rpb: bool = False) -> tuple:
    """(True, "") if the unfused CUDA kernels can run a call here, else (False, the reason).

    What the custom calls' handlers (``src/cuda/ffi/unfused.cc``) would refuse is refused here
    first: the compiled kernels and a CUDA GPU; the call placed on it (``platform``, from
    :func:`natten_jax._ffi.call_platform`; None: the default device's); ``dtype``; and, for an
    operator call and its VJP on ``batch`` x ``tokens`` tokens with ``heads`` query heads, head
    dim ``dim`` and ``window`` neighbors: the batch and ``tokens x heads x max(dim, window)``
    below 2^31 (the kernels index one batch entry in int32), and with ``rpb`` at most 65535
    heads (the RPB gradient's gridDim.y). Grids that do not fit the GEMM kernels run the naive
    ones, which take any size within these limits.
    """
    if not _ffi.cuda_kernels_available():
        return False, _ffi.unavailable_reason()
    missing = [t for t in (TARGET_PN, TARGET_NN, TARGET_IN, TARGET_RPB_GRAD)
               if t not in _ffi.registrations()]
    if missing:
        return False, f"natten_jax._C lacks the unfused targets {missing} (rebuild it)"
    platform = platform or _ffi.default_platform()
    if platform != "cuda":
        return False, (f"the call runs on {platform!r}, not on a CUDA GPU (the arrays' devices, "
                       f"or the default device for uncommitted or traced arrays)")
    if str(jnp.dtype(dtype)) not in DTYPES:
        return False, f"dtype {jnp.dtype(dtype)} is not supported (float32, float16, bfloat16)"
    if batch > _ffi.INT32_MAX:
        return False, f"batch must be below 2^31, got {batch}"
    if tokens * heads * max(dim, window) >= _ffi.INT32_MAX:
        return False, (f"tokens x heads x max(head_dim, window) must stay below 2^31 per batch "
                       f"entry, got {tokens} x {heads} x {max(dim, window)}")
    if rpb and heads > _ffi.GRID_YZ_MAX:
        return False, (f"relative positional bias needs heads <= {_ffi.GRID_YZ_MAX} (its "
                       f"gradient kernel), got {heads}")
    return True, ""


def _window_attrs(kernel_size, dilation, is_causal):
    i64 = lambda x: np.asarray(x, np.int64)  # noqa: E731
    return dict(kernel_size=i64(kernel_size), dilation=i64(dilation),
                is_causal=i64([int(bool(c)) for c in is_causal]))


def _impl(impl: str) -> np.int64:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {tuple(IMPLS)}, got {impl!r}")
    return np.int64(IMPLS[impl])


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
    return _ffi.batched_call(TARGET_PN, out_types, attrs, n_batched=2)(a, bm, r)


def nn(w, bm, kernel_size, dilation, is_causal, *, scale=1.0, impl="gemm"):
    """Weighted sums over the windows ``[B, *S, H, C]`` in ``bm``'s dtype (``w`` the same)."""
    attrs = dict(_window_attrs(kernel_size, dilation, is_causal), impl=_impl(impl),
                 scale=np.float32(scale), poison=np.int64(POISON_OUTPUTS))
    out_types = lambda w, bm: jax.ShapeDtypeStruct(  # noqa: E731
        w.shape[:-1] + bm.shape[-1:], bm.dtype)
    return _ffi.batched_call(TARGET_NN, out_types, attrs, n_batched=2)(w, bm)


def inverse(w, bm, heads_kv, kernel_size, dilation, is_causal, *, scale=1.0, impl="gemm"):
    """Inverse-neighborhood sums ``[B, *S, heads_kv, C]`` in ``bm``'s dtype (``w`` the same)."""
    attrs = dict(_window_attrs(kernel_size, dilation, is_causal), impl=_impl(impl),
                 scale=np.float32(scale), poison=np.int64(POISON_OUTPUTS))
    out_types = lambda w, bm: jax.ShapeDtypeStruct(  # noqa: E731
        bm.shape[:-2] + (heads_kv, bm.shape[-1]), bm.dtype)
    return _ffi.batched_call(TARGET_IN, out_types, attrs, n_batched=2)(w, bm)


def rpb_grad(w, kernel_size, dilation, is_causal):
    """RPB gradient ``[H, 2k-1 per axis]`` float32: the deterministic per-chunk partial sums of
    the kernel, added up here."""
    spatial, H = w.shape[1:-2], w.shape[-2]
    chunks = -(-math.prod(spatial) // RPB_CHUNK_TOKENS)
    R = math.prod(2 * k - 1 for k in kernel_size)
    attrs = dict(_window_attrs(kernel_size, dilation, is_causal),
                 poison=np.int64(POISON_OUTPUTS))
    out_types = lambda w: jax.ShapeDtypeStruct((chunks, H, R), jnp.float32)  # noqa: E731

    # The partial sums have no batch axis: vmap runs one call per mapped entry.
    raw = _ffi.custom_call(TARGET_RPB_GRAD, out_types, attrs)
    partial = jax.custom_batching.sequential_vmap(raw)(w)
    return jnp.sum(partial, axis=0).reshape((H,) + tuple(2 * k - 1 for k in kernel_size))
