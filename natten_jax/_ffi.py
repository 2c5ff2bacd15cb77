"""The compiled CUDA kernels (``natten_jax._C``) and their XLA FFI targets.

``natten_jax._C`` is an optional nanobind module; without it (a build with NATTEN_JAX_CUDA=OFF,
or no nvcc at build time) everything here reports the kernels as unavailable and the package
runs its pure-JAX reference backend.

* :func:`cuda_kernels_available` — the module is compiled with CUDA targets, JAX sees a CUDA
  device, and the module holds code for that device's architecture.
* :func:`unavailable_reason` — why not, in words ("" when available).
* :func:`register` — registers every target of ``_C.registrations()`` with
  ``jax.ffi.register_ffi_target(..., platform="CUDA")``, once (later calls are free).
* :func:`call_platform` — where a call on given arrays runs (``"cuda"``, ``"cpu"``, ...): the
  backends' ``can_run`` refuse the kernels unless it is ``"cuda"``.
* :func:`batched_call` — the one wrapper of every kernel's ``ffi_call`` (fused and unfused):
  vmap folds the mapped axis into the batch, and with several devices the call is partitioned
  over batch and heads (:mod:`natten_jax.sharding`).
* :func:`window_bounds_cuda` — the device window math and neighborhood policy (``window.cuh``,
  ``neighborhood.cuh``) for tests.
"""

from __future__ import annotations

import functools
import threading
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

_IMPORT_ERROR: Optional[str] = None  # set when the module exists but fails to load
try:  # the compiled module is optional
    import natten_jax._C as _C  # type: ignore[import-not-found]
except ModuleNotFoundError as e:
    _C = None
    if e.name != "natten_jax._C":  # the module is there but something it needs is not
        _IMPORT_ERROR = f"{type(e).__name__}: {e}"
except ImportError as e:  # built but cannot load (e.g. an undefined symbol)
    _C = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"

WINDOW_BOUNDS_TARGET = "natten_jax_window_bounds"

INT32_MAX = 2**31 - 1
GRID_YZ_MAX = 65535  # CUDA's limit on gridDim.y and gridDim.z

_lock = threading.Lock()
_registered = False


def module_available() -> bool:
    """Whether ``natten_jax._C`` imported (it exists only in CUDA builds)."""
    return _C is not None


def registrations() -> Dict[str, object]:
    """Target name -> PyCapsule of every FFI handler in the compiled module ({} without it)."""
    return dict(_C.registrations()) if _C is not None else {}


def cuda_compiled_archs() -> Tuple[str, ...]:
    """CUDA architectures the module was compiled for, e.g. ('80', '90a'); () without it."""
    if _C is None:
        return ()
    return tuple(a for a in _C.cuda_compiled_archs().split(",") if a)


def _arch_runs_on(arch: str, major: int, minor: int) -> bool:
    """Whether code built for CMake architecture ``arch`` runs on compute capability major.minor.

    ``90a`` (architecture-specific) runs only on 9.0; ``80-real`` (SASS only) on 8.x >= 8.0;
    ``80`` / ``80-virtual`` (with PTX) on anything >= 8.0.
    """
    a = arch.strip().lower()
    kind = "both"
    if a.endswith("-real"):
        a, kind = a[: -len("-real")], "real"
    elif a.endswith("-virtual"):
        a, kind = a[: -len("-virtual")], "virtual"
    specific = a.endswith(("a", "f"))
    digits = a.rstrip("af")
    if not digits.isdigit():
        return False
    num = int(digits)
    a_major, a_minor = num // 10, num % 10
    cc = major * 10 + minor
    if specific:
        if a.endswith("a"):
            return (major, minor) == (a_major, a_minor)
        return major == a_major and cc >= num  # family-specific ("f")
    if kind == "real":
        return major == a_major and cc >= num
    return cc >= num


def _cuda_devices():
    import jax

    try:
        devices = jax.devices("gpu")
    except RuntimeError:  # no GPU backend
        return []
    # A ROCm GPU is a "gpu" too; its client names ROCm in the platform version.
    return [d for d in devices if "rocm" not in str(d.client.platform_version).lower()]


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str:
    """Why the CUDA kernels cannot run here ("" when :func:`cuda_kernels_available`)."""
    if _C is None:
        if _IMPORT_ERROR:
            return f"natten_jax._C failed to import ({_IMPORT_ERROR})"
        return ("natten_jax was installed without its CUDA kernels (no natten_jax._C; build with "
                "nvcc present, NATTEN_JAX_CUDA=ON)")
    if not registrations():
        return "natten_jax._C holds no FFI targets"
    devices = _cuda_devices()
    if not devices:
        return "JAX sees no CUDA GPU"
    archs = cuda_compiled_archs()
    cc = getattr(devices[0], "compute_capability", None)
    if archs and cc:
        try:
            major, minor = (int(x) for x in str(cc).split(".")[:2])
        except ValueError:
            return ""
        if not any(_arch_runs_on(a, major, minor) for a in archs):
            return (f"natten_jax._C was compiled for CUDA architectures {','.join(archs)}, which "
                    f"cannot run on this GPU (compute capability {cc}); rebuild with "
                    f"NATTEN_JAX_CUDA_ARCHS including it")
    return ""


