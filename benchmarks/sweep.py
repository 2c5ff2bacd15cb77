"""Sweep a deterministic grid of neighborhood-attention problems (the paper's section 4 style).

  python -m benchmarks.sweep [--rank 1,2,3] [--dtype float16,bfloat16] [--backends fused,gemm,naive,reference]
      [--peers cudnn] [--size small|medium|paper] [--fwd-only] [--time-limit-s N]
      [--fused-config FIELD=VALUE,...] [--out sweep.json] [--md sweep.md] [--plots plots/]
      [--resume sweep.json] [--quick] [--list]

The grid: per rank, problems drawn with a fixed seed from lists of batch sizes, spatial extents,
heads (and key/value heads: multi-head, grouped or multi-query), head dims 32/64/128, kernel sizes
and dilations; only valid problems (kernel * dilation <= extent on every axis, heads_kv divides
heads) under the size's caps on elements (B*T*H*D) and dense work (4*B*H*T^2*D, what cuDNN does).
The same arguments always give the same grid (it is stored in the JSON too). Ranks are
interleaved (1-D, 2-D, 3-D, 1-D, ...) so that a time-limited run still covers every rank.

Per problem and dtype every implementation runs on the same inputs: our backends (fused with
--fused-config, gemm, and naive and reference on problems up to --reference-max-gflop) and the
peers of benchmarks/peers.py (cuDNN dense, XLA masked dense, torch Flex). Timing through
benchmarks.harness.timing.time_jax (jitted loop of calls when it fits the budget). Every failure
is recorded in its row and the run goes on; a CUDA error that leaves the device unusable
(illegal address, launch failure) stops the run. No new problem starts after --time-limit-s. The JSON (--out) is rewritten after every problem; the
tables and plots (benchmarks/report.py) are written last.

Sizes (H100, fused vs cuDNN, forward): small ~1 min, medium ~5 min, paper ~1 h; --quick: a tiny
CPU-sized grid, 3 reps, no loop timing.
"""

from __future__ import annotations

import os

# Before JAX loads: do not grab 75% of the GPU (torch, in the flex peer's child, needs room).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Dict, List, Sequence  # noqa: E402

from benchmarks.harness import cli, resume  # noqa: E402
from benchmarks.harness.problems import Problem, make_problem  # noqa: E402
from benchmarks.harness.results import write_json  # noqa: E402
from benchmarks.harness.run import error_text, is_fatal, logger  # noqa: E402
from benchmarks.report import IMPL_ORDER  # noqa: E402  (run order = table order)
from natten_jax.window import num_neighbors  # noqa: E402

BACKENDS = ("fused", "gemm", "naive", "reference")
# Ours that run only on problems of at most --reference-max-gflop useful work (slow by design).
CAPPED_BACKENDS = ("naive", "reference")
PEERS = ("cudnn", "xla", "flex")
DTYPES = ("float16", "bfloat16", "float32")
REFERENCE_MAX_GFLOP = 20.0

