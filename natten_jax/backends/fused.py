"""The fused (FNA) CUDA backend: our forward kernel through an XLA FFI custom call.

Forward runs ``natten_jax_fna_forward`` (output and fp32 logsumexp). Extra key/value tokens are
merged exactly through the two logsumexps. Until the fused backward kernel lands, the VJP
recomputes the reference backend's VJP (correct gradients, not fast ones).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from natten_jax import _ffi
from natten_jax.checks import NAProblem
from natten_jax.reference import na_reference
from natten_jax.tiles import choose_tiles, visited_flops  # noqa: F401 (benchmarks use it)

TARGET = "natten_jax_fna_forward"
HEAD_DIMS = (32, 64, 128)
DTYPES = ("float16", "bfloat16")

# Tests set this: the custom call then fills its outputs with NaN before the kernel runs, so an
# element the kernel fails to write cannot pass as a stale correct value.
POISON_OUTPUTS = False


def can_run(p: NAProblem):
    """(True, "") if the fused kernel can run ``p`` here, else (False, the reason)."""
    if not _ffi.cuda_kernels_available():
        return False, _ffi.unavailable_reason()
    if p.dtype not in DTYPES:
        return False, f"dtype {p.dtype} is not supported (float16, bfloat16)"
    if p.head_dim not in HEAD_DIMS or p.head_dim_v != p.head_dim:
        return False, (f"head_dim {p.head_dim} / value head_dim {p.head_dim_v}: the kernel "
                       f"needs equal head dims in {HEAD_DIMS}")
    if not p.scale > 0:
        return False, f"scale must be > 0 for the fused kernel, got {p.scale}"
    if p.batch > 65535 or p.heads * int(np.prod(p.dilation)) > 65535:
        return False, "batch and heads x dilation groups must each be <= 65535"
    return True, ""


def _attrs(p: NAProblem, tiles=None):
    qt, kt = tiles or choose_tiles(p.spatial, p.kernel_size, p.stride, p.dilation, p.is_causal,
                                   p.head_dim)
    i64 = lambda x: np.asarray(x, np.int64)  # noqa: E731
    return dict(kernel_size=i64(p.kernel_size), stride=i64(p.stride), dilation=i64(p.dilation),
                is_causal=i64(p.is_causal), q_tile=i64(qt), kv_tile=i64(kt),
                scale=np.float32(p.scale), poison=np.int64(1 if POISON_OUTPUTS else 0))


def _forward_call(p: NAProblem, q, k, v, tiles=None):
    """The custom call; vmap folds extra batch axes into batch. ``tiles``: (q, kv) log2 extents
    per axis (default: :func:`natten_jax.tiles.choose_tiles`)."""
    _ffi.register()
    attrs = _attrs(p, tiles)

    @jax.custom_batching.custom_vmap
    def call(q, k, v):
        out_types = (jax.ShapeDtypeStruct(q.shape, q.dtype),
                     jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32))
        return jax.ffi.ffi_call(TARGET, out_types)(q, k, v, **attrs)

    @call.def_vmap
    def _vmap(axis_size, in_batched, q, k, v):
        xs = [x if bat else jnp.broadcast_to(x, (axis_size,) + x.shape)
              for x, bat in zip((q, k, v), in_batched)]
        folded = [x.reshape((axis_size * x.shape[1],) + x.shape[2:]) for x in xs]
        out, lse = call(*folded)
        out = out.reshape((axis_size, -1) + out.shape[1:])
        lse = lse.reshape((axis_size, -1) + lse.shape[1:])
        return (out, lse), (True, True)

    return call(q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _na_fused(p: NAProblem, q, k, v):
    return _forward_call(p, q, k, v)


def _na_fused_fwd(p, q, k, v):
    return _forward_call(p, q, k, v), (q, k, v)


def _na_fused_bwd(p, res, cts):
    q, k, v = res
    _, vjp = jax.vjp(lambda q, k, v: na_reference(p, q, k, v), q, k, v)
    return vjp(cts)


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
