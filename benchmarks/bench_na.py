"""Benchmark natten_jax's backends against peers on the problems of problems.json.

  python -m benchmarks.bench_na [--problems 2d_gen,3d_video] [--backends fused,reference]
      [--peers cudnn,flex,xla] [--dtype bfloat16] [--precision default,highest] [--fwd-only]
      [--reps N]
      [--fused-config FIELD=VALUE,...] [--out bench.json] [--md bench.md]
      [--results benchmarks/results/] [--quick]

Per problem and implementation: forward time, and forward+backward time (VJP of q, k, v with a
random cotangent) unless --fwd-only; the work model of benchmarks.harness.flops (useful work,
visited work, % of the floor).

Our implementations: ``fused`` (the fused backend with --fused-config), ``fused_sm80`` /
``fused_sm90`` / ``fused_sm90_bwd`` (the same with those kernels: FUSED_VARIANTS), and
``reference``. Order: one pass over the problems (base, then dilated / causal variants, then GQA
variants) per implementation: ours fused first, cuDNN, XLA, flex, then the reference backend
(skipped on problems over REFERENCE_AUTO_MAX_FLOPS unless --backends names it); the table
groups rows by problem. Each measurement has a time budget (--budget-s), and the run starts
nothing new after --time-limit-s (default 300 s, or $BENCH_TIME_LIMIT_S) so that it ends with a
table inside a GPU job's limit. A failing implementation is recorded with its error and the run
goes on. JSON is rewritten after every measurement; the markdown table is printed last.
``--results`` merges the measured times into the records the docs' tables are generated from
(benchmarks.harness.results).

float32 (``--dtype float32``): every row is measured at each precision of ``--precision``
(``default``: TF32 products, ``highest``: float32-accurate; natten_jax.precision), ours through
``precision=`` and every row under ``jax.default_matmul_precision`` of that name (the XLA dense
peer follows it; cuDNN's fused attention has no float32 and records why). Rows carry ``dtype``
and, in float32, ``precision``.
"""

from __future__ import annotations

import os

# Before JAX loads: do not grab 75% of the GPU, torch (flex peer, a child process) needs room.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from benchmarks import peers  # noqa: E402
from benchmarks.harness import calls, cli, flops, problems, results  # noqa: E402
from benchmarks.harness import markdown as md  # noqa: E402
from benchmarks.harness.run import Deadline, error_text, logger  # noqa: E402

# Our rows that are the fused backend with some kernels named: --fused-config with these
# fields replaced, timed side by side in one run.
FUSED_VARIANTS = {
    "fused_sm80": {"forward_impl": "sm80", "backward_impl": "sm80"},
    "fused_sm90": {"forward_impl": "sm90"},
    "fused_sm90_bwd": {"forward_impl": "sm90", "backward_impl": "sm90"},
}
BACKENDS = ("fused", *FUSED_VARIANTS, "reference")
PEERS = ("cudnn", "flex", "xla")
PRECISIONS = ("default", "highest")  # of float32 rows (--precision)
JOB_ORDER = (("ours", "fused"), *(("ours", n) for n in FUSED_VARIANTS), ("peer", "cudnn"),
             ("peer", "xla"), ("peer", "flex"), ("ours", "reference"))
REFERENCE_AUTO_MAX_FLOPS = 2e10
log = logger("bench")


def fused_config(name: str, base):
    """The fused backend's config of our row ``name`` (None for the reference backend)."""
    if name == "reference":
        return None
    return base.replace(**FUSED_VARIANTS.get(name, {}))


def ours_fn(p: problems.Problem, name: str, base_config=None, precision=None):
    """(q, k, v) -> out of our row ``name`` (a name of BACKENDS) on ``p``; ``base_config``:
    the fused config the fused rows start from (None: natten_jax's default); ``precision``:
    natten_jax's ``precision=`` (None: JAX's default when traced)."""
    if name == "reference":
        return calls.na_fn(p, "reference", precision=precision)
    if base_config is None:
        from natten_jax.config import default_config

        base_config = default_config()
    return calls.na_fn(p, "fused", fused_config(name, base_config), precision)


# ---------------------------------------------------------------------------------- reporting
def _cell_note(row) -> str:
    notes = []
    for mode in ("fwd", "fwd_bwd"):
        err = (row.get(mode) or {}).get("error")
        if err and err[:80] not in notes:
            notes.append(err[:80])
    if "skipped" in row:
        notes.append(row["skipped"][:100])
    return md.cell("; ".join(notes))