# ------------------------------------------------------------------------------------- grid
# Per size: seed, caps (elements B*T*H*D, dense work 4*B*H*T^2*D: what cuDNN does) and a floor on
# useful work (so that few problems only measure launch latency); per rank: how many problems
# and the value lists. ``kernels`` are per-axis sizes (with probability ANISO each axis draws its
# own, else all axes share one); a problem is dilated with probability DILATED, each axis drawing
# from ``dilations``.
_COMMON = dict(batch=(1, 2, 4, 8), heads=(1, 2, 4, 8, 12, 16), head_dim=(32, 64, 128))
SIZES: Dict[str, dict] = {
    "quick": dict(seed=7, max_elems=2 ** 16, max_dense_flops=1e9, min_useful_flops=0, ranks={
        1: dict(n=4, extents=[(32,), (48,), (64,)], kernels=(3, 5, 7, 9), dilations=(2, 3)),
        2: dict(n=4, extents=[(8, 8), (6, 10), (12, 9)], kernels=(3, 5), dilations=(2,)),
        3: dict(n=4, extents=[(4, 4, 4), (3, 5, 6), (6, 4, 5)], kernels=(2, 3),
                dilations=(2,)),
    }, batch=(1, 2), heads=(1, 2, 4), head_dim=(32,)),
    "small": dict(seed=11, max_elems=2 ** 24, max_dense_flops=1e12, min_useful_flops=2e8,
                  ranks={
        1: dict(n=8, extents=[(1024,), (4096,), (16384,)], kernels=(7, 31, 127, 511),
                dilations=(2, 4, 8)),
        2: dict(n=8, extents=[(32, 32), (56, 56), (64, 64), (96, 96)],
                kernels=(3, 7, 13, 21), dilations=(2, 3, 4)),
        3: dict(n=8, extents=[(8, 16, 16), (16, 16, 16), (16, 32, 32)], kernels=(3, 5, 7),
                dilations=(2, 3)),
    }, **_COMMON),
    "medium": dict(seed=23, max_elems=2 ** 25, max_dense_flops=2e12, min_useful_flops=5e8,
                   ranks={
        1: dict(n=40, extents=[(1024,), (2048,), (4096,), (8192,), (16384,), (32768,)],
                kernels=(3, 7, 15, 31, 63, 127, 255, 511, 1023, 2047), dilations=(2, 4, 8, 16)),
        2: dict(n=40, extents=[(28, 28), (32, 32), (56, 56), (64, 64), (48, 80), (96, 96),
                               (64, 128), (128, 128)],
                kernels=(3, 5, 7, 9, 11, 13, 17, 21, 31), dilations=(2, 3, 4)),
        3: dict(n=40, extents=[(8, 16, 16), (8, 28, 28), (16, 16, 16), (16, 32, 32),
                               (24, 24, 24), (32, 32, 32)],
                kernels=(3, 5, 7, 9, 11, 13), dilations=(2, 3)),
    }, **_COMMON),
    "paper": dict(seed=31, max_elems=2 ** 27, max_dense_flops=1e13, min_useful_flops=5e8,
                  ranks={
        1: dict(n=250, extents=[(512,), (1024,), (2048,), (4096,), (8192,), (16384,), (32768,),
                                (65536,)],
                kernels=(3, 7, 15, 31, 63, 127, 255, 511, 1023, 2047, 4095),
                dilations=(2, 4, 8, 16, 32)),
        2: dict(n=250, extents=[(14, 14), (28, 28), (32, 32), (56, 56), (64, 64), (48, 80),
                                (96, 96), (64, 128), (128, 128), (112, 200), (192, 192),
                                (256, 256)],
                kernels=(3, 5, 7, 9, 11, 13, 17, 21, 31, 45, 63), dilations=(2, 3, 4, 8)),
        3: dict(n=250, extents=[(8, 16, 16), (8, 28, 28), (16, 16, 16), (16, 32, 32),
                                (24, 24, 24), (32, 32, 32), (16, 48, 48), (30, 40, 48),
                                (32, 64, 64)],
                kernels=(3, 5, 7, 9, 11, 13, 15, 19), dilations=(2, 3, 4)),
    }, batch=(1, 2, 4, 8, 16), heads=(1, 2, 4, 8, 12, 16, 24, 32), head_dim=(32, 64, 128)),
}
ANISO = 0.3  # probability that a problem's axes draw their own kernel sizes
DILATED = 0.4  # probability that a problem is dilated


def _name(rank, batch, heads, heads_kv, head_dim, spatial, kernel, dilation) -> str:
    x = "x".join
    name = f"{rank}d_b{batch}_h{heads}"
    if heads_kv != heads:
        name += f"kv{heads_kv}"
    name += f"_d{head_dim}_s{x(map(str, spatial))}_k{x(map(str, kernel))}"
    if any(d > 1 for d in dilation):
        name += f"_dil{x(map(str, dilation))}"
    return name


def _draw(rng: random.Random, rank: int, size: dict, r: dict):
    """One candidate problem's fields, or None when the draw is not valid."""
    spatial = rng.choice(r["extents"])
    dilation = [1] * rank
    if rng.random() < DILATED:
        dilation = [rng.choice(r["dilations"]) for _ in range(rank)]
    per_axis = [[k for k in r["kernels"] if k * d <= L] for L, d in zip(spatial, dilation)]
    if not all(per_axis):
        return None
    if rank > 1 and rng.random() < ANISO:
        kernel = [rng.choice(ks) for ks in per_axis]
    else:
        shared = [k for k in per_axis[0] if all(k in ks for ks in per_axis[1:])]
        if not shared:
            return None
        kernel = [rng.choice(shared)] * rank
    batch = rng.choice(size["batch"])
    heads = rng.choice(size["heads"])
    head_dim = rng.choice(size["head_dim"])
    divisors = [h for h in (1, 2, 4, 8) if heads % h == 0 and h < heads]
    heads_kv = rng.choice(divisors) if divisors and rng.random() < 0.35 else heads
    return batch, heads, heads_kv, head_dim, tuple(spatial), tuple(kernel), tuple(dilation)


