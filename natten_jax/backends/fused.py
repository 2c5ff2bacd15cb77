"""The fused (FNA) CUDA backend: our kernels through XLA FFI custom calls.

Forward runs ``natten_jax_fna_forward`` (output and fp32 logsumexp). Extra key/value tokens are
merged exactly through the two logsumexps. The VJP has two implementations, chosen by
``NATTEN_JAX_FUSED_BACKWARD`` (read when a function is traced):

* ``kernel`` (default): the fused backward kernels ``natten_jax_fna_backward`` (a dQ kernel and
  a dK/dV kernel). Deterministic: no float atomics, every gradient element is written by one
  thread in a fixed order, so repeated runs give bitwise-equal gradients;
* ``reference``: recomputes the reference backend's VJP (slow; for debugging).

The kernel VJP runs the sm80 (mma.sync) kernels unless ``NATTEN_JAX_FNA_BWD_IMPL=sm90`` selects
the Hopper (wgmma) ones, opt-in, at head dims 64 and 128 (others stay on sm80).

float32 inputs run the fp16 kernels: Q, K, V are rounded to float16 (10 mantissa bits, as TF32
has) with float32 accumulation, and results are returned in float32; expect relative errors of
about 1e-3, and inputs must stay below 65504 in magnitude. The backward rescales dO by its
largest magnitude before rounding it, so small gradients do not underflow float16.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from natten_jax import _ffi, autotune, sharding
from natten_jax.checks import NAProblem
from natten_jax.reference import na_reference
from natten_jax import tiles as tiles_mod
from natten_jax.tiles import choose_tiles  # noqa: F401 (benchmarks use it)

TARGET = "natten_jax_fna_forward"
TARGET_BACKWARD = "natten_jax_fna_backward"
BACKWARD_ENV = "NATTEN_JAX_FUSED_BACKWARD"
HEAD_DIMS = (32, 64, 128)
DTYPES = ("float16", "bfloat16", "float32")  # float32: fp16 kernels (see above)

# Tests set this: the custom call then fills its outputs with NaN before the kernel runs, so an
# element the kernel fails to write cannot pass as a stale correct value.
POISON_OUTPUTS = False


def can_run(p: NAProblem):
    """(True, "") if the fused kernel can run ``p`` here, else (False, the reason)."""
    if not _ffi.cuda_kernels_available():
        return False, _ffi.unavailable_reason()
    if p.dtype not in DTYPES:
        return False, f"dtype {p.dtype} is not supported {DTYPES}"
    if p.head_dim not in HEAD_DIMS or p.head_dim_v != p.head_dim:
        return False, (f"head_dim {p.head_dim} / value head_dim {p.head_dim_v}: the kernel "
                       f"needs equal head dims in {HEAD_DIMS}")
    if not p.scale > 0:
        return False, f"scale must be > 0 for the fused kernel, got {p.scale}"
    if p.batch > 65535 or p.heads * int(np.prod(p.dilation)) > 65535:
        return False, "batch and heads x dilation groups must each be <= 65535"
    return True, ""


def _attrs(p: NAProblem, tiles=None, backward=False, impl=None):
    # The cost model (choose_tiles), or the auto-tuner if NATTEN_JAX_AUTOTUNE is on/thorough.
    if backward:  # sm90 hook: NATTEN_JAX_FNA_BWD_IMPL (natten_jax.autotune.bwd_impl)
        impl = impl or autotune.bwd_impl(p.head_dim)
        qt, kt = tiles or autotune.select_tiles(p, backward=True, impl=impl)
    else:  # sm90 hook: the forward also picks its kernel (NATTEN_JAX_FNA_IMPL, natten_jax.tiles)
        if tiles is None:
            impl, (qt, kt) = autotune.select_config(p, impl=impl)
        else:
            qt, kt = tiles
            impl = impl or autotune.resolve_impl(p)
    i64 = lambda x: np.asarray(x, np.int64)  # noqa: E731
    attrs = dict(kernel_size=i64(p.kernel_size), stride=i64(p.stride), dilation=i64(p.dilation),
                 is_causal=i64(p.is_causal), q_tile=i64(qt), kv_tile=i64(kt),
                 scale=np.float32(p.scale), poison=np.int64(1 if POISON_OUTPUTS else 0))
    attrs["impl"] = np.int64(tiles_mod.impl_code(impl))
    return attrs


def _per_shard_call(target, out_types, attrs):
    """The custom call on one shard's operands (local shapes under SPMD partitioning)."""
    return lambda *xs: jax.ffi.ffi_call(target, out_types(*xs))(*xs, **attrs)


def _ffi_batched(target, out_types, attrs, in_kinds, out_kinds):
    """``ffi_call`` of ``target`` whose operands and results all lead with the batch axis;
    vmap folds the mapped axis into batch (the kernels take one batch axis). Under SPMD each
    device runs it on its batch/heads shard (:mod:`natten_jax.sharding`; kinds: layouts).
    With a single device the partitioning wrapper is left out (the plain call, as validated
    on one GPU)."""
    per_shard = _per_shard_call(target, out_types, attrs)
    if jax.device_count() > 1:
        per_shard = sharding.partitioned(per_shard, in_kinds, out_kinds, name=target)

    @jax.custom_batching.custom_vmap
    def call(*xs):
        return per_shard(*xs)

    @call.def_vmap
    def _vmap(axis_size, in_batched, *xs):
        xs = [x if bat else jnp.broadcast_to(x, (axis_size,) + x.shape)
              for x, bat in zip(xs, in_batched)]
        outs = call(*[x.reshape((axis_size * x.shape[1],) + x.shape[2:]) for x in xs])
        outs = tuple(o.reshape((axis_size, -1) + o.shape[1:]) for o in outs)
        return outs, tuple(True for _ in outs)

    return call


