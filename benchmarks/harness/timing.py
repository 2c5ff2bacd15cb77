"""Timing: JAX callables (wall clock around block_until_ready, plus a jitted loop that amortises
dispatch), torch CUDA callables (CUDA events), and argument-less calls such as a model's step
(:func:`time_calls`, ahead-of-time compiled under the GPU lock).

:func:`time_jax` and :func:`time_torch` rotate among the given input sets (so repeated calls do
not re-read one set from cache) and cap their repetitions to a time budget. Every helper returns
a dict: ``ms`` (the headline per-call time), ``ms_call`` / ``ms_min`` / ``ms_max`` /
``spread_pct`` (per-call statistics: median, extremes, (max - min) / median), ``reps``,
``compile_s`` and, where known, ``ms_loop``, ``peak_bytes``.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from typing import Callable, List, Optional, Sequence

from benchmarks.harness.gpu_lock import file_lock


def _stats(times_s: Sequence[float]) -> dict:
    med = statistics.median(times_s)
    return dict(ms_call=med * 1e3, ms_min=min(times_s) * 1e3, ms_max=max(times_s) * 1e3,
                spread_pct=100.0 * (max(times_s) - min(times_s)) / med if med > 0 else 0.0,
                reps=len(times_s))


def _warm_up(call: Callable, input_sets: Sequence[tuple], budget_s: float) -> float:
    """One call per input set (fewer when a call is slow); returns the mean seconds per call."""
    t0 = time.perf_counter()
    n = 0
    for s in input_sets:
        call(s)
        n += 1
        if time.perf_counter() - t0 > budget_s / 4:
            break
    return (time.perf_counter() - t0) / n


def random_inputs(shapes, dtype, n_sets: int, seed: int = 0):
    """``n_sets`` tuples of standard-normal JAX arrays of the given shapes (never zeros)."""
    import jax

    key = jax.random.PRNGKey(seed)
    sets = []
    for _ in range(n_sets):
        arrays = []
        for shape in shapes:
            key, sub = jax.random.split(key)
            arrays.append(jax.random.normal(sub, shape, dtype))
        sets.append(tuple(arrays))
    jax.block_until_ready(sets)
    return sets


def jax_peak_bytes() -> Optional[int]:
    """Peak bytes in use on the first device so far (None if the device does not say)."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - some platforms raise instead of returning None
        return None
    return stats.get("peak_bytes_in_use")


def _loop(fn: Callable, iterations: int) -> Callable:
    """(sets, outs) -> (sets, outs), calling ``fn`` on every set ``iterations`` times.

    The outputs are carried (and returned), and an optimization barrier ties the carried inputs
    to them, so XLA can neither drop a call nor hoist it out of the loop as loop-invariant.
    """
    import jax

    def run(sets, outs):
        def body(_, carry):
            sets, _ = carry
            outs = tuple(fn(*s) for s in sets)
            return jax.lax.optimization_barrier((sets, outs))

        return jax.lax.fori_loop(0, iterations, body, (sets, outs))

    return run


def time_jax(fn: Callable, input_sets: Sequence[tuple], reps: int = 20, budget_s: float = 20.0,
             loop: bool = True, loop_target_s: float = 0.05, max_loop_calls: int = 64) -> dict:
    """Time ``fn(*inputs)`` (jitted here): compile, warm up on every set, then per-call runs,
    then (``loop``) a jitted ``fori_loop`` of calls whose time is divided by the calls.

    ``budget_s`` caps the timed part: the repetitions shrink when one call is slow. The
    headline ``ms`` is the loop's per-call time when measured, else the per-call median.
    """
    import jax
    import jax.numpy as jnp

    jf = jax.jit(fn)
    t0 = time.perf_counter()
    jax.block_until_ready(jf(*input_sets[0]))
    compile_s = time.perf_counter() - t0

    est = _warm_up(lambda s: jax.block_until_ready(jf(*s)), input_sets, budget_s)

    n = max(1, min(reps, int(budget_s / max(est, 1e-9))))
    times = []
    for r in range(n):
        s = input_sets[r % len(input_sets)]
        t0 = time.perf_counter()
        jax.block_until_ready(jf(*s))
        times.append(time.perf_counter() - t0)
    res = _stats(times)
    res.update(compile_s=compile_s, ms=res["ms_call"])

    nsets = len(input_sets)
    iterations = max(1, min(max_loop_calls, math.ceil(loop_target_s / max(est, 1e-9))) // nsets)
    loop_runs = 3
    if loop and est * iterations * nsets * (loop_runs + 2) < budget_s:
        try:
            jl = jax.jit(_loop(fn, iterations), donate_argnums=(0, 1))
            sets = jax.tree.map(jnp.copy, tuple(input_sets))
            outs = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                jax.eval_shape(lambda ss: tuple(fn(*x) for x in ss), sets))
            with warnings.catch_warnings():  # CPU cannot donate buffers; harmless
                warnings.simplefilter("ignore")
                carry = jax.block_until_ready(jl(sets, outs))  # compile + warm-up
                loop_times = []
                for _ in range(loop_runs):
                    t0 = time.perf_counter()
                    carry = jax.block_until_ready(jl(*carry))
                    loop_times.append(time.perf_counter() - t0)
            del carry, sets, outs
            res["ms_loop"] = statistics.median(loop_times) * 1e3 / (iterations * nsets)
            res["loop_calls"] = iterations * nsets
            res["ms"] = res["ms_loop"]
        except Exception as e:  # noqa: BLE001 - the per-call numbers still stand
            res["loop_error"] = f"{type(e).__name__}: {e}"[:300]
    res["peak_bytes"] = jax_peak_bytes()
    return res