def markdown(report: dict) -> str:
    e, c = report["env"], report["constants"]
    lines = [
        f"# natten_jax benchmark ({e['device']}, {report['dtype']}, {e['date']})",
        "",
        f"jax {e['jax']}, torch {e['torch']}. Times are ms per call (jitted loop of calls, "
        "dispatch amortised, when measured; else median wall time of single calls; torch: CUDA "
        "events). "
        "Useful work = 4*B*H*sum(#neighbors)*D; fwd+bwd counts the backward as "
        f"{c['bwd_factor']}x the forward. Floor (H100 figures) = max(work / "
        f"{c['peak_tflops']:.0f} TFLOP/s, bytes of Q,K,V,O once (3x for fwd+bwd) / "
        f"{c['peak_tbps']:.1f} TB/s); % floor = floor / time. Visited TFLOP/s counts the work "
        "the fused kernel's tiles really do.",
        "",
    ]
    rows = []
    for r in report["rows"]:
        f, b = r.get("fwd") or {}, r.get("fwd_bwd") or {}
        impl = r["impl"] + (f" ({r['precision']})" if r.get("precision") else "")
        rows.append([r["problem"], impl, md.num(f.get("ms")), md.num(f.get("useful_tflops")),
                     md.num(f.get("visited_tflops")), md.num(f.get("pct_floor")),
                     md.num(b.get("ms")), md.num(b.get("useful_tflops")),
                     md.num(b.get("pct_floor")), _cell_note(r)])
    lines += md.table(["problem", "impl", "fwd ms", "fwd useful TFLOP/s", "fwd visited TFLOP/s",
                       "fwd % floor", "fwd+bwd ms", "fwd+bwd useful TFLOP/s", "fwd+bwd % floor",
                       "note"], rows)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", help="comma-separated names (default: all)")
    ap.add_argument("--backends", help="comma-separated of " + ",".join(BACKENDS) + " (default: "
                    "fused and reference; fused_sm80 / fused_sm90 = fused with that forward kernel "
                    "(fused_sm80: and backward), fused_sm90_bwd = sm90 forward and backward; "
                    "reference only on small problems unless named here)")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated of cudnn,flex,xla "
                    "('' for none)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--precision", default="default",
                    help="float32 only: comma-separated of " + ",".join(PRECISIONS) + " (each "
                    "row measured at each; natten_jax.precision; default: default)")
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--reps", type=int, default=20, help="timed single calls per measurement")
    ap.add_argument("--budget-s", type=float, default=10.0,
                    help="time budget of the timed part of one measurement")
    ap.add_argument("--flex-timeout-s", type=float, default=300.0,
                    help="limit of the flex peer's child process per problem")
    ap.add_argument("--xla-max-gb", type=float, default=peers.XLA_DENSE_MAX_BYTES / 1e9,
                    help="run the XLA masked-dense peer only when its fp32 logits "
                    "(T*T*H*B*4 bytes) stay under this")
    ap.add_argument("--time-limit-s", type=float,
                    default=float(os.environ.get("BENCH_TIME_LIMIT_S", 300)),
                    help="start no new measurement after this many seconds (0: no limit; "
                    "default: $BENCH_TIME_LIMIT_S or 300); later rows say 'not run'")
    cli.add_fused_config(ap)
    ap.add_argument("--out", help="JSON file (rewritten after every measurement)")
    ap.add_argument("--md", help="also write the markdown report here")
    ap.add_argument("--results", help="merge the measured times into this records file, or "
                    "into <device>.json when it is a folder (e.g. benchmarks/results/; "
                    "benchmarks.harness.results)")
    ap.add_argument("--commit", help="the commit the records name (default: git's, else "
                    "'unknown')")
    ap.add_argument("--no-loop", dest="loop", action="store_false",
                    help="skip the jitted-loop timing (report per-call medians only)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny problems, 3 reps, no loop timing (runs on CPU in seconds)")
    ap.add_argument("--list", action="store_true", help="list the problems and exit")
    ap.add_argument("--anchors", action="store_true",
                    help="also the showcase problems of problems-anchors.json (after the others)")
    a = ap.parse_args(argv)
    if a.quick:
        a.reps = min(a.reps, 3)
        a.budget_s = min(a.budget_s, 2.0)
        a.loop = False
    a.explicit_backends = a.backends is not None
    a.backend_names = (cli.names(a.backends, BACKENDS, "--backends") if a.explicit_backends
                       else ["fused", "reference"])
    a.peer_names = cli.names(a.peers, PEERS, "--peers")
    a.config = cli.fused_config(a.fused_config)
    precisions = cli.names(a.precision, PRECISIONS, "--precision")
    if a.dtype != "float32" and precisions != ["default"]:
        raise SystemExit(f"--precision: only float32 rows have one (16-bit inputs compute alike "
                         f"at every precision), got --dtype {a.dtype} --precision {a.precision}")
    a.precisions = (precisions or ["default"]) if a.dtype == "float32" else [None]
    return a


