"""The fused (FNA) CUDA backend: our kernels through XLA FFI custom calls.

Forward runs ``natten_jax_fna_forward`` (output and fp32 logsumexp). Extra key/value tokens are
merged exactly through the two logsumexps (:func:`natten_jax.merge_attentions`). Which kernels
run is the problem's configuration ``p.config`` (:class:`natten_jax.config.FusedConfig`), read
when a function is traced and carried to the custom calls as attributes (implementation, tiles,
occupancy). The VJP has two
implementations, chosen by ``p.config.backward``:

* ``kernel`` (default): the fused backward kernels ``natten_jax_fna_backward`` (a dQ kernel and
  a dK/dV kernel; ``p.config.backward_impl`` picks the sm80 mma.sync or, at head dims 64 and
  128, the Hopper wgmma ones). Deterministic: no float atomics, every gradient element is
  written by one thread in a fixed order, so repeated runs give bitwise-equal gradients;
* ``reference``: recomputes the reference backend's VJP (slow; for debugging).

float32 inputs run float32 kernels (TF32 tensor cores, mma.sync m16n8k8: variants of the sm80
ones; never 16-bit storage, so any magnitude float32 holds is fine) and give float32 outputs
and gradients. The problem's precision (``p.precision``, :mod:`natten_jax.precision`) is the
``precision`` attribute of both custom calls: ``"default"`` computes the logits ``Q K^T`` by
3xTF32 (float32-accurate: ``exp`` amplifies their absolute error) and every other product by
one TF32 pass, ``"highest"`` every product by 3xTF32 (float32-accurate); accumulation and
softmax are float32 in both. float32 runs the sm80 kernels only (``forward_impl`` /
``backward_impl`` ``sm90`` run sm80 there), with 64-token forward Q tiles (``q_tile=128`` is
refused), at head dims 32, 64 and 128; head dim 128 needs ~205 KB of shared memory per block,
compute capability 9.x (:func:`can_run` refuses it elsewhere, so ``backend=None`` falls back to
the reference). 16-bit inputs ignore the precision (attribute 0).

Head dims: the kernels are built at 32, 64 and 128 (``HEAD_DIMS``); a call at any head dim up
to 128, and value head dims that differ from the query's, runs at the smallest built one that
holds both, with q, k and v zero-padded to it and the output cut back (exact; the padding costs
the larger head dim's work and a copy of the inputs).

Ragged batches (issue 24): ``valid_extent`` (int32 ``[B, rank]``) is the optional trailing
operand of both custom calls (array kind ``"ext"`` of :mod:`natten_jax.sharding`: partitioned
over batch, folded into the batch under vmap). The kernels clamp it
(:func:`natten_jax.window.sample_extent`), compute each sample on its own extent, write O = 0 and
LSE = 0 at padded queries and dQ = dK = dV = 0 at padded tokens, and never read padded Q/K/V/dO.
It is an integer operand: the VJP gives it no cotangent. Extra tokens: sample ``b`` attends to
the first ``additional_lengths[b]`` (clamped by :func:`natten_jax.window.sample_num_extra`) of
them; a sample with none gets exactly the neighborhood result. With ``valid_extent`` the merged
output / LSE are 0 / 0.0 at padded queries, and padded queries (NaN, say) never enter the
extra-token products. Calls without these arguments build the same custom calls as before.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from natten_jax import _ffi, autotune
from natten_jax import precision as precision_mod
from natten_jax.checks import NAProblem
from natten_jax import tiles as tiles_mod
from natten_jax.config import FusedConfig, default_config
from natten_jax.merge import merge_attentions
from natten_jax.window import sample_extent, used_extra, valid_tokens

TARGET = "natten_jax_fna_forward"
TARGET_BACKWARD = "natten_jax_fna_backward"
HEAD_DIMS = (32, 64, 128)
DTYPES = ("float16", "bfloat16", "float32")  # float32: TF32 kernels (see above)

# Tests set this: the custom call then fills its outputs with NaN before the kernel runs, so an
# element the kernel fails to write cannot pass as a stale correct value.
POISON_OUTPUTS = False


def kernel_head_dim(head_dim: int, head_dim_v: int) -> Optional[int]:
    """The head dim the fused kernels run a call at: the smallest built one (``HEAD_DIMS``)
    that holds both the query / key and the value head dims (None above the largest). Smaller
    head dims are zero-padded to it, which is exact: a zero column adds nothing to a score and
    the output's padded columns are cut off."""
    need = max(head_dim, head_dim_v)
    return next((d for d in HEAD_DIMS if d >= need), None)


