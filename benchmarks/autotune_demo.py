"""The auto-tuner at work: per-problem tile choices, before/after times, and a second process that
reuses the on-disk cache without timing anything.

  python -m benchmarks.autotune_demo [--problems 2d_gen,3d_video,1d_long,2d_nat_t,2d_nat_t_dilated]
      [--dtype bfloat16] [--thorough 2d_nat_t] [--cache-dir DIR] [--time-limit-s 240]
      [--fused-config FIELD=VALUE,...] [--out demo.json] [--md demo.md] [--quick]

In a fresh cache directory (``FusedConfig.cache_dir``: a new folder under --cache-dir or the
temporary directory), per problem of benchmarks/problems.json, with the fused backend's
configuration of --fused-config and its ``autotune`` field set to each mode in turn (passed as
``backend_config=``):

1. ``off``: the tiles of the cost model, read from the lowered program (the fused custom
   call's ``q_tile`` / ``kv_tile`` attributes), and the time of the fused forward
   (benchmarks.harness.timing.time_jax);
2. ``on``: tracing the same call makes the tuner time its candidates (counted by
   :func:`natten_jax.autotune.timing_log`) and persist the winner; the tiles it picked, the
   tuner's own times of the cost model's and the winning tiles, and the call's time again
   (re-traced: the tuner must now answer from its cache, timing nothing);
3. ``thorough`` (for the problems of --thorough, when the estimated time, from step 2's time
   per candidate, fits in what is left of --time-limit-s): every legal candidate.

Then a second Python process with the same cache directory traces the same problems in the
same modes and reports the tiles in its programs and how many candidates it timed: the cache
was reused iff it timed none and its tiles equal the first process's. ``--child-fresh-cache``
(a negative control) gives the second process an empty directory instead: it must re-time,
and the demo must say so.

``--quick``: CPU smoke test. Tiny problems; the timer the fused backend gives the tuner
(``natten_jax.backends.fused.time_kernel``) is replaced by a deterministic mock (no kernel runs
on a CPU) that makes a candidate other than the cost model's the fastest;
tiles still come from lowering the fused custom call, times from the reference backend.
Exit status: 0 when the second process behaved as expected (reused the cache; re-timed under
--child-fresh-cache), 1 otherwise.
"""

from __future__ import annotations

import os

# Before JAX loads: the second process needs GPU memory too.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Dict, List, Optional  # noqa: E402

import jax  # noqa: E402

from benchmarks.harness import calls, cli, problems, results  # noqa: E402
from benchmarks.harness.run import error_text, logger  # noqa: E402
from benchmarks.harness.timing import random_inputs, time_jax  # noqa: E402
from natten_jax import autotune  # noqa: E402

DEFAULT_PROBLEMS = "2d_gen,3d_video,1d_long,2d_nat_t,2d_nat_t_dilated"
QUICK_PROBLEMS = "q1d,q2d,q2d_dilated"
CHILD_PREFIX = "AUTOTUNE_CHILD "
CHILD_START_S = 20.0  # the second process's start-up (JAX, device), reserved in the time limit
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


log = logger("autotune-demo")


# ----------------------------------------------------------------------------------- helpers
def mode_config(args, mode: str):
    """The fused config of tuning mode ``mode``: --fused-config with ``autotune=mode`` and
    the demo's cache directory."""
    return args.config.replace(autotune=mode, cache_dir=args.cache_path)


def mock_timer(p, t, backward, **_):
    """Deterministic stand-in for the kernel timer (--quick): the cost model's second-ranked
    candidate takes 0.5 ms, the others 1 ms and up (by their tile extents)."""
    ranked = autotune.candidates(p, backward, "thorough")
    if len(ranked) > 1 and tuple(map(tuple, t)) == ranked[1]:
        return 0.5e-3
    return 1e-3 * (1 + 0.01 * sum((i + 1) * x for i, x in enumerate(t[0] + t[1])))


def shapes(p: problems.Problem):
    """Shapes of q, k, v."""
    return p.shapes()[:3]


def fused_runs_here() -> bool:
    from natten_jax import _ffi

    return _ffi.cuda_kernels_available()


def na_problem(p: problems.Problem, dtype: str, config):
    """natten_jax's static problem of ``p`` with ``config``."""
    from natten_jax.checks import check_na_call

    q, k, v = (jax.ShapeDtypeStruct(s, dtype) for s in shapes(p))
    return check_na_call(p.rank, q, k, v, p.kernel, p.stride, p.dilation, p.causal, None,
                         backend_config=config)