def grid(rank: int, size: str = "medium") -> List[Problem]:
    """The deterministic problem list of one rank and size (valid problems only, no repeats)."""
    spec = SIZES[size]
    r = spec["ranks"][rank]
    rng = random.Random(1000 * spec["seed"] + rank)
    out: List[Problem] = []
    seen = set()
    for _ in range(500 * r["n"]):
        if len(out) == r["n"]:
            break
        d = _draw(rng, rank, spec, r)
        if d is None or d in seen:
            continue
        batch, heads, heads_kv, head_dim, spatial, kernel, dilation = d
        tokens = math.prod(spatial)
        if batch * tokens * heads * head_dim > spec["max_elems"]:
            continue
        if 4 * batch * heads * tokens * tokens * head_dim > spec["max_dense_flops"]:
            continue
        if 4 * batch * heads * num_neighbors(spatial, kernel, (1,) * rank, dilation,
                                             (False,) * rank) * head_dim \
                < spec["min_useful_flops"]:
            continue
        seen.add(d)
        out.append(make_problem(
            _name(rank, *d),
            dict(batch=batch, heads=heads, spatial=list(spatial), kernel=list(kernel),
                 dilation=list(dilation), head_dim=head_dim),
            heads_kv=heads_kv))
    return out


def sweep_problems(ranks: Sequence[int], size: str, max_problems: int = 0) -> List[Problem]:
    """The grids of ``ranks`` interleaved (one of each rank in turn), optionally truncated."""
    grids = [grid(r, size) for r in ranks]
    out = []
    for i in range(max(len(g) for g in grids)):
        out.extend(g[i] for g in grids if i < len(g))
    return out[:max_problems] if max_problems else out


# ------------------------------------------------------------------------------------ running
log = logger("sweep")


