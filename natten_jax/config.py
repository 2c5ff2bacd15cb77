"""Configuration of the fused CUDA backend, as a value.

A :class:`FusedConfig` names the kernels the fused backend runs: which forward and backward
implementation, which backward (the kernels or the reference's VJP), the forward Q tile, the
head-dim-32 forward's occupancy, and how tile shapes are chosen (cost model or auto-tuner, and
where the tuner keeps its cache). Pass one as ``backend_config=`` to ``natten_jax.na1d`` /
``na2d`` / ``na3d`` (and the Flax modules and models)::

    cfg = natten_jax.FusedConfig(forward_impl="sm80", autotune="on")
    out = natten_jax.na2d(q, k, v, 7, backend_config=cfg)

The config is a frozen, hashable dataclass and becomes part of the static problem description
(:class:`natten_jax.checks.NAProblem`), so ``jax.jit`` traces a function again for a different
config and the auto-tuner keys its cache entries by the fields that change which kernel runs.
A traced function keeps the config it was traced with: the kernel that runs is always the one
its config names.

``backend_config=None`` means :func:`default_config`: every field at its default, or at the
value of its environment variable (table below). The variables are read here only, once per
process at the first call (:func:`reset_default_config` forgets the cached value); an invalid
value raises ``ValueError`` naming the variable. Values are case-insensitive and surrounding
spaces are ignored; an empty variable counts as unset.

=================  ==============================  =========================================
field              environment variable            values (default first)
=================  ==============================  =========================================
forward_impl       ``NATTEN_JAX_FNA_IMPL``         ``auto``, ``sm80``, ``sm90``
backward_impl      ``NATTEN_JAX_FNA_BWD_IMPL``     ``auto``, ``sm80``, ``sm90``
backward           ``NATTEN_JAX_FUSED_BACKWARD``   ``kernel``, ``reference``
autotune           ``NATTEN_JAX_AUTOTUNE``         ``off``, ``on``, ``thorough``
q_tile             ``NATTEN_JAX_FNA_Q_TILE``       unset (None), ``64``, ``128``
sm80_occupancy     ``NATTEN_JAX_FNA_SM80_OCC``     unset (None), ``4``, ``5``, ``6``
cache_dir          ``NATTEN_JAX_CACHE_DIR``        unset (None: ``~/.cache/natten_jax``), a path
=================  ==============================  =========================================

This module depends on the standard library only; it is the one module of natten_jax that reads
``os.environ``.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import threading
from typing import Mapping, Optional

# Kernel implementations of the fused forward and backward (the FFI attribute ``impl`` is the
# index into KERNEL_IMPLS, natten_jax.tiles.impl_code).
KERNEL_IMPLS = ("sm80", "sm90")
IMPL_SETTINGS = ("auto",) + KERNEL_IMPLS
BACKWARDS = ("kernel", "reference")
AUTOTUNE_MODES = ("off", "on", "thorough")
Q_TILES = (64, 128)
SM80_OCCUPANCIES = (4, 5, 6)

# Field -> the environment variable that sets its default.
ENV_VARS = {
    "forward_impl": "NATTEN_JAX_FNA_IMPL",
    "backward_impl": "NATTEN_JAX_FNA_BWD_IMPL",
    "backward": "NATTEN_JAX_FUSED_BACKWARD",
    "autotune": "NATTEN_JAX_AUTOTUNE",
    "q_tile": "NATTEN_JAX_FNA_Q_TILE",
    "sm80_occupancy": "NATTEN_JAX_FNA_SM80_OCC",
    "cache_dir": "NATTEN_JAX_CACHE_DIR",
}

_CHOICES = {
    "forward_impl": IMPL_SETTINGS,
    "backward_impl": IMPL_SETTINGS,
    "backward": BACKWARDS,
    "autotune": AUTOTUNE_MODES,
}
_OPTIONAL_INTS = {"q_tile": Q_TILES, "sm80_occupancy": SM80_OCCUPANCIES}


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)  # numpy ints count


@dataclasses.dataclass(frozen=True)
class FusedConfig:
    """Configuration of the fused CUDA backend: a hashable value (see the module docstring).

    Attributes:
      forward_impl: the forward kernel. ``"auto"`` (default): the Hopper wgmma kernel
        (``sm90``) where it runs (compute capability 9.0, a module built for sm_90a, head dims
        64 and 128) and the cost model prefers it, else the mma.sync kernel (``sm80``, every GPU
        from sm_80 on); with ``autotune`` on, both are timed and the faster is kept. ``"sm80"``
        or ``"sm90"`` force one (``sm90`` at a head dim it lacks runs ``sm80``). Default from
        ``NATTEN_JAX_FNA_IMPL``.
      backward_impl: the backward kernels (dQ and dK/dV). ``"auto"`` (default): ``sm90`` where
        it runs (as above), else ``sm80``; ``"sm80"`` / ``"sm90"`` force one (``sm90`` at a
        head dim it lacks runs ``sm80``). Default from ``NATTEN_JAX_FNA_BWD_IMPL``.
      backward: the VJP. ``"kernel"`` (default): the fused backward kernels, deterministic;
        ``"reference"``: the reference backend's VJP, recomputed (slow; for debugging). Default
        from ``NATTEN_JAX_FUSED_BACKWARD``.
      autotune: how tile shapes are chosen. ``"off"`` (default): the cost model
        (:func:`natten_jax.tiles.choose_tiles`), nothing is timed; ``"on"``: the cost model's
        best few candidates are timed on the device at trace time and the fastest is cached on
        disk; ``"thorough"``: every legal candidate is timed (:mod:`natten_jax.autotune`).
        Default from ``NATTEN_JAX_AUTOTUNE``.
      q_tile: the forward kernel's Q tile in tokens, ``64`` or ``128``; ``None`` (default): the
        cost model (or the tuner) picks either. The backward kernels always take 64, and so
        does the forward on float32 inputs (its TF32 kernels; with ``128`` there the fused
        backend refuses the call: ``backend="fused"`` raises, ``None`` runs the reference). Default from ``NATTEN_JAX_FNA_Q_TILE``.
      sm80_occupancy: CTAs per SM the register budget of the head-dim-32 ``sm80`` forward with
        64-token Q tiles aims at, ``4``, ``5`` or ``6`` (5 and 6 spill registers); ``None``
        (default): the kernel's default (4). Other kernels ignore it. Default from
        ``NATTEN_JAX_FNA_SM80_OCC``.
      cache_dir: the directory of the auto-tuner's cache file; ``None`` (default):
        ``~/.cache/natten_jax``. A ``str`` (a path-like is converted). Default from
        ``NATTEN_JAX_CACHE_DIR``.

    Every field is validated on construction: a bad value raises ``ValueError`` naming the
    field and the value.
    """

    forward_impl: str = "auto"
    backward_impl: str = "auto"
    backward: str = "kernel"
    autotune: str = "off"
    q_tile: Optional[int] = None
    sm80_occupancy: Optional[int] = None
    cache_dir: Optional[str] = None

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(
                    f"FusedConfig `{name}` must be one of {allowed}, got {value!r}.")
        for name, allowed in _OPTIONAL_INTS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if not _is_int(value) or int(value) not in allowed:
                raise ValueError(
                    f"FusedConfig `{name}` must be None or one of {allowed}, got {value!r}.")
            object.__setattr__(self, name, int(value))  # numpy ints hash as Python ints
        d = self.cache_dir
        if d is not None:
            if isinstance(d, os.PathLike):
                d = os.fspath(d)
            if not isinstance(d, str) or not d.strip():
                raise ValueError(
                    f"FusedConfig `cache_dir` must be None or a non-empty path, got {d!r}.")
            object.__setattr__(self, "cache_dir", d)

    def replace(self, **changes) -> "FusedConfig":
        """A copy with ``changes`` applied (``dataclasses.replace``), validated again."""
        return dataclasses.replace(self, **changes)


def config_from_env(environ: Mapping[str, str]) -> FusedConfig:
    """The :class:`FusedConfig` whose fields take their values from ``environ`` (the variables
    of :data:`ENV_VARS`; unset or empty: the field's default). Raises ``ValueError`` naming the
    variable for a value its field does not accept."""
    values = {}
    for name, var in ENV_VARS.items():
        raw = environ.get(var)
        if raw is None or not raw.strip():
            continue
        text = raw.strip()
        if name == "cache_dir":
            values[name] = text
        elif name in _CHOICES:
            allowed = _CHOICES[name]
            if text.lower() not in allowed:
                raise ValueError(f"{var} must be one of {allowed} (or unset), got {raw!r}.")
            values[name] = text.lower()
        else:
            allowed = _OPTIONAL_INTS[name]
            if text not in tuple(str(a) for a in allowed):
                raise ValueError(f"{var} must be one of {allowed} (or unset), got {raw!r}.")
            values[name] = int(text)
    return FusedConfig(**values)


_lock = threading.Lock()
_default: Optional[FusedConfig] = None


def default_config() -> FusedConfig:
    """The config ``backend_config=None`` stands for: :func:`config_from_env` of the process
    environment, read at the first call and cached (:func:`reset_default_config`)."""
    global _default
    with _lock:
        if _default is None:
            _default = config_from_env(os.environ)
        return _default


def reset_default_config() -> None:
    """Forget the cached :func:`default_config`: the next call reads the environment again.
    (For tests; functions already traced keep the config they were traced with.)"""
    global _default
    with _lock:
        _default = None