def kernel_problem(p: NAProblem) -> NAProblem:
    """``p`` at the head dim its kernels run (:func:`kernel_head_dim`; ``p`` itself when that is
    its own). Only for problems :func:`can_run` accepts."""
    d = kernel_head_dim(p.head_dim, p.head_dim_v)
    if d == p.head_dim == p.head_dim_v:
        return p
    return dataclasses.replace(p, head_dim=d, head_dim_v=d)


def _pad_head_dim(x, d: int):
    """``x`` with its last axis zero-padded to ``d``."""
    if x.shape[-1] == d:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, d - x.shape[-1])])


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
    if kernel_head_dim(p.head_dim, p.head_dim_v) is None:
        return False, (f"head_dim {p.head_dim} / value head_dim {p.head_dim_v}: the fused "
                       f"kernels take head dims up to {HEAD_DIMS[-1]} (built at {HEAD_DIMS}; "
                       f"smaller ones run zero-padded to the next of these)")
    p = kernel_problem(p)  # the kernels' head dim decides the rest
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
        ("forward_impl", autotune.impl_candidates(p.head_dim, p.config, p.dtype)[-1]),
        ("backward_impl", autotune.bwd_impl(p.head_dim, p.config, p.dtype)
         if p.config.backward == "kernel" else "sm80")) if impl == "sm90"]
    if tiles_mod.is_float32(p.dtype):
        why = float32_unsupported(p)
        if why:
            return False, why
    if wants_sm90 and not autotune.sm90_runs():
        return False, (f"backend_config {' and '.join(wants_sm90)} needs a compute capability 9.0 "
                       f"GPU (H100/H200) and a module built with sm_90a code; use 'auto' or "
                       f"'sm80'")
    return True, ""


def float32_unsupported(p: NAProblem) -> str:
    """Why the float32 kernels cannot run ``p`` here ("" if they can; module docstring): a
    128-token forward Q tile, or head dim 128 below compute capability 9.x."""
    q64 = 1 << tiles_mod.F32_Q_TILE_LOG2
    if p.config.q_tile is not None and p.config.q_tile != q64:
        return (f"float32 inputs run {q64}-token Q tiles only, but backend_config has "
                f"q_tile={p.config.q_tile}; use q_tile=None or {q64}")
    if p.head_dim > tiles_mod.F32_MAX_HEAD_DIM_BEFORE_MIN_MAJOR:
        cc = autotune.compute_capability()
        if cc is None or cc[0] < tiles_mod.F32_LARGE_SMEM_MIN_MAJOR:
            have = "unknown" if cc is None else f"{cc[0]}.{cc[1]}"
            return (f"float32 at head_dim {p.head_dim} needs ~205 KB of shared memory per "
                    f"block: a GPU of compute capability {tiles_mod.F32_LARGE_SMEM_MIN_MAJOR}.x "
                    f"(H100/H200), this one has {have}")
    return ""


def _attrs(p: NAProblem, tiles=None, backward=False, impl=None):
    """FFI attributes of the forward (or backward) custom call on ``p``: the kernel ``p.config``
    names (``impl``: forced instead), its tiles from the cost model or, with
    ``p.config.autotune`` on, the auto-tuner timing :func:`time_kernel` (``tiles``: forced
    instead), and the forward's ``sm80_occupancy`` (0: the kernel's default)."""
    cfg = p.config
    if backward:
        impl = impl or autotune.bwd_impl(p.head_dim, cfg, p.dtype)
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
    # 0 "default" / 1 "highest"; 16-bit kernels ignore it (0 for them).
    attrs["precision"] = np.int64(precision_mod.ffi_code(p.precision)
                                  if tiles_mod.is_float32(p.dtype) else 0)
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


def _ext_operand(valid_extent):
    """The custom calls' trailing operands: () or (valid_extent as int32,) and its kind."""
    if valid_extent is None:
        return (), ()
    return (jnp.asarray(valid_extent, jnp.int32),), ("ext",)