def time_torch(fn: Callable, input_sets: Sequence[tuple], reps: int = 20,
               budget_s: float = 20.0) -> dict:
    """Time ``fn(*inputs)`` on the current CUDA device with CUDA events (median of ``reps``)."""
    import torch

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn(*input_sets[0])
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0

    def call(s):
        fn(*s)
        torch.cuda.synchronize()

    est = _warm_up(call, input_sets, budget_s)

    n = max(1, min(reps, int(budget_s / max(est, 1e-9))))
    times = []
    for r in range(n):
        s = input_sets[r % len(input_sets)]
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*s)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    res = _stats(times)
    res.update(compile_s=compile_s, ms=res["ms_call"],
               peak_bytes=int(torch.cuda.max_memory_allocated()))
    return res


def time_calls(call: Callable[[], object], reps: int, warmup: int, budget_s: float,
               gpu_lock: Optional[str] = None) -> dict:
    """Compile, ``warmup`` untimed calls, then up to ``reps`` calls each ended by
    ``block_until_ready`` until ``budget_s`` seconds of them; their median and spread.

    ``call`` may have a ``compile()`` method (:class:`benchmarks.harness.aot.Compiled`); then
    the compilation is timed on its own under a shared lock of ``gpu_lock`` (a file), and the
    device calls, from the first to the last, under its exclusive lock: several processes
    compile side by side, and while one of them times, nothing else compiles (XLA's autotuner
    runs candidate kernels on the GPU, and a compilation's threads take the CPU that launches
    the timed process's kernels). Without ``compile()`` the first call compiles (and runs) and
    counts as the first warm-up call. The result also holds what ``compile()`` returned."""
    import jax

    t0 = time.perf_counter()
    info = {}
    aot = hasattr(call, "compile")
    if aot:
        with file_lock(gpu_lock, shared=True):
            t0 = time.perf_counter()
            info = call.compile() or {}
            compile_s = time.perf_counter() - t0
        untimed = max(1, warmup)
    with file_lock(gpu_lock):
        if not aot:
            jax.block_until_ready(call())
            compile_s = time.perf_counter() - t0
            untimed = max(0, warmup - 1)
        for _ in range(untimed):
            jax.block_until_ready(call())
        times: List[float] = []
        while len(times) < max(1, reps):
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            times.append(time.perf_counter() - t0)
            if sum(times) > budget_s:
                break
    res = _stats(times)
    res.update(ms=res["ms_call"], compile_s=compile_s, **info)
    return res


def time_interleaved(calls: dict, reps: int = 15, sample_s: float = 0.02,
                     budget_s: float = 30.0) -> dict:
    """Time several argument-less calls (``{name: call}``, each returning JAX arrays) in
    alternation: every repetition times each call once, in turn, so that clock and thermal
    drift affect all alike. One timed sample is ``n`` back-to-back calls (dispatch overlaps the
    kernels) ended by ``block_until_ready``, ``n`` sized so a sample takes about ``sample_s``.
    Each call is run once first (compile, warm-up). Returns ``{name: stats}`` (``ms``: median
    per call, plus :func:`_stats`' fields and ``calls_per_sample``); repetitions stop early
    once ``budget_s`` is spent (at least 3 are taken)."""
    import jax

    per_call, n_of = {}, {}
    for name, call in calls.items():
        jax.block_until_ready(call())
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        per_call[name] = time.perf_counter() - t0
        n_of[name] = max(1, min(64, int(sample_s / max(per_call[name], 1e-6))))
    samples = {name: [] for name in calls}
    t_start = time.perf_counter()
    for r in range(reps):
        for name, call in calls.items():
            n = n_of[name]
            t0 = time.perf_counter()
            for _ in range(n - 1):
                call()
            jax.block_until_ready(call())
            samples[name].append((time.perf_counter() - t0) / n)
        if r >= 2 and time.perf_counter() - t_start > budget_s:
            break
    out = {}
    for name, times in samples.items():
        st = _stats(times)
        st.update(ms=st["ms_call"], calls_per_sample=n_of[name])
        out[name] = st
    return out
