"""Median times of the headline problems through the public API (default backend), for A/B runs.

Uses only ``natten_jax.na1d/na2d/na3d(q, k, v, kernel_size, stride, dilation, is_causal)``, so
the same script times any natten_jax tree: put the tree first on PYTHONPATH.

    PYTHONPATH=<tree> python3 scripts/headline_times.py --out times.json [--problems 2d_gen ...]
        [--modes fwd]

Problems: benchmarks/problems.json of this checkout (the four problems and their variants) and
benchmarks/problems-anchors.json (NATTEN's showcase problems and their block-dense gna variants).
Forward: a jitted call; forward+backward: jax.grad of sum(out * g) w.r.t. q, k, v. Each time is
the median over `--reps` timed batches of `--iters` calls (after a warm-up), bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def problems(*paths):
    out = {}
    for path in paths:
        if not os.path.exists(path):  # an older tree without the anchors file
            continue
        spec = json.load(open(path))
        out.update({name: dict(p) for name, p in spec["problems"].items()})
        for variant, per in spec.get("variants", {}).items():
            for name, extra in per.items():
                out[f"{name}_{variant}"] = {**spec["problems"][name], **extra}
    return out


def timed(fn, args, iters, reps):
    out = fn(*args)
    jax.block_until_ready(out)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / iters * 1e3)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--problems", nargs="*")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--budget-ms", type=float, default=300.0, help="time per timed batch")
    ap.add_argument("--modes", nargs="+", choices=("fwd", "fwdbwd"), default=["fwd", "fwdbwd"],
                    help="forward only saves most of an A/B call of a forward kernel")
    args = ap.parse_args()
    import natten_jax

    bench = os.path.join(HERE, "..", "benchmarks")
    headline = problems(os.path.join(bench, "problems.json"))
    spec = {**headline, **problems(os.path.join(bench, "problems-anchors.json"))}
    names = args.problems or list(headline)
    rows = []
    for name in names:
        p = spec[name]
        rank = len(p["spatial"])
        na = {1: natten_jax.na1d, 2: natten_jax.na2d, 3: natten_jax.na3d}[rank]
        shape = (p["batch"], *p["spatial"], p["heads"], p["head_dim"])
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        q, k, v, g = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in keys)
        kw = dict(kernel_size=tuple(p["kernel"]), stride=tuple(p.get("stride", [1] * rank)),
                  dilation=tuple(p.get("dilation", [1] * rank)),
                  is_causal=tuple(p.get("is_causal", [False] * rank)))
        fwd = jax.jit(lambda q, k, v: na(q, k, v, **kw))
        loss = lambda q, k, v: jnp.sum(na(q, k, v, **kw).astype(jnp.float32) * g)  # noqa: E731
        fwdbwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        for mode, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
            if mode not in args.modes:
                continue
            first = timed(fn, (q, k, v), 1, 1)
            iters = max(1, int(args.budget_ms / max(first, 1e-3)))
            ms = timed(fn, (q, k, v), iters, args.reps)
            rows.append({"problem": name, "mode": mode, "ms": ms, "iters": iters})
            print(f"{name:<18}{mode:<8}{ms:9.4f} ms", flush=True)
    json.dump({"natten_jax": natten_jax.__file__, "device": jax.devices()[0].device_kind,
               "rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
