"""Benchmark natten_jax's backends against peers on the problems of problems.json.

  python -m benchmarks.bench_na [--problems 2d_gen,3d_video] [--backends fused,reference]
      [--peers cudnn,flex,xla] [--dtype bfloat16] [--fwd-only] [--reps N]
      [--out bench.json] [--md docs/benchmarks_run.md] [--quick]

Per problem and implementation: forward time, and forward+backward time (VJP of q, k, v with a
random cotangent) unless --fwd-only. Useful work counts only the neighborhood's (query, key)
pairs: 4 * B * H * sum(#neighbors) * D for the forward; the backward is counted as 2.5x the
forward (fwd+bwd = 3.5x). The floor is the larger of work / peak matrix throughput and bytes of
Q, K, V, O once (3x that for fwd+bwd) / peak bandwidth; "% floor" = floor / time.

Order: one pass over the problems (base, then dilated / causal variants, then GQA variants) per
implementation: our fused backend, cuDNN, XLA, flex, then the reference backend (skipped on
problems over REFERENCE_AUTO_MAX_FLOPS unless --backends names it); the table groups rows by
problem. Each measurement has a time budget (--budget-s), and the run starts nothing new after
--time-limit-s (default 300 s, or $BENCH_TIME_LIMIT_S) so that it ends with a table inside a
GPU job's limit. A failing implementation is recorded with its error and the run goes on. JSON
is rewritten after every measurement; the markdown table is printed last.
"""

from __future__ import annotations

import os

# Before JAX loads: do not grab 75% of the GPU, torch (flex peer, a child process) needs room.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

import natten_jax  # noqa: E402
from benchmarks import peers, problems  # noqa: E402
from benchmarks.timing import random_inputs, time_jax  # noqa: E402
from natten_jax.tiles import BWD_IMPL_ENV, IMPL_ENV  # noqa: E402

# Our backends that are the fused backend with its kernels forced through $NATTEN_JAX_FNA_IMPL
# (forward) and $NATTEN_JAX_FNA_BWD_IMPL (backward), read when a function is traced: timed side
# by side in one run. "fused" itself follows the environment (default: auto forward, sm80
# backward).
FUSED_IMPLS = {
    "fused_sm80": {IMPL_ENV: "sm80", BWD_IMPL_ENV: "sm80"},
    "fused_sm90": {IMPL_ENV: "sm90"},
    "fused_sm90_bwd": {IMPL_ENV: "sm90", BWD_IMPL_ENV: "sm90"},
}
BACKENDS = ("fused", *FUSED_IMPLS, "reference")
PEERS = ("cudnn", "flex", "xla")
JOB_ORDER = (("ours", "fused"), *(("ours", n) for n in FUSED_IMPLS), ("peer", "cudnn"),
             ("peer", "xla"), ("peer", "flex"), ("ours", "reference"))
REFERENCE_AUTO_MAX_FLOPS = 2e10
BWD_FACTOR = 2.5
# H100 SXM figures of /work/shared/bench/peers-h100.md: dense cuDNN attention's practical
# matrix throughput and the measured copy bandwidth.
PEAK_TFLOPS = 630.0
PEAK_TBPS = 3.0


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _err(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {e}"[:500]}


def visited_flops(p: problems.Problem):
    """Forward work the fused kernel really does (its tiles), if the backend reports it."""
    try:
        from natten_jax.backends import fused

        f = getattr(fused, "visited_flops", None)
        if f is None:
            return None
        return int(f(p.spatial, p.kernel, p.stride, p.dilation, p.causal, p.batch, p.heads,
                     p.head_dim))
    except Exception as e:  # noqa: BLE001
        log(f"visited_flops failed on {p.name}: {type(e).__name__}: {e}")
        return None


class _forced_impl:
    """Sets the environment of one of FUSED_IMPLS until close() (no-op otherwise)."""

    def __init__(self, name):
        self.env = FUSED_IMPLS.get(name, {})
        self.old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        self.active = bool(self.env)

    def close(self):
        if self.active:
            for k, old in self.old.items():
                if old is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = old
            self.active = False


def ours_fn(p: problems.Problem, backend: str):
    na = getattr(natten_jax, f"na{p.rank}d")
    kw = p.na_kwargs()

    backend = "fused" if backend in FUSED_IMPLS else backend

    def f(q, k, v):
        return na(q, k, v, backend=backend, **kw)

    return f


def fwd_bwd(fn):
    """(q, k, v, ct) -> (dq, dk, dv): forward plus the VJP of sum(out * ct)."""

    def g(q, k, v, ct):
        _, vjp = jax.vjp(fn, q, k, v)
        return vjp(ct)

    return g


def measure_jax(fn, sets, args) -> dict:
    """{"fwd": timing, "fwd_bwd": timing}; each an error dict if it failed."""
    out = {}
    try:
        out["fwd"] = time_jax(lambda q, k, v, ct: fn(q, k, v), sets, args.reps, args.budget_s,
                              loop=args.loop)
    except Exception as e:  # noqa: BLE001
        out["fwd"] = _err(e)
    if not args.fwd_only:
        try:
            out["fwd_bwd"] = time_jax(fwd_bwd(fn), sets, args.reps, args.budget_s, loop=args.loop)
        except Exception as e:  # noqa: BLE001
            out["fwd_bwd"] = _err(e)
    return out


def derive(row: dict, p: problems.Problem, itemsize: int, visited) -> None:
    """Adds TFLOP/s and % of floor to the timing dicts of a row."""
    flops = problems.useful_flops(p)
    nbytes = problems.min_bytes(p, itemsize)
    for mode, work, traffic in (("fwd", flops, nbytes),
                                ("fwd_bwd", flops * (1 + BWD_FACTOR), 3 * nbytes)):
        t = row.get(mode)
        if not t or "ms" not in t:
            continue
        s = t["ms"] / 1e3
        floor_s = max(work / (PEAK_TFLOPS * 1e12), traffic / (PEAK_TBPS * 1e12))
        t["useful_tflops"] = work / s / 1e12
        t["floor_ms"] = floor_s * 1e3
        t["pct_floor"] = 100.0 * floor_s / s
        if mode == "fwd" and visited:
            t["visited_tflops"] = visited / s / 1e12


def env_info() -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "jax": jax.__version__, "python": sys.version.split()[0]}
    try:
        import jaxlib

        info["jaxlib"] = jaxlib.__version__
    except Exception:  # noqa: BLE001
        pass
    d = jax.devices()[0]
    info["device"] = getattr(d, "device_kind", str(d))
    info["platform"] = d.platform
    info["torch"] = None
    if importlib.util.find_spec("torch") is not None:
        try:
            from importlib.metadata import version

            info["torch"] = version("torch")
        except Exception:  # noqa: BLE001
            info["torch"] = "unknown"
    return info


