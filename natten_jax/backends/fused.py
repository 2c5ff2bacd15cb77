"""The fused (FNA) CUDA backend: our kernels through XLA FFI custom calls.

Forward runs ``natten_jax_fna_forward`` (output and fp32 logsumexp). Extra key/value tokens are
merged exactly through the two logsumexps. Which kernels run is the problem's configuration
``p.config`` (:class:`natten_jax.config.FusedConfig`), read when a function is traced and carried
to the custom calls as attributes (implementation, tiles, occupancy). The VJP has two
implementations, chosen by ``p.config.backward``:

* ``kernel`` (default): the fused backward kernels ``natten_jax_fna_backward`` (a dQ kernel and
  a dK/dV kernel; ``p.config.backward_impl`` picks the sm80 mma.sync or, at head dims 64 and
  128, the Hopper wgmma ones). Deterministic: no float atomics, every gradient element is
  written by one thread in a fixed order, so repeated runs give bitwise-equal gradients;
* ``reference``: recomputes the reference backend's VJP (slow; for debugging).

float32 inputs run the fp16 kernels: Q, K, V are rounded to float16 (10 mantissa bits, as TF32
has) with float32 accumulation, and results are returned in float32; expect relative errors of
about 1e-3, and inputs must stay below 65504 in magnitude. The backward rescales dO by its
largest magnitude before rounding it, so small gradients do not underflow float16.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from natten_jax import _ffi, autotune
from natten_jax.checks import NAProblem
from natten_jax.reference import na_reference
from natten_jax import tiles as tiles_mod
from natten_jax.config import FusedConfig, default_config
from natten_jax.merge import merge_attentions

TARGET = "natten_jax_fna_forward"
TARGET_BACKWARD = "natten_jax_fna_backward"
HEAD_DIMS = (32, 64, 128)
DTYPES = ("float16", "bfloat16", "float32")  # float32: fp16 kernels (see above)

# Tests set this: the custom call then fills its outputs with NaN before the kernel runs, so an
# element the kernel fails to write cannot pass as a stale correct value.
POISON_OUTPUTS = False


def can_run(p: NAProblem):
    """(True, "") if the fused kernels can run ``p`` here, else (False, the reason).

    Everything the custom calls' handlers (``src/cuda/ffi/fna.cc``) would refuse is refused
    here first, so an unsupported call is a Python error before launch: the compiled kernels
    and a CUDA GPU, the call placed on it (``p.platform``: where the arrays live, or the default
    device), dtype, head dims, scale, the launch grid (batch on gridDim.z, heads x dilation
    groups on gridDim.y), int32 extents, and an sm90 kernel named by ``p.config`` where it cannot
    run. Argument checks (shapes, windows, GQA heads) were done by
    :func:`natten_jax.checks.check_na_call`; a vmapped call beyond the batch limit runs in
    chunks (:func:`natten_jax._ffi.batched_call`).
    """
    if not _ffi.cuda_kernels_available():
        return False, _ffi.unavailable_reason()
    platform = p.platform or _ffi.default_platform()
    if platform != "cuda":
        return False, (f"the call runs on {platform!r}, not on a CUDA GPU (the arrays' devices, "
                       f"or the default device for uncommitted or traced arrays)")
    if p.dtype not in DTYPES:
        return False, f"dtype {p.dtype} is not supported {DTYPES}"
    if p.head_dim not in HEAD_DIMS or p.head_dim_v != p.head_dim:
        return False, (f"head_dim {p.head_dim} / value head_dim {p.head_dim_v}: the kernel "
                       f"needs equal head dims in {HEAD_DIMS}")
    with np.errstate(over="ignore"):  # a huge scale is inf in float32: refused below
        scale32 = float(np.float32(p.scale))
    if not (np.isfinite(scale32) and scale32 > 0):
        return False, (f"scale must be a positive finite float32 for the fused kernel, got "
                       f"{p.scale}")
    groups = int(np.prod(p.dilation))
    if p.batch > _ffi.GRID_YZ_MAX:
        return False, f"batch must be <= {_ffi.GRID_YZ_MAX}, got {p.batch}"
    if p.heads * groups > _ffi.GRID_YZ_MAX:
        return False, (f"heads x dilation groups must be <= {_ffi.GRID_YZ_MAX}, got {p.heads} x "
                       f"{groups}")
    # Extents are int32 in the kernels. (The handler also bounds the launch's query tiles by
    # 2^31, which no array that fits in a GPU's memory reaches: it needs >= 2^37 tokens.)
    if max(p.spatial) > _ffi.INT32_MAX:
        return False, f"every spatial extent must be below 2^31, got {p.spatial}"
    # An explicit sm90 kernel (forward_impl / backward_impl "sm90"; "auto" picks it only where
    # it runs) needs a compute capability 9.0 GPU and sm_90a code.
    wants_sm90 = [f"{name}='sm90'" for name, impl in (
        ("forward_impl", autotune.impl_candidates(p.head_dim, p.config)[-1]),
        ("backward_impl", autotune.bwd_impl(p.head_dim, p.config)
         if p.config.backward == "kernel" else "sm80")) if impl == "sm90"]
    if wants_sm90 and not autotune.sm90_runs():
        return False, (f"backend_config {' and '.join(wants_sm90)} needs a compute capability 9.0 "
                       f"GPU (H100/H200) and a module built with sm_90a code; use 'auto' or "
                       f"'sm80'")
    return True, ""


def _attrs(p: NAProblem, tiles=None, backward=False, impl=None):
    """FFI attributes of the forward (or backward) custom call on ``p``: the kernel ``p.config``
    names (``impl``: forced instead), its tiles from the cost model or, with
    ``p.config.autotune`` on, the auto-tuner timing :func:`time_kernel` (``tiles``: forced
    instead), and the forward's ``sm80_occupancy`` (0: the kernel's default)."""
    cfg = p.config
    if backward:
        impl = impl or autotune.bwd_impl(p.head_dim, cfg)
        qt, kt = tiles or autotune.select_tiles(p, backward=True, impl=impl, timer=time_kernel)
    else:  # the forward also picks its kernel (forward_impl "auto": the cost model or timing)
        if tiles is None:
            impl, (qt, kt) = autotune.select_config(p, impl=impl, timer=time_kernel)
        else:
            qt, kt = tiles
            impl = impl or autotune.resolve_impl(p)
    i64 = lambda x: np.asarray(x, np.int64)  # noqa: E731
    attrs = dict(kernel_size=i64(p.kernel_size), stride=i64(p.stride), dilation=i64(p.dilation),
                 is_causal=i64(p.is_causal), q_tile=i64(qt), kv_tile=i64(kt),
                 scale=np.float32(p.scale), poison=np.int64(1 if POISON_OUTPUTS else 0))
    attrs["impl"] = np.int64(tiles_mod.impl_code(impl))
    if not backward:
        attrs["sm80_occupancy"] = np.int64(cfg.sm80_occupancy or 0)
    return attrs


def time_kernel(p: NAProblem, tiles, backward: bool, *, impl: str, reps: int = 5,
                target_s: float = 0.01) -> float:
    """Seconds per call of the forward (or backward) kernel ``impl`` with ``tiles`` on ``p``:
    the auto-tuner's timer (:func:`natten_jax.autotune.measure` on
    :func:`natten_jax.autotune.random_operands`). Runs at trace time: evaluation is forced eager
    (``jax.ensure_compile_time_eval``) and the operands are fresh random device arrays, never
    the traced ones."""
    with jax.ensure_compile_time_eval():
        # The backward's O and LSE: the sm80 forward with the cost model's tiles (explicit, so
        # no recursion into the tuner).
        fwd_tiles = autotune.select_tiles(p, mode="off", impl="sm80")
        args = autotune.random_operands(
            p, backward, lambda q, k, v: _forward_call(p, q, k, v, tiles=fwd_tiles, impl="sm80"))
        if backward:
            fn = jax.jit(lambda *a: _backward_call(p, *a, tiles=tiles, impl=impl))
        else:
            fn = jax.jit(lambda q, k, v: _forward_call(p, q, k, v, tiles=tiles, impl=impl))
        return autotune.measure(fn, args, reps=reps, target_s=target_s)


def _forward_call(p: NAProblem, q, k, v, tiles=None, impl=None):
    """The forward custom call -> (out, lse). ``tiles``: (q, kv) log2 extents per axis
    (default: :func:`_attrs`'s choice); ``impl``: ``sm80`` or ``sm90`` (default: the one
    ``p.config.forward_impl`` selects)."""
    _ffi.register()
    out_types = lambda q, k, v: (jax.ShapeDtypeStruct(q.shape, q.dtype),  # noqa: E731
                                 jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32))
    return _ffi.batched_call(TARGET, out_types, _attrs(p, tiles, impl=impl),
                             kinds=(("q", "k", "v"), ("o", "lse")),
                             max_batch=_ffi.GRID_YZ_MAX)(q, k, v)


def _backward_call(p: NAProblem, q, k, v, dout, lse, delta, tiles=None, impl=None):
    """The backward custom call -> (dq, dk, dv); delta = rowsum(dO * O) - d(lse). ``impl``:
    ``sm80`` or ``sm90`` (default: the one ``p.config.backward_impl`` selects, see
    :func:`natten_jax.autotune.bwd_impl`)."""
    _ffi.register()
    out_types = lambda q, k, v, *_: (jax.ShapeDtypeStruct(q.shape, q.dtype),  # noqa: E731
                                     jax.ShapeDtypeStruct(k.shape, k.dtype),
                                     jax.ShapeDtypeStruct(v.shape, v.dtype))
    attrs = _attrs(p, tiles, backward=True, impl=impl)
    return _ffi.batched_call(TARGET_BACKWARD, out_types, attrs,
                             kinds=(("q", "k", "v", "o", "lse", "lse"), ("q", "k", "v")),
                             max_batch=_ffi.GRID_YZ_MAX)(q, k, v, dout, lse, delta)


def visited_flops(spatial, kernel_size, stride, dilation, is_causal, batch: int, heads: int,
                  head_dim: int, config: Optional[FusedConfig] = None) -> int:
    """:func:`natten_jax.tiles.visited_flops` for the forward kernel ``config`` selects (None:
    :func:`natten_jax.config.default_config`; under ``auto`` the sm90 one where it runs)."""
    config = config if config is not None else default_config()
    impl = autotune.impl_candidates(head_dim, config)[-1]
    return tiles_mod.visited_flops(spatial, kernel_size, stride, dilation, is_causal, batch,
                                   heads, head_dim, impl=impl, q_tile=config.q_tile)


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
    if p.config.backward == "reference":
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
    merged, lse_all = merge_attentions([out.astype(f32), out_e], [lse, lse_e])
    return merged.astype(q.dtype), lse_all


def run(p: NAProblem, q, k, v, extra_k=None, extra_v=None):
    out, lse = _na_fused(p, q, k, v)
    if extra_k is not None:
        out, lse = _merge_extra(p, q, out, lse, extra_k, extra_v)
    return out, lse