def forward_fn(p: problems.Problem, config):
    """(q, k, v) -> out of the fused forward with ``config``: the public call when the kernels
    run here, else the custom call itself (it lowers on any platform; --quick reads its
    attributes)."""
    if fused_runs_here():
        return calls.na_fn(p, "fused", config)
    from natten_jax.backends import fused

    def f(q, k, v):
        return fused._forward_call(na_problem(p, q.dtype, config), q, k, v)[0]

    return f


_ATTR = re.compile(r"\b(q_tile|kv_tile|impl) = (?:dense<(\[[-\d, ]*\]|-?\d+)>|(-?\d+) : i64)")


def program_config(hlo: str, rank: int) -> Optional[dict]:
    """{"q_tile": [...], "kv_tile": [...], ("impl": n)} of the first fused forward custom call
    in a lowered program's text (log2 extents per axis), or None if there is none."""
    line = next((ln for ln in hlo.splitlines() if "natten_jax_fna_forward" in ln
                 and "q_tile" in ln), None)
    if line is None:
        return None
    out = {}
    for name, dense, scalar in _ATTR.findall(line):
        if scalar:
            out[name] = int(scalar)
        elif dense.startswith("["):
            out[name] = [int(x) for x in dense.strip("[]").split(",") if x.strip()]
        else:
            out[name] = [int(dense)] * rank if name != "impl" else int(dense)
    return out if "q_tile" in out and "kv_tile" in out else None


def lower_config(p: problems.Problem, dtype: str, config) -> Optional[dict]:
    """Trace and lower the fused forward with ``config`` (the tuner runs here when it has to);
    the tiles (and kernel) of its program."""
    s = [jax.ShapeDtypeStruct(sh, dtype) for sh in shapes(p)]
    return program_config(jax.jit(forward_fn(p, config)).lower(*s).as_text(), p.rank)


def impl_name(code: int) -> str:
    """The forward kernel's name for its ``impl`` attribute (as natten_jax.tiles codes it)."""
    from natten_jax import tiles

    try:
        return {tiles.impl_code(n): n for n in tiles.IMPLS}[code]
    except (AttributeError, KeyError, TypeError):
        return f"impl {code}"


def fmt_tiles(cfg: Optional[dict]) -> str:
    """"Q 8x8 KV 8x8" (token extents) from log2 extents, and the kernel if the program says."""
    if not cfg:
        return "-"
    x = lambda t: "x".join(str(2 ** int(v)) for v in t)  # noqa: E731
    s = f"Q {x(cfg['q_tile'])} KV {x(cfg['kv_tile'])}"
    return s + (f" {impl_name(cfg['impl'])}" if "impl" in cfg else "")


def cache_entries(config) -> Dict[str, dict]:
    """The entries of ``config``'s cache file."""
    try:
        with open(autotune.cache_path(config)) as fh:
            return dict(json.load(fh).get("entries", {}))
    except (OSError, ValueError):
        return {}


def time_call(p: problems.Problem, sets, args, config) -> dict:
    """time_jax of the timed backend (fused with ``config`` on a GPU, reference under
    --quick)."""
    return time_jax(calls.na_fn(p, args.timed_backend, config), sets, args.reps, args.budget_s,
                    loop=args.loop)


def _err(e: BaseException) -> str:
    return error_text(e, 400)


# ------------------------------------------------------------------------------ first process
def tune_step(p: problems.Problem, mode: str, sets, args) -> dict:
    """Trace in ``mode`` (tuning if needed), then time the call traced again in that mode."""
    config = mode_config(args, mode)
    before = cache_entries(config)
    n0 = len(autotune.timing_log())
    t0 = time.perf_counter()
    cfg = lower_config(p, args.dtype, config)
    out = {"config": cfg, "tune_s": round(time.perf_counter() - t0, 3),
           "timed": len(autotune.timing_log()) - n0}
    entry = {k: v for k, v in cache_entries(config).items() if before.get(k) != v}
    out["cache_entries"] = entry
    n1 = len(autotune.timing_log())
    try:
        out["timing"] = time_call(p, sets, args, config)
        out["ms"] = out["timing"]["ms"]
    except Exception as e:  # noqa: BLE001
        out["error"] = _err(e)
    out["retimed_when_called"] = len(autotune.timing_log()) - n1
    return out


