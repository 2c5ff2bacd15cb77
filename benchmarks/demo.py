"""natten_jax demo: 2-D neighborhood attention with the fastest backend available here.

On a GPU with the compiled kernels it runs the headline problem (default 2d_gen: 128x128 tokens,
24 heads, 31x31 window, bf16) on our fused kernel; elsewhere a small problem on the reference
backend. Either way it first checks the chosen backend against the float64 reference on a small
problem, then times it and prints one line per measurement.

    python -m benchmarks.demo [--problem 2d_gen] [--backend fused|reference]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import natten_jax
from benchmarks.harness import flops, problems as problem_set
from benchmarks.harness.calls import na_fn
from benchmarks.harness.timing import time_jax
from natten_jax import _ffi


def _inputs(key, batch, spatial, heads, heads_kv, dim, dtype):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (batch, *spatial, heads, dim), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, *spatial, heads_kv, dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, *spatial, heads_kv, dim), jnp.float32).astype(dtype)
    return q, k, v


def _check(backend, dtype):
    """Relative error of ``backend`` against the float64 reference on a small problem."""
    q, k, v = _inputs(jax.random.PRNGKey(0), 2, (19, 23), 4, 2, 64, dtype)
    out = natten_jax.na2d(q, k, v, (7, 5), dilation=(2, 1), is_causal=(False, True),
                          backend=backend)
    f64 = jax.config.read("jax_enable_x64")
    ref_dtype = jnp.float64 if f64 else jnp.float32
    ref = natten_jax.na2d(q.astype(ref_dtype), k.astype(ref_dtype), v.astype(ref_dtype), (7, 5),
                          dilation=(2, 1), is_causal=(False, True), backend="reference")
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problem", default=None, help="a problem of benchmarks/problems.json")
    ap.add_argument("--backend", default=None, choices=["fused", "reference"])
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args(argv)

    jax.config.update("jax_enable_x64", True)
    gpu = _ffi.cuda_kernels_available()
    backend = a.backend or ("fused" if gpu else "reference")
    print(f"natten_jax {natten_jax.__version__} on {jax.devices()[0].device_kind}; "
          f"backend {backend}" + ("" if gpu else f" (CUDA kernels: {_ffi.unavailable_reason()})"))

    dtype = jnp.bfloat16 if backend == "fused" else jnp.float32
    err = _check(backend, dtype)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    print(f"check vs float64 reference: relative error {err:.2e} "
          f"({'ok' if err < tol else 'FAILED'}, tolerance {tol:g})")

    name = a.problem or ("2d_gen" if backend == "fused" else None)
    if name:
        p = {x.name: x for x in problem_set.load()}[name]
    else:  # a CPU-sized 2-D problem
        p = problem_set.Problem(name="2d_small", batch=1, heads=4, heads_kv=4, spatial=(32, 32),
                                kernel=(7, 7), dilation=(1, 1), stride=(1, 1),
                                causal=(False, False), head_dim=64)
    inputs = _inputs(jax.random.PRNGKey(1), p.batch, p.spatial, p.heads, p.heads_kv, p.head_dim,
                     dtype)
    ms = time_jax(na_fn(p, backend), [inputs], reps=a.reps, loop=False)["ms_call"]
    tflops = flops.useful_flops(p) / (ms * 1e-3) / 1e12
    print(f"{p.name}: batch {p.batch}, spatial {p.spatial}, heads {p.heads}/{p.heads_kv}, "
          f"head_dim {p.head_dim}, kernel {p.kernel}, {jnp.dtype(dtype).name}")
    print(f"| problem | backend | ms (median of {a.reps}) | useful TFLOP/s |")
    print("|---|---|---|---|")
    print(f"| {p.name} | {backend} | {ms:.3f} | {tflops:.3g} |")
    return 0 if err < tol else 1


if __name__ == "__main__":
    raise SystemExit(main())