def _forward_call(p: NAProblem, q, k, v, tiles=None, impl=None, valid_extent=None):
    """The forward custom call -> (out, lse). ``tiles``: (q, kv) log2 extents per axis
    (default: :func:`_attrs`'s choice); ``impl``: ``sm80`` or ``sm90`` (default: the one
    ``p.config.forward_impl`` selects); ``valid_extent``: int ``[B, rank]`` of a ragged batch
    (the trailing operand), or None."""
    _ffi.register()
    out_types = lambda q, k, v, *_: (jax.ShapeDtypeStruct(q.shape, q.dtype),  # noqa: E731
                                     jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32))
    ext, ext_kind = _ext_operand(valid_extent)
    return _ffi.batched_call(TARGET, out_types, _attrs(p, tiles, impl=impl),
                             kinds=(("q", "k", "v") + ext_kind, ("o", "lse")),
                             max_batch=_ffi.GRID_YZ_MAX)(q, k, v, *ext)


def _backward_call(p: NAProblem, q, k, v, dout, lse, delta, tiles=None, impl=None,
                   valid_extent=None):
    """The backward custom call -> (dq, dk, dv); delta = rowsum(dO * O) - d(lse). ``impl``:
    ``sm80`` or ``sm90`` (default: the one ``p.config.backward_impl`` selects, see
    :func:`natten_jax.autotune.bwd_impl`); ``valid_extent`` as in :func:`_forward_call`."""
    _ffi.register()
    out_types = lambda q, k, v, *_: (jax.ShapeDtypeStruct(q.shape, q.dtype),  # noqa: E731
                                     jax.ShapeDtypeStruct(k.shape, k.dtype),
                                     jax.ShapeDtypeStruct(v.shape, v.dtype))
    attrs = _attrs(p, tiles, backward=True, impl=impl)
    ext, ext_kind = _ext_operand(valid_extent)
    return _ffi.batched_call(TARGET_BACKWARD, out_types, attrs,
                             kinds=(("q", "k", "v", "o", "lse", "lse") + ext_kind,
                                    ("q", "k", "v")),
                             max_batch=_ffi.GRID_YZ_MAX)(q, k, v, dout, lse, delta, *ext)


def visited_flops(spatial, kernel_size, stride, dilation, is_causal, batch: int, heads: int,
                  head_dim: int, config: Optional[FusedConfig] = None, dtype=None) -> int:
    """:func:`natten_jax.tiles.visited_flops` for the forward kernel ``config`` selects (None:
    :func:`natten_jax.config.default_config`; under ``auto`` the sm90 one where it runs) on
    inputs of ``dtype`` (None: 16-bit; float32 runs sm80 with 64-token Q tiles)."""
    config = config if config is not None else default_config()
    impl = autotune.impl_candidates(head_dim, config, dtype)[-1]
    q_tile = None if tiles_mod.is_float32(dtype) else config.q_tile
    return tiles_mod.visited_flops(spatial, kernel_size, stride, dilation, is_causal, batch,
                                   heads, head_dim, impl=impl, q_tile=q_tile, dtype=dtype)


def valid_queries(p: NAProblem, valid_extent):
    """bool ``[B, *spatial]``: the tokens inside each sample's extent, clamped as the kernels
    clamp it (:func:`natten_jax.window.sample_extent`)."""
    ext = sample_extent(jnp.asarray(valid_extent, jnp.int32), p.kernel_size, p.dilation,
                        p.spatial)
    return valid_tokens(p.spatial, ext)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _na_fused(p: NAProblem, q, k, v, valid_extent):
    return _forward_call(p, q, k, v, valid_extent=valid_extent)


def _na_fused_fwd(p, q, k, v, valid_extent):
    out, lse = _na_fused(p, q, k, v, valid_extent)
    return (out, lse), (q, k, v, valid_extent, out, lse)


def _na_fused_bwd(p, res, cts):
    q, k, v, valid_extent, out, lse = res
    d_out, d_lse = cts
    if p.config.backward == "reference":
        from natten_jax.backends import reference

        _, vjp = jax.vjp(lambda q, k, v: reference.run(p, q, k, v, valid_extent=valid_extent),
                         q, k, v)
        return vjp(cts) + (None,)  # valid_extent: an integer operand, no cotangent
    f32 = jnp.float32
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1) - d_lse.astype(f32)
    grads = _backward_call(p, q, k, v, d_out.astype(q.dtype), lse, delta,
                           valid_extent=valid_extent)
    return tuple(grads) + (None,)


