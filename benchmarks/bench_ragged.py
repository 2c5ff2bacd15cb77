"""The cost of ragged batches (``valid_extent=``, issue 24) on the headline problems.

  python -m benchmarks.bench_ragged [--problems 2d_gen,1d_long] [--reps 15]
      [--fused-config FIELD=VALUE,...] [--out run.json] [--results benchmarks/results/]
      [--quick --backend reference]

Per problem of problems.json (its base problems: 2d_gen, 3d_video, 1d_long, 2d_nat_t), in bf16,
forward and forward+backward (VJP of q, k, v with a random cotangent), the fused backend timed
in these variants (``VARIANTS``):

* ``plain``: no ``valid_extent`` (the problem's batch);
* ``full_extent``: ``valid_extent`` given, every sample at full extent (same batch): the cost of
  the argument itself (issue 24 asks for at most 3%);
* ``ragged_full``: a batch of ``max(2, batch)`` samples, all at full extent, with
  ``valid_extent``;
* ``ragged_half``: the same batch with every other sample half-size on every axis
  (``ceil(extent / 2)``, at least ``kernel * dilation``). Its ideal time is ``ragged_full``'s
  times the share of tokens left (``work_fraction``): tiles outside a sample are skipped, so
  the time should follow the tokens.

The variants of one problem and mode are timed in alternation in one process
(:func:`benchmarks.harness.timing.time_interleaved`: interleaved repetitions, medians), each a
jitted call whose extents are a runtime operand. ``--results`` writes
``ragged-<gpu>.json`` (rows ``{problem, mode, variant, ms, ...}`` and the command line) into the
given folder (or that file), which ``python -m benchmarks.report --docs`` renders into
docs/benchmarks.md (:mod:`benchmarks.results_docs`, kind ``ragged``). ``--quick``: tiny
problems, few repetitions (with ``--backend reference`` it runs on a CPU).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.harness import calls, cli, problems, results  # noqa: E402
from benchmarks.harness.run import Deadline, error_text, logger  # noqa: E402
from benchmarks.harness.timing import random_inputs, time_interleaved  # noqa: E402

VARIANTS = ("plain", "full_extent", "ragged_full", "ragged_half")
MODES = {"fwd": "fwd", "fwd_bwd": "fwdbwd"}  # timing key -> the records' mode
log = logger("ragged")


def half_extent(p: problems.Problem):
    """The half-size sample's extent per axis: ceil(extent / 2), at least kernel * dilation."""
    return tuple(max(-(-s // 2), k * d) for s, k, d in zip(p.spatial, p.kernel, p.dilation))


def plan(p: problems.Problem):
    """{variant: (batch, valid_extent [batch, rank] int32 or None, work_fraction)}."""
    full = np.asarray(p.spatial, np.int32)
    bh = max(2, p.batch)
    ragged = np.tile(full, (bh, 1))
    ragged[1::2] = half_extent(p)
    tokens = np.prod(ragged, axis=1).sum() / (bh * math.prod(p.spatial))
    return {"plain": (p.batch, None, 1.0),
            "full_extent": (p.batch, np.tile(full, (p.batch, 1)), 1.0),
            "ragged_full": (bh, np.tile(full, (bh, 1)), 1.0),
            "ragged_half": (bh, ragged, float(tokens))}


def variant_fn(p: problems.Problem, backend: str, config, with_extent: bool):
    """(q, k, v, ct, valid_extent) -> {mode: array(s)} functions: forward and fwd+bwd."""
    import natten_jax

    na = getattr(natten_jax, f"na{p.rank}d")
    kw = p.na_kwargs()
    if backend == "fused" and config is not None:
        kw["backend_config"] = config

    def fn(ext):
        def f(q, k, v):
            return na(q, k, v, backend=backend, valid_extent=ext if with_extent else None, **kw)
        return f

    fwd = jax.jit(lambda q, k, v, ct, ext: fn(ext)(q, k, v))
    fwd_bwd = jax.jit(lambda q, k, v, ct, ext: calls.fwd_bwd(fn(ext))(q, k, v, ct))
    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def measure_problem(p: problems.Problem, args, dtype) -> list:
    """Rows of one problem: per mode, every variant (timed together)."""
    variants = plan(p)
    inputs = {}
    for name, (batch, ext, _) in variants.items():
        if batch not in inputs:
            shapes = [(batch,) + s[1:] for s in p.shapes()]
            inputs[batch] = random_inputs(shapes, dtype, 1, seed=batch)[0]
    rows = []
    for mode in (("fwd",) if args.fwd_only else ("fwd", "fwd_bwd")):
        timed = {}
        for name, (batch, ext, _) in variants.items():
            f = variant_fn(p, args.backend, args.config, ext is not None)[mode]
            e = None if ext is None else jnp.asarray(ext)
            timed[name] = (lambda f=f, x=inputs[batch], e=e: f(*x, e))
        try:
            stats = time_interleaved(timed, reps=args.reps, sample_s=args.sample_s,
                                     budget_s=args.budget_s)
        except Exception as e:  # noqa: BLE001 - recorded; the run goes on
            log(f"{p.name} {mode}: {error_text(e)}")
            rows += [{"problem": p.name, "mode": MODES[mode], "variant": n,
                      "error": error_text(e)} for n in variants]
            continue
        for name, (batch, ext, frac) in variants.items():
            s = stats[name]
            rows.append({"problem": p.name, "mode": MODES[mode], "variant": name,
                         "ms": round(s["ms"], 5), "batch": batch, "work_fraction": frac,
                         "spread_pct": round(s["spread_pct"], 1), "reps": s["reps"]})
        log(f"{p.name} {mode}: " + ", ".join(f"{n} {stats[n]['ms']:.4g} ms" for n in variants))
    return rows


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", help="comma-separated names (default: the base problems of "
                    "problems.json)")
    ap.add_argument("--backend", default="fused", choices=["fused", "reference"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--reps", type=int, default=15, help="interleaved repetitions")
    ap.add_argument("--sample-s", type=float, default=0.02,
                    help="seconds of back-to-back calls per timed sample")
    ap.add_argument("--budget-s", type=float, default=20.0,
                    help="time budget of one problem and mode's repetitions")
    ap.add_argument("--time-limit-s", type=float, default=220.0,
                    help="start no new problem after this many seconds (0: no limit)")
    cli.add_fused_config(ap)
    ap.add_argument("--out", help="the run's JSON (rows and environment)")
    ap.add_argument("--results", help="write the records here: a folder (ragged-<gpu>.json in "
                    "it, e.g. benchmarks/results/) or a file")
    ap.add_argument("--commit", help="the commit the records name (default: git's)")
    ap.add_argument("--quick", action="store_true", help="tiny problems, 3 repetitions")
    a = ap.parse_args(argv)
    if a.quick:
        a.reps, a.sample_s, a.budget_s = min(a.reps, 3), 0.0, min(a.budget_s, 2.0)
    a.config = cli.fused_config(a.fused_config) if a.backend == "fused" else None
    return a


def base_problems(quick: bool):
    data = problems.QUICK if quick else None
    if data is None:
        import json

        with open(problems.json_path()) as fh:
            data = json.load(fh)
    return [problems.make_problem(n, s) for n, s in data["problems"].items()]


def main(argv=None) -> dict:
    args = parse_args(argv)
    probs = problems.select(base_problems(args.quick), args.problems)
    dtype = jnp.dtype(args.dtype)
    argv_list = sys.argv[1:] if argv is None else list(argv)
    env = results.env_info()
    report = {"env": env, "dtype": args.dtype, "argv": argv_list, "rows": [],
              "fused_config": cli.config_json(args.config) if args.config else None}
    deadline = Deadline(args.time_limit_s)
    log(f"device {env['device']}; problems {[p.name for p in probs]}")
    for p in probs:
        if deadline.passed():
            log(f"{p.name}: not run (time limit)")
            continue
        t0 = time.perf_counter()
        report["rows"] += measure_problem(p, args, dtype)
        log(f"{p.name}: {time.perf_counter() - t0:.1f} s")
        results.write_json(args.out, report)
    if args.results:
        write_results(report, args, argv_list, probs)
    return report


def write_results(report: dict, args, argv_list, probs) -> str:
    """``ragged-<gpu>.json``: the measured rows, the command, the problems (kind ``ragged``)."""
    device = report["env"]["device"]
    path = args.results
    if path.endswith(os.sep) or os.path.isdir(path):
        path = os.path.join(path, f"ragged-{results.device_slug(device)}.json")
    rows = [dict(r, dtype=args.dtype) for r in report["rows"] if "ms" in r]
    measured = {r["problem"] for r in rows}
    data = {"device": device, "commit": args.commit or results.git_commit(),
            "date": results.now()[:10], "kind": "ragged",
            "command": shlex.join(["python", "-m", "benchmarks.bench_ragged", *argv_list]),
            "about": (f"{args.backend} backend, {args.dtype}; variants timed in alternation in "
                      f"one process ({args.reps} interleaved repetitions, medians of samples "
                      f"of back-to-back calls)."),
            "problems": {p.name: (f"batch {p.batch} (ragged batch {max(2, p.batch)}), "
                                  f"extents {tuple(p.spatial)}, kernel {tuple(p.kernel)}, "
                                  f"heads {p.heads}, head dim {p.head_dim}; half-size samples "
                                  f"{half_extent(p)}")
                         for p in probs if p.name in measured},
            "rows": rows}
    results.write_json(path, data)
    log(f"{len(rows)} rows written to {path}")
    return path


if __name__ == "__main__":
    main()