# ---------------------------------------------------------------------------------- reporting
def _f(x, fmt="{:.4g}"):
    return fmt.format(x) if isinstance(x, (int, float)) else ""


def _cell_note(row) -> str:
    notes = []
    for mode in ("fwd", "fwd_bwd"):
        err = (row.get(mode) or {}).get("error")
        if err and err[:80] not in notes:
            notes.append(err[:80])
    if "skipped" in row:
        notes.append(row["skipped"][:100])
    return "; ".join(notes).replace("|", "/").replace("\n", " ")


def markdown(report: dict) -> str:
    e, c = report["env"], report["constants"]
    lines = [
        f"# natten_jax benchmark ({e['device']}, {report['dtype']}, {e['date']})",
        "",
        f"jax {e['jax']}, torch {e['torch']}. Times are ms per call (jitted loop of calls, dispatch "
        "amortised, when measured; else median wall time of single calls; torch: CUDA events). "
        "Useful work = 4*B*H*sum(#neighbors)*D; fwd+bwd counts the backward as "
        f"{BWD_FACTOR}x the forward. Floor (H100 figures) = max(work / {c['peak_tflops']:.0f} "
        "TFLOP/s, bytes of "
        f"Q,K,V,O once (3x for fwd+bwd) / {c['peak_tbps']:.1f} TB/s); % floor = floor / time. "
        "Visited TFLOP/s counts the work the fused kernel's tiles really do.",
        "",
        "| problem | impl | fwd ms | fwd useful TFLOP/s | fwd visited TFLOP/s | fwd % floor "
        "| fwd+bwd ms | fwd+bwd useful TFLOP/s | fwd+bwd % floor | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        f, b = r.get("fwd") or {}, r.get("fwd_bwd") or {}
        lines.append(
            f"| {r['problem']} | {r['impl']} | {_f(f.get('ms'))} | {_f(f.get('useful_tflops'))} "
            f"| {_f(f.get('visited_tflops'))} | {_f(f.get('pct_floor'))} | {_f(b.get('ms'))} "
            f"| {_f(b.get('useful_tflops'))} | {_f(b.get('pct_floor'))} | {_cell_note(r)} |")
    return "\n".join(lines) + "\n"


def write(report: dict, args) -> None:
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


# --------------------------------------------------------------------------------------- main
def _names(s, allowed, what):
    """Comma-separated names; '' or 'none' (quotes that survived a shell variable stripped):
    none."""
    names = [x.strip().strip("'\"") for x in s.split(",")] if s else []
    names = [x for x in names if x and x != "none"]
    bad = [x for x in names if x not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; known: {list(allowed)}")
    return names


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", help="comma-separated names (default: all)")
    ap.add_argument("--backends", help="comma-separated of " + ",".join(BACKENDS) + " (default: "
                    "fused and reference; fused_sm80 / fused_sm90 = fused with that forward kernel, "
                    "fused_sm90_bwd = sm90 forward and backward; "
                    "reference only on small problems unless named here)")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated of cudnn,flex,xla "
                    "('' for none)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
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
    ap.add_argument("--out", help="JSON file (rewritten after every measurement)")
    ap.add_argument("--md", help="also write the markdown report here")
    ap.add_argument("--no-loop", dest="loop", action="store_false",
                    help="skip the jitted-loop timing (report per-call medians only)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny problems, 3 reps, no loop timing (runs on CPU in seconds)")
    ap.add_argument("--list", action="store_true", help="list the problems and exit")
    a = ap.parse_args(argv)
    if a.quick:
        a.reps = min(a.reps, 3)
        a.budget_s = min(a.budget_s, 2.0)
        a.loop = False
    return a


def run_job(kind: str, name: str, p, sets, args, left_s: float) -> dict:
    """One implementation on one problem: {"fwd": ..., "fwd_bwd": ...} or {"skipped": why}."""
    if kind == "peer" and name == "flex":
        out = peers.flex_subprocess(p, args.dtype, args.reps, args.budget_s, args.fwd_only,
                                    min(args.flex_timeout_s, max(left_s, 30.0)))
        return {"skipped": out.pop("error")} if "error" in out else out
    try:
        fn = ours_fn(p, name) if kind == "ours" else peers.jax_peer_fn(name, p)
        return measure_jax(fn, sets, args)
    except peers.PeerSkipped as e:
        return {"skipped": str(e)}
    except Exception as e:  # noqa: BLE001
        return {"skipped": _err(e)["error"]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    probs = problems.select(problems.load(quick=args.quick), args.problems)
    if args.list:
        for p in probs:
            print(p.name, p.to_json())
        return {}
    explicit_backends = args.backends is not None
    backends = (_names(args.backends, BACKENDS, "backends") if explicit_backends
                else ["fused", "reference"])
    peer_names = _names(args.peers, PEERS, "peers")
    peers.XLA_DENSE_MAX_BYTES = args.xla_max_gb * 1e9
    dtype = jax.numpy.dtype(args.dtype)
    # One pass over all problems per implementation, most wanted first, so that a time-limited
    # run has our kernel's numbers everywhere before it spends time on peers.
    jobs = [(k, n) for k, n in JOB_ORDER if n in (backends if k == "ours" else peer_names)]

    report = {"env": env_info(), "dtype": args.dtype, "argv": sys.argv[1:] if argv is None else argv,
              "constants": {"peak_tflops": PEAK_TFLOPS, "peak_tbps": PEAK_TBPS,
                            "bwd_factor": BWD_FACTOR, "time_limit_s": args.time_limit_s},
              "rows": []}
    log(f"device {report['env']['device']}; {len(probs)} problems; jobs {jobs}; "
        f"time limit {args.time_limit_s or 'none'} s")
    start = time.perf_counter()

    def left_s() -> float:
        return (args.time_limit_s - (time.perf_counter() - start)) if args.time_limit_s \
            else float("inf")

    for kind, name in jobs:
        impl = name if kind == "ours" else f"peer:{name}"
        for p in probs:
            row = {"problem": p.name, "impl": impl, "spec": p.to_json(),
                   "useful_flops": problems.useful_flops(p),
                   "min_bytes": problems.min_bytes(p, dtype.itemsize)}
            report["rows"].append(row)
            if left_s() <= 0:
                row["skipped"] = "not run: time limit"
                continue
            if name == "reference" and not explicit_backends \
                    and row["useful_flops"] > REFERENCE_AUTO_MAX_FLOPS:
                row["skipped"] = (f"reference skipped by default ({row['useful_flops']:.2g} "
                                  f"useful FLOP > {REFERENCE_AUTO_MAX_FLOPS:.0g}); name it in "
                                  "--backends")
                continue
            t0 = time.perf_counter()
            log(f"{p.name} {impl} ...")
            impl_env = _forced_impl(name if kind == "ours" else None)
            sets = None
            if not (kind == "peer" and name == "flex"):
                shapes = [(p.batch,) + p.spatial + (h, p.head_dim)
                          for h in (p.heads, p.heads_kv, p.heads_kv, p.heads)]
                set_bytes = sum(math.prod(s) for s in shapes) * dtype.itemsize
                try:
                    sets = random_inputs(shapes, dtype, 3 if set_bytes < 2e9 else 2)
                except Exception as e:  # noqa: BLE001
                    row["skipped"] = "inputs: " + _err(e)["error"]
            if "skipped" not in row:
                row.update(run_job(kind, name, p, sets, args, left_s()))
            del sets
            visited = visited_flops(p) if kind == "ours" and name != "reference" else None
            impl_env.close()
            if visited:
                row["visited_flops"] = visited
            derive(row, p, dtype.itemsize, visited)
            row["wall_s"] = time.perf_counter() - t0
            log(f"{p.name} {impl}: fwd {(row.get('fwd') or {}).get('ms', '-')} ms, fwd+bwd "
                f"{(row.get('fwd_bwd') or {}).get('ms', '-')} ms "
                f"{row.get('skipped', '')}({row['wall_s']:.1f} s)")
            write(report, args)

    # Report grouped by problem, implementations in job order.
    order = {p.name: i for i, p in enumerate(probs)}
    report["rows"].sort(key=lambda r: order[r["problem"]])  # stable: keeps the job order
    write(report, args)
    md = markdown(report)
    if args.md:
        os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
        with open(args.md, "w") as fh:
            fh.write(md)
    print(md, flush=True)
    return report


if __name__ == "__main__":
    main()