def _forward_call(p: NAProblem, q, k, v, tiles=None, impl=None):
    """The forward custom call -> (out, lse). ``tiles``: (q, kv) log2 extents per axis
    (default: :func:`natten_jax.tiles.choose_tiles`); ``impl``: ``sm80`` or ``sm90`` (default:
    ``NATTEN_JAX_FNA_IMPL``)."""
    _ffi.register()
    out_types = lambda q, k, v: (jax.ShapeDtypeStruct(q.shape, q.dtype),  # noqa: E731
                                 jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32))
    return _ffi_batched(TARGET, out_types, _attrs(p, tiles, impl=impl), ("q", "k", "v"),
                        ("o", "lse"))(q, k, v)


def _backward_call(p: NAProblem, q, k, v, dout, lse, delta, tiles=None, impl=None):
    """The backward custom call -> (dq, dk, dv); delta = rowsum(dO * O) - d(lse). ``impl``:
    ``sm80`` or ``sm90`` (default: ``NATTEN_JAX_FNA_BWD_IMPL``, see
    :func:`natten_jax.autotune.bwd_impl`)."""
    _ffi.register()
    out_types = lambda q, k, v, *_: (jax.ShapeDtypeStruct(q.shape, q.dtype),  # noqa: E731
                                     jax.ShapeDtypeStruct(k.shape, k.dtype),
                                     jax.ShapeDtypeStruct(v.shape, v.dtype))
    attrs = _attrs(p, tiles, backward=True, impl=impl)
    return _ffi_batched(TARGET_BACKWARD, out_types, attrs, ("q", "k", "v", "o", "lse", "lse"),
                        ("q", "k", "v"))(q, k, v, dout, lse, delta)


def visited_flops(spatial, kernel_size, stride, dilation, is_causal, batch: int, heads: int,
                  head_dim: int) -> int:
    """:func:`natten_jax.tiles.visited_flops` for the forward kernel NATTEN_JAX_FNA_IMPL selects
    (under ``auto`` the sm90 one where it runs; sm90 hook)."""
    impl = autotune.impl_candidates(head_dim)[-1]
    return tiles_mod.visited_flops(spatial, kernel_size, stride, dilation, is_causal, batch,
                                   heads, head_dim, impl=impl)


def backward_mode() -> str:
    mode = os.environ.get(BACKWARD_ENV, "kernel").strip() or "kernel"
    if mode not in ("reference", "kernel"):
        raise ValueError(f"{BACKWARD_ENV} must be 'reference' or 'kernel', got {mode!r}")
    return mode


F32_COMPUTE = jnp.float16  # what float32 inputs run as (module docstring)


def _compute(x):
    """Inputs of the kernels: float32 runs as F32_COMPUTE."""
    return x.astype(F32_COMPUTE) if x.dtype == jnp.float32 else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _na_fused(p: NAProblem, q, k, v):
    out, lse = _forward_call(p, _compute(q), _compute(k), _compute(v))
    return out.astype(q.dtype), lse


def _na_fused_fwd(p, q, k, v):
    out, lse = _na_fused(p, q, k, v)
    return (out, lse), (q, k, v, out, lse)


def _na_fused_bwd(p, res, cts):
    q, k, v, out, lse = res
    d_out, d_lse = cts
    if backward_mode() == "reference":
        _, vjp = jax.vjp(lambda q, k, v: na_reference(p, q, k, v), q, k, v)
        return vjp(cts)
    f32 = jnp.float32
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1) - d_lse.astype(f32)
    if q.dtype != jnp.float32:
        return _backward_call(p, q, k, v, d_out.astype(q.dtype), lse, delta)
    # float32: every gradient is linear in (dO, d_lse); scale them to a max of 1 for float16.
    s = jnp.max(jnp.abs(d_out))
    s = jnp.where(jnp.isfinite(s) & (s > 0), s, 1.0).astype(f32)
    grads = _backward_call(p, _compute(q), _compute(k), _compute(v),
                           (d_out / s).astype(F32_COMPUTE), lse, delta / s)
    return tuple(g.astype(f32) * s for g in grads)


_na_fused.defvjp(_na_fused_fwd, _na_fused_bwd)


def _merge_extra(p: NAProblem, q, out, lse, extra_k, extra_v):
    """Exact merge of the neighborhood result with dense attention over the extra tokens."""
    f32 = jnp.float32
    G = p.heads // p.heads_kv
    qg = q.astype(f32).reshape(q.shape[:-2] + (p.heads_kv, G, p.head_dim))
    s = jnp.einsum("b...hgd,bnhd->b...hgn", qg, extra_k.astype(f32)) * p.scale
    lse_e = jax.nn.logsumexp(s, axis=-1)
    out_e = jnp.einsum("b...hgn,bnhe->b...hge", jnp.exp(s - lse_e[..., None]),
                       extra_v.astype(f32))
    lse_e = lse_e.reshape(lse.shape)
    out_e = out_e.reshape(out.shape)
    lse_all = jnp.logaddexp(lse, lse_e)
    w_na = jnp.exp(lse - lse_all)[..., None]
    w_e = jnp.exp(lse_e - lse_all)[..., None]
    merged = out.astype(f32) * w_na + out_e * w_e
    return merged.astype(q.dtype), lse_all


def run(p: NAProblem, q, k, v, extra_k=None, extra_v=None):
    out, lse = _na_fused(p, q, k, v)
    if extra_k is not None:
        out, lse = _merge_extra(p, q, out, lse, extra_k, extra_v)
    return out, lse