def run_problem(p: problems.Problem, args, left_s) -> dict:
    row = {"problem": p.name, "spec": p.to_json(), "dtype": args.dtype}
    sets = random_inputs(shapes(p), args.dtype, 2)
    try:
        t0 = time.perf_counter()
        off = mode_config(args, "off")
        row["default"] = {"config": lower_config(p, args.dtype, off)}
        t = time_call(p, sets, args, off)
        row["default"].update(timing=t, ms=t["ms"], wall_s=time.perf_counter() - t0)
        row["on"] = tune_step(p, "on", sets, args)
        row["mode"] = "on"
        if p.name in args.thorough_names:
            per = row["on"]["tune_s"] / max(1, row["on"]["timed"])
            nap = na_problem(p, args.dtype, mode_config(args, "thorough"))
            n = len(autotune.candidates(nap, False, "thorough"))
            est = per * n
            if est < left_s():
                row["thorough"] = tune_step(p, "thorough", sets, args)
                row["mode"] = "thorough"
            else:
                row["thorough"] = {"skipped": f"{n} candidates, about {est:.0f} s estimated, "
                                              f"{max(0.0, left_s()):.0f} s left"}
    except Exception as e:  # noqa: BLE001
        row["error"] = _err(e)
    del sets
    gc.collect()
    return row


def run_child(args, names: List[str], modes: Dict[str, str], cache_dir: str) -> dict:
    """The second process: same problems and modes, ``cache_dir`` as its cache."""
    cmd = [sys.executable, "-m", "benchmarks.autotune_demo", "--child", "--problems",
           ",".join(names), "--child-modes", json.dumps(modes), "--child-cache-dir", cache_dir,
           "--fused-config", args.fused_config, "--dtype", args.dtype,
           "--reps", str(args.reps), "--budget-s", str(args.budget_s)]
    if args.quick:
        cmd.append("--quick")
    if not args.loop:
        cmd.append("--no-loop")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (REPO, env.get("PYTHONPATH", "")) if x)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=args.child_timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"second process timed out after {args.child_timeout_s:g} s",
                "wall_s": round(time.perf_counter() - t0, 1)}
    out = {"rc": r.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith(CHILD_PREFIX)), None)
    if line is None:
        out["error"] = f"no result (exit {r.returncode}): {r.stderr[-1500:]}"
    else:
        out.update(json.loads(line[len(CHILD_PREFIX):]))
    return out


def verdict(rows: List[dict], child: dict) -> dict:
    """Whether the second process reused the cache: it timed no candidate, and every problem's
    program has the first process's tiles."""
    if "error" in child:
        return {"reused": False, "why": child["error"][:300]}
    timed = int(child.get("timed_total", -1))
    same, compared = 0, 0
    for row in rows:
        mode = row.get("mode")
        mine = (row.get(mode) or {}).get("config") if mode else None
        theirs = (child.get("problems", {}).get(row["problem"]) or {}).get("config")
        if mine is None:
            continue
        compared += 1
        same += int(theirs == mine)
    reused = timed == 0 and compared > 0 and same == compared
    why = (f"second process timed {timed} candidates; same tiles on {same} of {compared} "
           f"problems")
    return {"reused": reused, "timed": timed, "same": same, "compared": compared, "why": why}


# ----------------------------------------------------------------------------- second process
def child_main(args) -> int:
    probs = problems.select(problems.load(quick=args.quick), args.problems)
    modes = json.loads(args.child_modes or "{}")
    out = {"pid": os.getpid(), "cache_dir": autotune.cache_dir(mode_config(args, "off")),
           "problems": {}}
    for p in probs:
        mode = modes.get(p.name, "on")
        config = mode_config(args, mode)
        n0 = len(autotune.timing_log())
        res = {"mode": mode}
        try:
            res["config"] = lower_config(p, args.dtype, config)
            res["timed"] = len(autotune.timing_log()) - n0
            sets = random_inputs(shapes(p), args.dtype, 2)
            res["ms"] = time_call(p, sets, args, config)["ms"]
            del sets
        except Exception as e:  # noqa: BLE001
            res["error"] = _err(e)
        res["timed"] = len(autotune.timing_log()) - n0
        out["problems"][p.name] = res
    out["timed_total"] = len(autotune.timing_log())
    print(CHILD_PREFIX + json.dumps(out), flush=True)
    return 0


# --------------------------------------------------------------------------------- reporting
def _ms(x) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else "-"