def cuda_kernels_available() -> bool:
    """The compiled CUDA kernels can run on JAX's GPU here."""
    return unavailable_reason() == ""


def register() -> bool:
    """Registers every FFI target of the compiled module for platform CUDA, exactly once.

    Returns whether the module exists (False: nothing to register).
    """
    global _registered
    if _C is None:
        return False
    if _registered:
        return True
    with _lock:
        if not _registered:
            import jax

            for name, capsule in registrations().items():
                jax.ffi.register_ffi_target(name, capsule, platform="CUDA", api_version=1)
            _registered = True
    return True


# ---------------------------------------------------------------------------------------------
# Placement: where a call runs.


def device_platform(device) -> str:
    """``"cuda"`` for an NVIDIA GPU, ``"rocm"`` for an AMD one, else the device's platform
    (``"cpu"``, ``"tpu"``, ...)."""
    platform = str(getattr(device, "platform", "unknown")).lower()
    if platform not in ("gpu", "cuda", "rocm"):
        return platform
    client = getattr(device, "client", None)
    version = str(getattr(client, "platform_version", "")).lower()
    return "rocm" if platform == "rocm" or "rocm" in version else "cuda"


def default_platform() -> str:
    """The platform of JAX's default device, where computations on uncommitted or traced
    arrays run: the device (or platform name) of a ``jax.default_device`` context or of the
    ``jax_default_device`` config, else the first device of JAX's default backend."""
    import jax

    d = jax.config.jax_default_device
    if d is None:
        return device_platform(jax.devices()[0])
    if isinstance(d, str):  # a platform name ("cpu", "gpu", "cuda", ...)
        try:
            return device_platform(jax.devices(d)[0])
        except RuntimeError:  # no such backend here: JAX will refuse it anyway
            return d.lower()
    return device_platform(d)


def call_platform(*arrays) -> str:
    """The platform a call on ``arrays`` runs on.

    Committed concrete arrays (``jax.device_put`` to a device, or results of computations on
    committed inputs) name their devices' platform; uncommitted arrays, NumPy arrays and
    tracers follow the default device (:func:`default_platform`). Under ``jax.jit`` the
    arrays are tracers and their placement is unknown at trace time, so the default device
    decides: a jitted call on CPU-committed arrays on a GPU host should also run under
    ``jax.default_device(cpu)``. Committed arrays on several platforms give those names
    joined by ``+`` (JAX refuses such a call itself).
    """
    import jax

    platforms = set()
    for x in arrays:
        if x is None or isinstance(x, jax.core.Tracer):
            continue
        try:
            if not x.committed:
                continue
            devices = x.devices()
        except Exception:  # noqa: BLE001 - no jax.Array (NumPy, ShapeDtypeStruct), or deleted
            continue
        platforms |= {device_platform(d) for d in devices}
    if not platforms:
        return default_platform()
    return "+".join(sorted(platforms))


# ---------------------------------------------------------------------------------------------
# The custom calls.


def custom_call(target: str, out_types, attrs):
    """The custom call ``target`` as a function of its operands (under SPMD partitioning, of
    one shard's: local shapes): ``out_types(*operands)`` gives the results' types, ``attrs``
    the attributes. Registers the targets first. (Tests replace it with a CPU stand-in:
    :func:`batched_call` looks it up when called.)"""

    def call(*xs):
        import jax

        register()
        return jax.ffi.ffi_call(target, out_types(*xs))(*xs, **attrs)

    return call