class Progress:
    """tqdm when importable, else a one-line counter on stderr per step."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.n, self.t0 = total, 0, time.perf_counter()
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                tty = sys.stderr.isatty()
                self.bar = tqdm(total=total, file=sys.stderr, desc="sweep", dynamic_ncols=True,
                                mininterval=0.5 if tty else 15.0)
            except Exception:  # noqa: BLE001 - no tqdm: plain counter
                self.bar = None
        self.enabled = enabled

    def step(self, note: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(note[:60], refresh=False)
            self.bar.update(1)
        elif self.enabled:
            print(f"[sweep {self.n}/{self.total} {time.perf_counter() - self.t0:.0f} s] {note}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fatal(row: dict) -> str:
    """The first error of a row that leaves the device unusable ('' if none)."""
    for part in [row] + [row.get(m) or {} for m in ("fwd", "fwd_bwd")]:
        for msg in (part.get("error"), part.get("skipped")):
            if is_fatal(msg):
                return msg
    return ""


# What must agree between a run and the run it resumes.
RESUME_KEYS = ("impls", "dtypes", "ranks", "fwd_only", "problems")


def resume_rows(path: str, report: dict) -> set:
    """Copies into ``report`` the rows of the earlier run in ``path`` for every (problem, dtype)
    it finished (all implementations run or skipped, no device error), and returns those pairs;
    refuses a run of another grid, implementations, dtypes or modes."""
    old = resume.load(path)
    resume.require_same(path, old, report, RESUME_KEYS)
    resume.require_same(path, old["constants"], report["constants"], ("size",))
    by_pair = {}
    for r in old["rows"]:
        by_pair.setdefault((r["problem"], r["dtype"]), []).append(r)
    done = {pair for pair, rows in by_pair.items()
            if {r["impl"] for r in rows} == set(report["impls"]) and not any(map(_fatal, rows))}
    report["rows"] += [r for pair, rows in by_pair.items() if pair in done for r in rows]
    report["status"]["done"] += len(done)
    report["resumed_from"] = {"path": path, "pairs": len(done),
                              "env": {k: old["env"].get(k) for k in ("device", "jax")}}
    return done


def run_impl(kind: str, name: str, p: Problem, dtype: str, sets, args, left_s: float) -> dict:
    """One implementation on one problem: {"fwd": ..., "fwd_bwd": ...} or {"skipped": why}."""
    from benchmarks import peers
    from benchmarks.harness import calls

    if name == "flex":
        out = peers.flex_subprocess(p, dtype, args.reps, args.budget_s, args.fwd_only,
                                    min(args.flex_timeout_s, max(left_s, 30.0)))
        return {"skipped": out.pop("error")} if "error" in out else out
    try:
        fn = calls.na_fn(p, name, args.config) if kind == "ours" else peers.jax_peer_fn(name, p)
        return calls.measure(fn, sets, args.reps, args.budget_s, args.loop, args.fwd_only)
    except peers.PeerSkipped as e:
        return {"skipped": str(e)}
    except Exception as e:  # noqa: BLE001
        return {"skipped": error_text(e)}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", default="1,2,3", help="comma-separated ranks (default 1,2,3)")
    ap.add_argument("--dtype", default="float16",
                    help="comma-separated of float16,bfloat16,float32 (default float16)")
    ap.add_argument("--backends", default="fused", help="comma-separated of "
                    + ",".join(BACKENDS) + " (default fused; naive and reference only up to "
                    "--reference-max-gflop)")
    ap.add_argument("--peers", default="cudnn", help="comma-separated of cudnn,xla,flex "
                    "(default cudnn; '' for none)")
    ap.add_argument("--size", default="medium", choices=["small", "medium", "paper"])
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--reps", type=int, default=10, help="timed single calls per measurement")
    ap.add_argument("--budget-s", type=float, default=1.0,
                    help="time budget of the timed part of one measurement")
    ap.add_argument("--no-loop", dest="loop", action="store_false",
                    help="per-call medians only (no jitted-loop timing)")
    ap.add_argument("--reference-max-gflop", type=float, default=REFERENCE_MAX_GFLOP,
                    help="run the naive and reference backends only on problems of at most this much "
                    "useful forward work")
    ap.add_argument("--flex-timeout-s", type=float, default=120.0,
                    help="limit of the flex peer's child process per problem")
    ap.add_argument("--time-limit-s", type=float,
                    default=float(os.environ.get("SWEEP_TIME_LIMIT_S", 300)),
                    help="start no new problem after this many seconds (0: no limit; default "
                    "$SWEEP_TIME_LIMIT_S or 300)")
    cli.add_fused_config(ap)
    ap.add_argument("--max-problems", type=int, default=0,
                    help="only the first N problems of the interleaved grid (0: all)")
    ap.add_argument("--out", help="JSON file (rewritten after every problem)")
    ap.add_argument("--md", help="markdown tables (benchmarks/report.py) written here at the end")
    ap.add_argument("--plots", help="folder for the PNG plots (needs matplotlib)")
    ap.add_argument("--resume", help="an earlier run's JSON: its measured (problem, dtype) rows "
                    "are kept and not re-run, when it ran the same grid, implementations, dtypes "
                    "and modes (a sweep longer than one time limit, over several runs)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny CPU-sized grid, 3 reps, no loop timing (seconds on a CPU)")
    ap.add_argument("--list", action="store_true", help="print the grid and exit")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    a = ap.parse_args(argv)
    a.ranks = [int(r) for r in cli.names(a.rank, ("1", "2", "3"), "--rank")]
    a.dtypes = cli.names(a.dtype, DTYPES, "--dtype")
    a.backend_names = cli.names(a.backends, BACKENDS, "--backends")
    a.peer_names = cli.names(a.peers, PEERS, "--peers")
    if not a.ranks or not a.dtypes or not (a.backend_names or a.peer_names):
        raise SystemExit("need at least one rank, one dtype and one implementation")
    a.config = cli.fused_config(a.fused_config)
    a.grid_size = "quick" if a.quick else a.size
    if a.quick:
        a.reps = min(a.reps, 3)
        a.budget_s = min(a.budget_s, 0.5)
        a.loop = False
    return a


def main(argv=None) -> dict:
    args = parse_args(argv)
    probs = sweep_problems(args.ranks, args.grid_size, args.max_problems)
    if args.list:
        for p in probs:
            print(p.name, json.dumps(p.to_json()))
        return {}

    import jax

    from benchmarks.harness import calls, flops, results

    jobs = [(("ours" if n in BACKENDS else "peer"), n) for n in IMPL_ORDER
            if n in args.backend_names + args.peer_names]
    env = results.env_info()
    env["fused_backward"] = args.config.backward  # the header of benchmarks/report.py's tables
    report = {
        "env": env, "argv": sys.argv[1:] if argv is None else list(argv),
        "fused_config": cli.config_json(args.config),
        "constants": {**flops.constants(), "time_limit_s": args.time_limit_s,
                      "size": args.grid_size, "reps": args.reps, "budget_s": args.budget_s,
                      "loop": args.loop, "reference_max_gflop": args.reference_max_gflop},
        "impls": [n for _, n in jobs], "dtypes": args.dtypes, "ranks": args.ranks,
        "fwd_only": args.fwd_only,
        "problems": [p.to_json() for p in probs],
        "status": {"planned": len(probs) * len(args.dtypes), "done": 0, "stopped": None},
        "rows": [],
    }
    done_before = resume_rows(args.resume, report) if args.resume else set()
    log(f"device {env['device']}; {len(probs)} problems x {len(args.dtypes)} dtypes; impls "
        f"{report['impls']}; time limit {args.time_limit_s or 'none'} s")
    start = time.perf_counter()
    progress = Progress(report["status"]["planned"], args.progress)
    stopped = None
    for i, p in enumerate(probs):
        for dt in args.dtypes:
            if (p.name, dt) in done_before:
                continue
            if stopped is None and args.time_limit_s and \
                    time.perf_counter() - start > args.time_limit_s:
                stopped = "time limit"
            if stopped:
                break
            t0 = time.perf_counter()
            dtype = jax.numpy.dtype(dt)
            sets, input_error = None, None
            try:
                sets = calls.input_sets(p, dtype, seed=i, max_bytes_for_three=1e9)
            except Exception as e:  # noqa: BLE001
                input_error = "inputs: " + error_text(e)
                if is_fatal(input_error):
                    stopped = f"device error making inputs of {p.name} {dt}: {input_error[:200]}"
            useful = flops.useful_flops(p)
            for kind, name in jobs:
                row = {"problem": p.name, "rank": p.rank, "dtype": dt, "impl": name,
                       "spec": p.to_json(), "window": math.prod(p.kernel), "tokens": p.tokens,
                       "useful_flops": useful, "min_bytes": flops.min_bytes(p, dtype.itemsize)}
                report["rows"].append(row)
                if input_error:
                    row["skipped"] = input_error
                    continue
                if name in CAPPED_BACKENDS and useful > args.reference_max_gflop * 1e9:
                    row["skipped"] = (f"{name} skipped: {useful / 1e9:.3g} useful GFLOP > "
                                      f"--reference-max-gflop {args.reference_max_gflop:g}")
                    continue
                t1 = time.perf_counter()
                left = (args.time_limit_s - (t1 - start)) if args.time_limit_s else 1e9
                row.update(run_impl(kind, name, p, dt, sets, args, left))
                timed = "ms" in (row.get("fwd") or {})
                visited = flops.visited_flops(p, args.config) if name == "fused" and timed \
                    else None
                if visited:
                    row["visited_flops"] = visited
                flops.derive(row, p, dtype.itemsize, visited)
                row["wall_s"] = round(time.perf_counter() - t1, 3)
                fatal = _fatal(row)
                if fatal:
                    stopped = f"device error in {p.name} {dt} {name}: {fatal[:200]}"
                    break
            del sets
            report["status"]["done"] += 1
            report["status"]["elapsed_s"] = round(time.perf_counter() - start, 1)
            write_json(args.out, report)
            cells = []
            for r in report["rows"]:
                if r["problem"] == p.name and r["dtype"] == dt:
                    ms = (r.get("fwd") or {}).get("ms")
                    cells.append(f"{r['impl']} {ms:.3g}" if ms is not None else f"{r['impl']} -")
            progress.step(f"{p.name} {dt}: fwd ms {', '.join(cells)} "
                          f"({time.perf_counter() - t0:.1f} s)")
        if stopped:
            break
        if (i + 1) % 25 == 0:
            jax.clear_caches()  # bounds host memory of the compiled programs
    progress.close()
    report["status"]["stopped"] = stopped
    report["status"]["elapsed_s"] = round(time.perf_counter() - start, 1)
    write_json(args.out, report)
    log(f"{report['status']['done']} of {report['status']['planned']} problem x dtype runs in "
        f"{report['status']['elapsed_s']} s" + (f"; stopped: {stopped}" if stopped else ""))

    from benchmarks import report as rep

    md = rep.markdown(report)
    results.write_text(args.md, md)
    if args.plots:
        for path in rep.plots(report, args.plots):
            log(f"plot {path}")
    print(md, flush=True)
    return report


if __name__ == "__main__":
    main()
