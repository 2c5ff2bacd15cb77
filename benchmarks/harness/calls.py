"""The functions the benchmarks time: natten_jax's neighborhood attention on a problem, with the
fused backend's configuration passed as a value (never through the environment), and its
forward+backward; and their inputs."""

from __future__ import annotations

import math
from typing import Callable

from benchmarks.harness.problems import Problem
from benchmarks.harness.run import error_text
from benchmarks.harness.timing import random_inputs, time_jax


def na_fn(p: Problem, backend: str, config=None, precision=None) -> Callable:
    """(q, k, v) -> out of ``natten_jax.na{rank}d`` on ``p`` with ``backend``; for the fused
    backend, ``config`` (a ``natten_jax.FusedConfig``; None: the default) is passed as
    ``backend_config=`` (the other backends take none); ``precision`` (None: JAX's default
    matmul precision when traced) as ``precision=``."""
    import natten_jax

    na = getattr(natten_jax, f"na{p.rank}d")
    kw = p.na_kwargs()
    if backend == "fused" and config is not None:
        kw["backend_config"] = config
    if precision is not None:
        kw["precision"] = precision

    def f(q, k, v):
        return na(q, k, v, backend=backend, **kw)

    return f


def fwd_bwd(fn: Callable) -> Callable:
    """(q, k, v, ct) -> (dq, dk, dv): the forward plus the VJP of sum(out * ct)."""
    import jax

    def g(q, k, v, ct):
        _, vjp = jax.vjp(fn, q, k, v)
        return vjp(ct)

    return g


def input_sets(p: Problem, dtype, seed: int = 0, max_bytes_for_three: float = 2e9):
    """Sets of (q, k, v, ct) of ``p`` (standard normal in ``dtype``): three, or two when three
    would take more than ``max_bytes_for_three`` bytes."""
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype)
    set_bytes = sum(math.prod(s) for s in p.shapes()) * dtype.itemsize
    return random_inputs(p.shapes(), dtype, 3 if set_bytes < max_bytes_for_three else 2, seed)


def measure(fn: Callable, sets, reps: int, budget_s: float, loop: bool = True,
            fwd_only: bool = False) -> dict:
    """{"fwd": timing, "fwd_bwd": timing} of ``fn`` (q, k, v) -> out on ``sets`` of
    (q, k, v, ct), each timing :func:`benchmarks.harness.timing.time_jax`'s dict or
    ``{"error": ...}`` when it failed; no "fwd_bwd" when ``fwd_only``."""
    out = {}
    modes = [("fwd", lambda q, k, v, ct: fn(q, k, v))]
    if not fwd_only:
        modes.append(("fwd_bwd", fwd_bwd(fn)))
    for mode, f in modes:
        try:
            out[mode] = time_jax(f, sets, reps, budget_s, loop=loop)
        except Exception as e:  # noqa: BLE001 - recorded in the row; the run goes on
            out[mode] = {"error": error_text(e)}
    return out