def run_job(kind: str, name: str, p, sets, args, left_s: float, precision=None) -> dict:
    """One implementation on one problem: {"fwd": ..., "fwd_bwd": ...} or {"skipped": why}.
    ``precision`` (float32 rows): ours get it as ``precision=``, and everything is traced under
    ``jax.default_matmul_precision(precision)``."""
    if kind == "peer" and name == "flex":
        if precision is not None:
            return {"skipped": "flex: float32 precision modes are not wired to torch"}
        out = peers.flex_subprocess(p, args.dtype, args.reps, args.budget_s, args.fwd_only,
                                    min(args.flex_timeout_s, max(left_s, 30.0)))
        return {"skipped": out.pop("error")} if "error" in out else out
    try:
        fn = (ours_fn(p, name, args.config, precision) if kind == "ours"
              else peers.jax_peer_fn(name, p))
        ctx = (jax.default_matmul_precision(precision) if precision is not None
               else contextlib.nullcontext())
        with ctx:
            return calls.measure(fn, sets, args.reps, args.budget_s, args.loop, args.fwd_only)
    except peers.PeerSkipped as e:
        return {"skipped": str(e)}
    except Exception as e:  # noqa: BLE001
        return {"skipped": error_text(e)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    probs = problems.select(problems.load(quick=args.quick, anchors=args.anchors),
                            args.problems)
    if args.list:
        for p in probs:
            print(p.name, p.to_json())
        return {}
    peers.XLA_DENSE_MAX_BYTES = args.xla_max_gb * 1e9
    dtype = jax.numpy.dtype(args.dtype)
    # One pass over all problems per implementation, most wanted first, so that a time-limited
    # run has our kernel's numbers everywhere before it spends time on peers.
    jobs = [(k, n) for k, n in JOB_ORDER
            if n in (args.backend_names if k == "ours" else args.peer_names)]
    argv_list = sys.argv[1:] if argv is None else list(argv)
    report = {"env": results.env_info(), "dtype": args.dtype, "argv": argv_list,
              "precisions": [x for x in args.precisions if x],
              "fused_config": cli.config_json(args.config),
              "constants": {**flops.constants(), "time_limit_s": args.time_limit_s},
              "rows": []}
    log(f"device {report['env']['device']}; {len(probs)} problems; jobs {jobs}; "
        f"time limit {args.time_limit_s or 'none'} s")
    deadline = Deadline(args.time_limit_s)

    for precision, (kind, name) in ((x, j) for x in args.precisions for j in jobs):
        impl = name if kind == "ours" else f"peer:{name}"
        config = fused_config(name, args.config) if kind == "ours" else None
        for p in probs:
            row = {"problem": p.name, "impl": impl, "dtype": args.dtype, "spec": p.to_json(),
                   "useful_flops": flops.useful_flops(p),
                   "min_bytes": flops.min_bytes(p, dtype.itemsize)}
            if precision is not None:
                row["precision"] = precision
            if config is not None:
                row["fused_config"] = cli.config_json(config)
            report["rows"].append(row)
            if deadline.passed():
                row["skipped"] = "not run: time limit"
                continue
            if name == "reference" and not args.explicit_backends \
                    and row["useful_flops"] > REFERENCE_AUTO_MAX_FLOPS:
                row["skipped"] = (f"reference skipped by default ({row['useful_flops']:.2g} "
                                  f"useful FLOP > {REFERENCE_AUTO_MAX_FLOPS:.0g}); name it in "
                                  "--backends")
                continue
            t0 = time.perf_counter()
            tag = f"{impl}" + (f" ({precision})" if precision else "")
            log(f"{p.name} {tag} ...")
            sets = None
            if not (kind == "peer" and name == "flex"):
                try:
                    sets = calls.input_sets(p, dtype)
                except Exception as e:  # noqa: BLE001
                    row["skipped"] = "inputs: " + error_text(e)
            if "skipped" not in row:
                row.update(run_job(kind, name, p, sets, args, deadline.left_s(), precision))
            del sets
            visited = (flops.visited_flops(p, config, args.dtype) if config is not None
                       else None)
            if visited:
                row["visited_flops"] = visited
            flops.derive(row, p, dtype.itemsize, visited)
            row["wall_s"] = time.perf_counter() - t0
            log(f"{p.name} {tag}: fwd {(row.get('fwd') or {}).get('ms', '-')} ms, fwd+bwd "
                f"{(row.get('fwd_bwd') or {}).get('ms', '-')} ms "
                f"{row.get('skipped', '')}({row['wall_s']:.1f} s)")
            results.write_json(args.out, report)

    # Report grouped by problem, implementations in job order.
    order = {p.name: i for i, p in enumerate(probs)}
    report["rows"].sort(key=lambda r: order[r["problem"]])  # stable: keeps the job order
    results.write_json(args.out, report)
    if args.results:
        write_results(report, args, argv_list)
    text = markdown(report)
    if args.md:
        results.write_text(args.md, text)
    print(text, flush=True)
    return report


def write_results(report: dict, args, argv_list) -> None:
    """Merges the run's measured times into the records file of --results."""
    device = report["env"]["device"]
    path = results.results_path(args.results, device)
    commit = args.commit or results.git_commit()
    rows = results.records(report["rows"], args.dtype, commit)
    command = shlex.join(["python", "-m", "benchmarks.bench_na", *argv_list])
    data = results.merge(path, device, commit, command, rows)
    log(f"{len(rows)} records merged into {path} ({len(data['rows'])} in all)")


if __name__ == "__main__":
    main()