def batched_call(target: str, out_types, attrs, *, n_batched: Optional[int] = None,
                 kinds: Optional[Tuple[Sequence[str], Sequence[str]]] = None,
                 max_batch: int = INT32_MAX):
    """``ffi_call`` of ``target`` whose first ``n_batched`` operands (default: all) and every
    result lead with the batch axis; the other operands have no batch axis (e.g. a bias
    table). Returns a function of the operands returning what ``out_types`` describes (one
    array or a tuple).

    * ``vmap`` folds the mapped axis into the batch (the kernels take one batch axis), at most
      ``max_batch`` batch entries per call (more run as a ``lax.map`` over chunks of the mapped
      axis: the fused kernels put the batch on gridDim.z); a mapped operand without batch axis
      runs one call per mapped entry.
    * ``kinds = (in_kinds, out_kinds)``: the operands' and results' layouts
      (:mod:`natten_jax.sharding`); with several devices the call is then partitioned over
      batch and heads, each device running it on its shard. Without ``kinds``, or on one
      device, it is the plain call (sharded operands are gathered by XLA).
    """
    import jax
    import jax.numpy as jnp

    per_shard = custom_call(target, out_types, attrs)
    if kinds is not None and jax.device_count() > 1:
        from natten_jax import sharding

        per_shard = sharding.partitioned(per_shard, kinds[0], kinds[1], name=target)

    @jax.custom_batching.custom_vmap
    def call(*xs):
        return per_shard(*xs)

    @call.def_vmap
    def _vmap(axis_size, in_batched, *xs):
        nb = len(xs) if n_batched is None else n_batched
        if any(in_batched[nb:]):  # a mapped operand without batch axis: one call per entry
            full = tuple(x if b else jnp.broadcast_to(x, (axis_size,) + x.shape)
                         for x, b in zip(xs, in_batched))
            outs = jax.lax.map(lambda ys: call(*ys), full)
            return outs, jax.tree.map(lambda _: True, outs)
        lead = [x if b else jnp.broadcast_to(x, (axis_size,) + x.shape)
                for x, b in zip(xs[:nb], in_batched[:nb])]
        per_call = max(1, max_batch // max(1, lead[0].shape[1]))  # mapped entries per call
        if axis_size > per_call:  # chunks of per_call entries, each folded (this rule again)
            outs = jax.lax.map(lambda ys: call(*ys, *xs[nb:]), tuple(lead), batch_size=per_call)
            return outs, jax.tree.map(lambda _: True, outs)
        folded = [x.reshape((axis_size * x.shape[1],) + x.shape[2:]) for x in lead]
        outs = call(*folded, *xs[nb:])
        outs = jax.tree.map(lambda o: o.reshape((axis_size, -1) + o.shape[1:]), outs)
        return outs, jax.tree.map(lambda _: True, outs)

    return call


IntOrTuple = Union[int, Sequence[int]]


def _per_axis(name: str, value, rank: int) -> Tuple[int, ...]:
    if isinstance(value, (bool, np.bool_)) or np.ndim(value) == 0:
        return (int(value),) * rank
    out = tuple(int(v) for v in value)
    if len(out) != rank:
        raise ValueError(f"{name} has {len(out)} entries, expected {rank} (one per spatial axis)")
    return out


def window_bounds_cuda(shape: Sequence[int], kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                       dilation: IntOrTuple = 1, is_causal=False, tile_log2: IntOrTuple = 0):
    """Per token and axis, what the device's neighborhood policy answers, computed on the GPU.

    Returns an int32 array ``[*shape, rank, 8]``; for the token at ``x`` on axis ``a`` (in-group
    indices ``i = x[a] // dilation[a]`` of the group of ``g = x[a] % dilation[a]``, ``Lg`` tokens,
    and ``W = natten_jax.window``):

    * ``[..., a, 0:2]``: ``W.window_bounds(x[a], kernel_size[a], stride[a], dilation[a],
      shape[a], is_causal[a])``, the token's window (window.cuh);
    * ``[..., a, 2:4]``: ``W.inverse_window(i, i, kernel_size[a], stride[a], Lg, is_causal[a])``,
      the queries that see the token as a key (neighborhood.cuh's inverse neighborhood);
    * ``[..., a, 4:6]`` and ``[..., a, 6:8]``: ``W.tile_union`` and ``W.tile_intersection`` of
      the query tile that holds the token: ``2 ** tile_log2[a]`` in-group tokens per axis
      (0 to 16), tiles from in-group index 0, the last one clipped to the group.

    Works eagerly and under ``jax.jit``.
    """
    import jax
    import jax.numpy as jnp

    shape = tuple(int(s) for s in shape)
    rank = len(shape)
    if not 1 <= rank <= 3:
        raise ValueError(f"shape must have 1 to 3 axes, got {shape}")
    tiles = _per_axis("tile_log2", tile_log2, rank)
    if not all(0 <= t <= 16 for t in tiles):
        raise ValueError(f"tile_log2 must lie in [0, 16] on every axis, got {tiles}")
    attrs = dict(
        kernel_size=np.asarray(_per_axis("kernel_size", kernel_size, rank), np.int64),
        stride=np.asarray(_per_axis("stride", stride, rank), np.int64),
        dilation=np.asarray(_per_axis("dilation", dilation, rank), np.int64),
        is_causal=np.asarray([int(bool(c)) for c in _per_axis("is_causal", is_causal, rank)],
                             np.int64),
        tile_log2=np.asarray(tiles, np.int64),
    )
    if not register():
        raise RuntimeError(unavailable_reason())
    out_type = jax.ShapeDtypeStruct(shape + (rank, 8), jnp.int32)
    return jax.ffi.ffi_call(WINDOW_BOUNDS_TARGET, out_type)(**attrs)