def markdown(report: dict) -> str:
    e, c = report["env"], report["config"]
    lines = [f"# Auto-tuner demo ({e['device']}, {c['dtype']}, {e['date']})", "",
             f"Fresh cache `{report['cache_dir']}`. Default = FusedConfig(autotune=\"off\") "
             f"(cost model); tuned = the mode named (on: the {autotune.TOP_K} best candidates by "
             "the cost model, thorough: all). Tiles as read from each lowered program (tokens per "
             f"axis). Call times: {c['timed_backend']} forward, median ms "
             "(benchmarks.harness.timing)"
             + ("; tuner times from a mocked timer (--quick, CPU)" if c["quick"] else "")
             + ". Tuner ms: its own timing of the cost model's tiles and of the winner.", "",
             "| problem | default tiles | default ms | mode | tuned tiles | tuned ms | speedup "
             "| tuner ms (model -> winner) | candidates timed | tuning s | 2nd process timed "
             "| 2nd process tiles | 2nd process ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    child = report.get("second_process") or {}
    for r in report["rows"]:
        d = r.get("default") or {}
        mode = r.get("mode")
        t = r.get(mode) or {} if mode else {}
        entry = next(iter((t.get("cache_entries") or {}).values()), {})
        tuner = (f"{_ms((entry.get('heuristic_seconds') or 0) * 1e3)} -> "
                 f"{_ms((entry.get('seconds') or 0) * 1e3)}" if entry else "-")
        speed = "-" if c["quick"] or not (d.get("ms") and t.get("ms")) \
            else f"{d['ms'] / t['ms']:.2f}x"  # --quick times the reference: tiles do not matter
        ch = (child.get("problems") or {}).get(r["problem"]) or {}
        timed = sum((r.get(m) or {}).get("timed", 0) for m in ("on", "thorough"))
        tune_s = sum((r.get(m) or {}).get("tune_s", 0) for m in ("on", "thorough"))
        lines.append(
            f"| {r['problem']} | {fmt_tiles(d.get('config'))} | {_ms(d.get('ms'))} | "
            f"{mode or '-'} | {fmt_tiles(t.get('config'))} | {_ms(t.get('ms'))} | {speed} | "
            f"{tuner} | {timed} | {tune_s:.1f} | {ch.get('timed', '-')} | "
            f"{fmt_tiles(ch.get('config'))} | {_ms(ch.get('ms'))} |")
    notes = [f"{r['problem']}: {r['error'][:200]}" for r in report["rows"] if r.get("error")]
    notes += [f"{r['problem']} thorough: {r['thorough']['skipped']}" for r in report["rows"]
              if (r.get("thorough") or {}).get("skipped")]
    if notes:
        lines += ["", "Notes: " + "; ".join(n.replace("|", "/") for n in notes)]
    v = report.get("verdict") or {}
    lines += ["", f"Second process (pid {child.get('pid', '?')}, "
              f"{'an EMPTY cache: negative control' if c['child_fresh_cache'] else 'same cache'}"
              f", {child.get('wall_s', '?')} s): {v.get('why', '?')} -> "
              + ("cache REUSED, nothing re-timed." if v.get("reused")
                 else "NOT reused (re-timed or different tiles)."), ""]
    return "\n".join(lines)


def write(report: dict, args) -> None:
    results.write_json(args.out, report)
    if args.md:
        results.write_text(args.md, markdown(report))


# -------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", help=f"comma-separated names (default {DEFAULT_PROBLEMS}; "
                    f"--quick: {QUICK_PROBLEMS})")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--thorough", default=None,
                    help="problems also tuned in mode thorough, time permitting (default "
                    "2d_nat_t; --quick: q2d; '' for none)")
    ap.add_argument("--cache-dir", help="a new folder under this one becomes the cache "
                    "(default: the temporary directory)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=2.0,
                    help="time budget of the timed part of one call timing")
    ap.add_argument("--no-loop", dest="loop", action="store_false",
                    help="per-call medians only (no jitted-loop timing)")
    ap.add_argument("--time-limit-s", type=float,
                    default=float(os.environ.get("AUTOTUNE_DEMO_TIME_LIMIT_S", 240)),
                    help="time for the whole demo (0: no limit; default "
                    "$AUTOTUNE_DEMO_TIME_LIMIT_S or 240): no new problem (or thorough tuning) "
                    "starts unless the time left also covers the second process (estimated "
                    "from the problems done so far), which always runs")
    ap.add_argument("--child-timeout-s", type=float, default=300.0)
    ap.add_argument("--child-fresh-cache", action="store_true",
                    help="negative control: the second process gets an empty cache (it must "
                    "re-time, and the demo must report it)")
    cli.add_fused_config(ap)
    ap.add_argument("--out", help="JSON report")
    ap.add_argument("--md", help="markdown report")
    ap.add_argument("--quick", action="store_true", help="CPU smoke test (mocked tuner timer, "
                    "reference backend timings, tiny problems)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-modes", help=argparse.SUPPRESS)
    ap.add_argument("--child-cache-dir", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.config = cli.fused_config(a.fused_config)
    a.cache_path = a.child_cache_dir  # the cache directory (main() makes a fresh one)
    a.problems = a.problems or (QUICK_PROBLEMS if a.quick else DEFAULT_PROBLEMS)
    if a.thorough is None:
        a.thorough = "q2d" if a.quick else "2d_nat_t"
    a.thorough_names = [x.strip() for x in a.thorough.split(",") if x.strip()]
    a.timed_backend = "reference" if a.quick else "fused"
    if a.quick:
        a.reps, a.budget_s, a.loop = min(a.reps, 3), min(a.budget_s, 0.5), False
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:  # no kernel runs on a CPU: the tuner times candidates with the mock
        from natten_jax.backends import fused

        fused.time_kernel = mock_timer
    if args.child:
        return child_main(args)

    probs = problems.select(problems.load(quick=args.quick), args.problems)
    base = args.cache_dir or tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    cache_dir = tempfile.mkdtemp(prefix="natten_jax_autotune_", dir=base)
    args.cache_path = cache_dir
    autotune.clear_memory_cache()
    if not args.quick and not fused_runs_here():
        log("the fused kernels do not run here; use --quick on a CPU")
    report = {"env": results.env_info(), "argv": sys.argv[1:] if argv is None else list(argv),
              "fused_config": cli.config_json(args.config),
              "config": {"dtype": args.dtype, "quick": args.quick, "reps": args.reps,
                         "budget_s": args.budget_s, "loop": args.loop,
                         "timed_backend": args.timed_backend, "thorough": args.thorough_names,
                         "time_limit_s": args.time_limit_s, "top_k": autotune.TOP_K,
                         "child_fresh_cache": args.child_fresh_cache},
              "cache_dir": cache_dir, "rows": [], "status": {"stopped": None}}
    start = time.perf_counter()

    def left_s() -> float:
        """Seconds left for tuning: the limit less the second process's estimated time
        (start-up, then about one untuned call timing per problem done)."""
        if not args.time_limit_s:
            return float("inf")
        child = CHILD_START_S + sum((r.get("default") or {}).get("wall_s", 0)
                                    for r in report["rows"])
        return args.time_limit_s - (time.perf_counter() - start) - child

    log(f"device {report['env']['device']}; cache {cache_dir}; problems {[p.name for p in probs]}")
    for p in probs:
        if left_s() <= 0:
            report["status"]["stopped"] = "time limit"
            break
        row = run_problem(p, args, left_s)
        report["rows"].append(row)
        m = row.get("mode")
        log(f"{p.name}: default {fmt_tiles((row.get('default') or {}).get('config'))} "
            f"{_ms((row.get('default') or {}).get('ms'))} ms; {m} "
            f"{fmt_tiles((row.get(m) or {}).get('config'))} {_ms((row.get(m) or {}).get('ms'))} "
            f"ms; timed {(row.get(m) or {}).get('timed', '-')} "
            f"{row.get('error', '')}")
        write(report, args)

    done = [r for r in report["rows"] if r.get("mode")]
    child_dir = tempfile.mkdtemp(prefix="natten_jax_autotune_empty_", dir=base) \
        if args.child_fresh_cache else cache_dir
    log(f"second process on {len(done)} problems, cache {child_dir}")
    gc.collect()
    report["second_process"] = run_child(args, [r["problem"] for r in done],
                                         {r["problem"]: r["mode"] for r in done}, child_dir)
    report["verdict"] = verdict(done, report["second_process"])
    report["status"]["elapsed_s"] = round(time.perf_counter() - start, 1)
    write(report, args)
    print(markdown(report), flush=True)
    expected = not report["verdict"]["reused"] if args.child_fresh_cache \
        else report["verdict"]["reused"]
    return 0 if expected else 1


if __name__ == "__main__":
    sys.exit(main())
