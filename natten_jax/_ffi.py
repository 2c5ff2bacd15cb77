"""The compiled CUDA kernels (``natten_jax._C``) and their XLA FFI targets.

``natten_jax._C`` is an optional nanobind module; without it (a build with NATTEN_JAX_CUDA=OFF,
or no nvcc at build time) everything here reports the kernels as unavailable and the package
runs its pure-JAX reference backend.

* :func:`cuda_kernels_available` — the module is compiled with CUDA targets, JAX sees a CUDA
  device, and the module holds code for that device's architecture.
* :func:`unavailable_reason` — why not, in words ("" when available).
* :func:`register` — registers every target of ``_C.registrations()`` with
  ``jax.ffi.register_ffi_target(..., platform="CUDA")``, once (later calls are free).
* :func:`window_bounds_cuda` — the device window math (``window.cuh``) for tests.
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


IntOrTuple = Union[int, Sequence[int]]


def _per_axis(name: str, value, rank: int) -> Tuple[int, ...]:
    if isinstance(value, (bool, np.bool_)) or np.ndim(value) == 0:
        return (int(value),) * rank
    out = tuple(int(v) for v in value)
    if len(out) != rank:
        raise ValueError(f"{name} has {len(out)} entries, expected {rank} (one per spatial axis)")
    return out


def window_bounds_cuda(shape: Sequence[int], kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                       dilation: IntOrTuple = 1, is_causal=False):
    """Per query token and axis, its window ``(start, end)`` computed on the GPU by window.cuh.

    Returns an int32 array ``[*shape, rank, 2]``; entry ``[*x, a]`` equals
    ``natten_jax.window.window_bounds(x[a], kernel_size[a], stride[a], dilation[a], shape[a],
    is_causal[a])``. Works eagerly and under ``jax.jit``.
    """
    import jax
    import jax.numpy as jnp

    shape = tuple(int(s) for s in shape)
    rank = len(shape)
    if not 1 <= rank <= 3:
        raise ValueError(f"shape must have 1 to 3 axes, got {shape}")
    attrs = dict(
        kernel_size=np.asarray(_per_axis("kernel_size", kernel_size, rank), np.int64),
        stride=np.asarray(_per_axis("stride", stride, rank), np.int64),
        dilation=np.asarray(_per_axis("dilation", dilation, rank), np.int64),
        is_causal=np.asarray([int(bool(c)) for c in _per_axis("is_causal", is_causal, rank)],
                             np.int64),
    )
    if not register():
        raise RuntimeError(unavailable_reason())
    out_type = jax.ShapeDtypeStruct(shape + (rank, 2), jnp.int32)
    return jax.ffi.ffi_call(WINDOW_BOUNDS_TARGET, out_type)(**attrs)
