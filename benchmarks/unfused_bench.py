"""The paper's Table 3 on our GPU: unfused naive vs GEMM-based kernels, and fused vs GEMM.

  python -m benchmarks.unfused_bench [--dtypes float16,float32] [--impls naive,gemm,fused]
      [--modes fwd,fwd_bwd] [--time-limit-s 240] [--budget-s 1.0] [--reps 10]
      [--fused-config FIELD=VALUE,...] [--out unfused.json] [--md unfused.md] [--quick]
      [--problems name,name] [--no-loop]

A sweep of problems (batch, extents, heads, head_dim, kernel, dilation; ranks 1-3), each in
float16 and float32, forward (``na*d``: qk -> softmax -> av) and forward+backward (the VJP of
q, k, v with a random cotangent). ``naive`` and ``gemm`` are ``na*d(..., backend=...)`` over our
unfused CUDA operators; ``fused`` is ``backend="fused"`` (with --fused-config) where it supports
the problem (else the row says why). Per dtype and mode the summary gives the average / min / max improvement of gemm
over naive (t_naive / t_gemm) and of fused over gemm (t_gemm / t_fused), and the share of
problems where gemm beats naive (the issue's target: >= 90% of the float32 problems).

Problems run in order until ``--time-limit-s`` (measurements after it are recorded as skipped),
so the run ends with its tables inside a GPU job's limit. ``--quick`` runs tiny problems; with
no CUDA kernels (a CPU) it times the pure-JAX reference only, as a smoke test. JSON is rewritten
after every measurement; the markdown tables are printed last.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import statistics  # noqa: E402
from typing import List, Optional  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.harness import calls, cli, results  # noqa: E402
from benchmarks.harness import markdown as md  # noqa: E402
from benchmarks.harness.problems import Problem, make_problem  # noqa: E402
from benchmarks.harness.run import Deadline, error_text, logger  # noqa: E402
from benchmarks.harness.timing import random_inputs, time_jax  # noqa: E402
from natten_jax import _ffi  # noqa: E402

IMPLS = ("naive", "gemm", "fused")
MODES = ("fwd", "fwd_bwd")


def _p(name, batch, spatial, heads, head_dim, kernel, dilation=1) -> Problem:
    r = len(spatial)
    t = lambda v: list(v) if isinstance(v, (tuple, list)) else [v] * r  # noqa: E731
    return make_problem(name, dict(batch=batch, spatial=list(spatial), heads=heads,
                                   head_dim=head_dim, kernel=t(kernel), dilation=t(dilation)))


# The sweep: NAT / DiNAT-like 2-D layers, long 1-D sequences, small videos; small to large
# kernels, with and without dilation.
SWEEP = [  # ranks interleaved, so that a run cut short by its time limit still covers each
    _p("2d_56x56_k7", 8, (56, 56), 4, 32, 7),
    _p("1d_L4096_k7", 4, (4096,), 8, 64, 7),
    _p("3d_8x32x32_k7", 1, (8, 32, 32), 4, 64, (3, 7, 7)),
    _p("2d_64x64_k13", 2, (64, 64), 8, 64, 13),
    _p("1d_L4096_k31_d4", 4, (4096,), 8, 64, 31, 4),
    _p("2d_56x56_k7_d4", 8, (56, 56), 4, 32, 7, 4),
    _p("3d_16x16x16_k5_d2", 2, (16, 16, 16), 4, 32, 5, 2),
    _p("2d_28x28_k7_h8", 8, (28, 28), 8, 32, 7),
    _p("1d_L8192_k63", 2, (8192,), 4, 32, 63),
    _p("2d_64x64_k13_d2", 2, (64, 64), 8, 64, 13, 2),
    _p("2d_128x128_k7_d2", 1, (128, 128), 4, 64, 7, 2),
    _p("2d_32x32_k21", 2, (32, 32), 4, 128, 21),
]
QUICK = [
    _p("q1d", 1, (40,), 2, 16, 5),
    _p("q2d_d2", 1, (12, 10), 2, 16, 3, 2),
    _p("q3d", 1, (4, 5, 6), 2, 16, 3),
]


log = logger("unfused-bench")


def _fn(p: Problem, backend: str, mode: str, config=None):
    fwd = calls.na_fn(p, backend, config)
    return fwd if mode == "fwd" else calls.fwd_bwd(fwd)


def _can_run(p: Problem, impl: str, dtype: str, config=None) -> str:
    """Why ``impl`` cannot run ``p`` ("" if it can)."""
    from natten_jax.backends import fused, unfused_cuda
    from natten_jax.checks import check_na_call

    q, k, v, _ = (jax.ShapeDtypeStruct(s, dtype) for s in p.shapes())
    prob = check_na_call(p.rank, q, k, v, p.kernel, p.stride, p.dilation, p.causal, None,
                         backend_config=config)
    if impl == "reference":
        return ""
    if impl == "fused":
        ok, why = fused.can_run(prob)
        return "" if ok else why
    ok, why = unfused_cuda.can_run(dtype)
    return "" if ok else why


def _ratios(rows, dtype, mode, num, den) -> Optional[dict]:
    """t_num / t_den over the problems where both ran (improvement of `den` over `num`)."""
    by = {}
    for r in rows:
        if r["dtype"] == dtype and r.get(mode, {}).get("ms"):
            by.setdefault(r["problem"], {})[r["impl"]] = r[mode]["ms"]
    vals = [t[num] / t[den] for t in by.values() if num in t and den in t]
    if not vals:
        return None
    return dict(n=len(vals), avg=statistics.mean(vals), min=min(vals), max=max(vals),
                wins=sum(v > 1.0 for v in vals))


def summary(rows, dtypes, modes) -> List[dict]:
    out = []
    for dt in dtypes:
        for m in modes:
            out.append(dict(dtype=dt, mode=m, gemm_over_naive=_ratios(rows, dt, m, "naive", "gemm"),
                            fused_over_gemm=_ratios(rows, dt, m, "gemm", "fused")))
    return out


def _fmt_ratio(r, share=False):
    if r is None:
        return "- | - | - | -" if share else "- | - | -"
    s = f"{r['avg']:.2f}x | {r['min']:.2f}x | {r['max']:.2f}x"
    if share:
        s += f" | {r['wins']}/{r['n']} ({100.0 * r['wins'] / r['n']:.0f}%)"
    return s


def markdown(rep) -> str:
    lines = md.table(["problem", "dtype", "impl", "fwd ms", "fwd+bwd ms"], [])
    for r in rep["rows"]:
        cells = []
        for m in MODES:
            t = r.get(m)
            if t is None:
                cells.append("-")
            elif "ms" in t:
                cells.append(f"{t['ms']:.3f}")
            else:
                cells.append(md.cell(t.get("skipped") or t.get("error", "?")[:60]))
        lines.append(md.row([r["problem"], r["dtype"], r["impl"], *cells]))
    lines += ["", *md.table(["dtype", "mode", "gemm/naive avg", "min", "max", "gemm beats naive",
                             "fused/gemm avg", "min", "max"], [])]
    for s in rep["summary"]:
        lines.append(f"| {s['dtype']} | {s['mode']} | {_fmt_ratio(s['gemm_over_naive'], True)} | "
                     f"{_fmt_ratio(s['fused_over_gemm'])} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="float16,float32")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--problems", default="", help="comma-separated names (default: all)")
    ap.add_argument("--time-limit-s", type=float,
                    default=float(os.environ.get("BENCH_TIME_LIMIT_S", 240)),
                    help="start no new measurement after this many seconds (0: none at all; "
                    "default $BENCH_TIME_LIMIT_S or 240)")
    ap.add_argument("--budget-s", type=float, default=1.0, help="timed seconds per measurement")
    ap.add_argument("--reps", type=int, default=10)
    cli.add_fused_config(ap)
    ap.add_argument("--no-loop", action="store_true",
                    help="per-call wall clock only (default: also a jitted loop of calls, whose "
                         "per-call time amortises dispatch and is the headline)")
    ap.add_argument("--out", default="")
    ap.add_argument("--md", default="")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)

    dtypes = cli.names(args.dtypes, ("float16", "bfloat16", "float32"), "--dtypes")
    modes = cli.names(args.modes, MODES, "--modes")
    impls = cli.names(args.impls, IMPLS + ("reference",), "--impls")
    config = cli.fused_config(args.fused_config)
    problems = QUICK if args.quick else SWEEP
    if args.problems:
        problems = [p for p in problems if p.name in
                    cli.names(args.problems, [p.name for p in problems], "--problems")]
    if args.quick and not _ffi.cuda_kernels_available():
        impls = ["reference"]  # CPU smoke test
        log(f"no CUDA kernels ({_ffi.unavailable_reason()}): timing the reference only")

    rep = dict(env=dict(results.env_info(), impls=impls, quick=args.quick),
               fused_config=cli.config_json(config),
               problems=[p.to_json() for p in problems], rows=[], summary=[])

    def save():
        rep["summary"] = summary(rep["rows"], dtypes, modes)
        results.write_json(args.out, rep)

    deadline = Deadline(args.time_limit_s if args.time_limit_s > 0 else 1e-9)
    for p in problems:
        for dt in dtypes:
            sets = None
            for impl in impls:
                row = dict(problem=p.name, dtype=dt, impl=impl)
                rep["rows"].append(row)
                why = _can_run(p, impl, dt, config)
                for m in modes:
                    if deadline.passed():
                        row[m] = dict(skipped="not run: time limit")
                        continue
                    if why:
                        row[m] = dict(skipped=f"cannot run: {why}"[:200])
                        continue
                    if sets is None:
                        sets = random_inputs(p.shapes(), jnp.dtype(dt), 2, seed=len(rep["rows"]))
                    ins = [s if m == "fwd_bwd" else s[:3] for s in sets]
                    try:
                        t = time_jax(_fn(p, impl, m, config), ins, reps=args.reps,
                                     budget_s=args.budget_s, loop=not args.no_loop,
                                     loop_target_s=0.05)
                        row[m] = dict(ms=t["ms"], ms_call=t["ms_call"], ms_min=t["ms_min"],
                                      ms_max=t["ms_max"], ms_loop=t.get("ms_loop"),
                                      reps=t["reps"], compile_s=t["compile_s"])
                        log(f"{p.name} {dt} {impl} {m}: {t['ms']:.3f} ms")
                    except Exception as e:  # noqa: BLE001 - record it and go on
                        row[m] = dict(error=error_text(e, 400))
                        log(f"{p.name} {dt} {impl} {m}: {row[m]['error']}")
                save()
            del sets
    save()
    text = markdown(rep)
    results.write_text(args.md, text + "\n")
    print(text)
    return rep


if __name__ == "__main__":
    main()