_na_fused.defvjp(_na_fused_fwd, _na_fused_bwd)


def _extra_attention(p: NAProblem, q, extra_k, extra_v, lengths):
    """Dense attention of every query over the extra tokens -> (out [B, *S, H, Dv] float32,
    lse [B, *S, H] float32). ``lengths``: None, or int ``[B]``: sample ``b`` uses the first
    ``lengths[b]`` tokens; the others are zeroed (never read) and masked, and a sample with
    none gets output 0 and lse ``-inf`` with finite gradients."""
    f32 = jnp.float32
    B, N = extra_k.shape[0], extra_k.shape[1]
    G = p.heads // p.heads_kv
    qg = q.astype(f32).reshape(q.shape[:-2] + (p.heads_kv, G, p.head_dim))
    ek, ev = extra_k.astype(f32), extra_v.astype(f32)
    if lengths is not None:
        used = used_extra(jnp.asarray(lengths, jnp.int32), N)  # [B, N]
        ek = jnp.where(used[:, :, None, None], ek, 0.0)
        ev = jnp.where(used[:, :, None, None], ev, 0.0)
    prec = precision_mod.einsum_precision(p.precision, q.dtype)
    s = jnp.einsum("b...hgd,bnhd->b...hgn", qg, ek,
                   precision=precision_mod.scores_precision(p.precision, q.dtype)) * p.scale
    if lengths is None:
        lse_e = jax.nn.logsumexp(s, axis=-1)
        probs = jnp.exp(s - lse_e[..., None])
    else:
        s = jnp.where(used.reshape((B,) + (1,) * (p.rank + 2) + (N,)), s, -jnp.inf)
        m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
        m = jnp.where(jnp.isfinite(m), m, 0.0)  # a sample without extra tokens
        e = jnp.exp(s - m)  # 0 at unused tokens, with gradient 0
        total = jnp.sum(e, axis=-1)
        some = total > 0
        total = jnp.where(some, total, 1.0)
        lse_e = jnp.where(some, m[..., 0] + jnp.log(total), -jnp.inf)
        probs = e / total[..., None]
    out_e = jnp.einsum("b...hgn,bnhe->b...hge", probs, ev, precision=prec)
    lead = q.shape[:-2] + (p.heads,)
    return out_e.reshape(lead + (ev.shape[-1],)), lse_e.reshape(lead)


def _merge_extra(p: NAProblem, q, out, lse, extra_k, extra_v, lengths=None, valid=None):
    """Exact merge of the neighborhood result with dense attention over the extra tokens.
    ``lengths``: per-sample extra-token counts (None: all); ``valid``: bool ``[B, *S]`` of a
    ragged batch (None: all valid), whose padded queries are zeroed before the products and get
    output 0 and lse 0.0."""
    if valid is not None:
        q = jnp.where(valid[..., None, None], q, jnp.zeros((), q.dtype))
    out_e, lse_e = _extra_attention(p, q, extra_k, extra_v, lengths)
    merged, lse_all = merge_attentions([out.astype(jnp.float32), out_e], [lse, lse_e])
    if valid is not None:
        merged = jnp.where(valid[..., None, None], merged, 0.0)
        lse_all = jnp.where(valid[..., None], lse_all, 0.0)
    return merged.astype(q.dtype), lse_all


def run(p: NAProblem, q, k, v, extra_k=None, extra_v=None, valid_extent=None,
        additional_lengths=None):
    """Neighborhood attention on ``p`` -> (out, lse). ``valid_extent`` (int32 ``[B, rank]``)
    and ``additional_lengths`` (int32 ``[B]``, with the extra tokens): a ragged batch (module
    docstring); both unclamped."""
    kp = kernel_problem(p)
    d = kp.head_dim
    out, lse = _na_fused(kp, _pad_head_dim(q, d), _pad_head_dim(k, d), _pad_head_dim(v, d),
                         valid_extent)
    if out.shape[-1] != p.head_dim_v:
        out = out[..., :p.head_dim_v]
    if extra_k is not None:
        valid = None if valid_extent is None else valid_queries(p, valid_extent)
        out, lse = _merge_extra(p, q, out, lse, extra_k, extra_v, additional_lengths, valid)
    elif additional_lengths is not None:
        raise ValueError("additional_lengths needs additional keys and values (extra_k)")
    return out, lse
