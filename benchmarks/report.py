"""Paper-style tables and plots from a sweep JSON (benchmarks/sweep.py), and the generated
tables of docs/benchmarks.md.

  python -m benchmarks.report sweep.json [--md sweep.md] [--plots plots/] [--tolerance-pct 0]
  python -m benchmarks.report --docs      # rewrite docs/benchmarks.md's tables and docs/plots/
                                          # from benchmarks/results/*.json
  python -m benchmarks.report --check     # exit 1 if they differ from what --docs would write

``--docs`` and ``--check``: :mod:`benchmarks.results_docs` (the results format and the doc's
block markers).

* Table 1 style: for each pair of implementations (A, B) and mode (fwd, fwd+bwd), the share of
  problems, per dtype and rank, where A is at least as fast as B (t_A <= t_B * (1 + tolerance)),
  over the problems where both have a time.
* Table 3 style: speedup of A over B (t_B / t_A; the paper's "improvement" is speedup - 1):
  arithmetic mean, geometric mean, min and max, per mode, dtype and rank.
* Plots (matplotlib, Agg), three PNG files: ``speedup_dist.png`` (distribution of the speedup of
  the first implementation, normally fused, over each other one, per rank), ``tflops_window.png``
  (useful TFLOP/s against window size prod(kernel), with the H100 roofline of bench_na: peak
  matrix throughput and the bandwidth bound of Q, K, V, O read or written once), and
  ``speedup_window.png`` (speedup against the window's share of the tokens).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
from typing import Dict, List, Optional, Tuple

# The order implementations run in (benchmarks.sweep) and appear in the tables.
IMPL_ORDER = ("fused", "gemm", "naive", "reference", "cudnn", "xla", "flex")
MODES = (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd"))
DTYPE_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
PLOT_FILES = ("speedup_dist.png", "tflops_window.png", "speedup_window.png")


def load(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def impls(report: dict) -> List[str]:
    """Implementations with at least one row, in IMPL_ORDER (unknown names last)."""
    seen = []
    for r in report["rows"]:
        if r["impl"] not in seen:
            seen.append(r["impl"])
    return sorted(seen, key=lambda n: (IMPL_ORDER.index(n) if n in IMPL_ORDER else 99, n))


def _ms(row: dict, mode: str) -> Optional[float]:
    t = row.get(mode)
    if isinstance(t, dict) and isinstance(t.get("ms"), (int, float)) and t["ms"] > 0:
        return float(t["ms"])
    return None


def times(report: dict, mode: str) -> Dict[Tuple[str, str], Dict[str, float]]:
    """{(problem, dtype): {impl: ms}} for the measured (impl, problem, dtype) of one mode."""
    out: Dict[Tuple[str, str], Dict[str, float]] = {}
    for r in report["rows"]:
        ms = _ms(r, mode)
        if ms is not None:
            out.setdefault((r["problem"], r["dtype"]), {})[r["impl"]] = ms
    return out


def _ranks(report: dict) -> Dict[str, int]:
    return {r["problem"]: int(r.get("rank") or len(r["spec"]["spatial"])) for r in report["rows"]}


def _dtypes(report: dict) -> List[str]:
    present = {r["dtype"] for r in report["rows"]}
    order = [d for d in ("float16", "bfloat16", "float32") if d in present]
    return order + sorted(present - set(order))


def pairs(report: dict) -> List[Tuple[str, str]]:
    return list(itertools.combinations(impls(report), 2))


def compare(report: dict, tolerance_pct: float = 0.0) -> List[dict]:
    """One dict per (A, B, mode, dtype, rank) with both timed on >= 1 problem, rank "all" too:
    n, wins (A at least as fast), pct, speedups (t_B / t_A) and their mean / geomean / min / max.
    """
    rank_of = _ranks(report)
    out = []
    for mode, _ in MODES:
        t = times(report, mode)
        for a, b in pairs(report):
            for dt in _dtypes(report):
                by_rank: Dict[object, List[float]] = {}
                wins: Dict[object, int] = {}
                for (prob, d), per in sorted(t.items()):
                    if d != dt or a not in per or b not in per:
                        continue
                    for key in (rank_of[prob], "all"):
                        by_rank.setdefault(key, []).append(per[b] / per[a])
                        win = per[a] <= per[b] * (1 + tolerance_pct / 100.0)
                        wins[key] = wins.get(key, 0) + int(win)
                for key in sorted(by_rank, key=lambda k: (k == "all", str(k))):
                    s = by_rank[key]
                    out.append(dict(a=a, b=b, mode=mode, dtype=dt, rank=key, n=len(s),
                                    wins=wins[key], pct=100.0 * wins[key] / len(s),
                                    speedups=s, mean=statistics.fmean(s),
                                    geomean=math.exp(statistics.fmean(math.log(x) for x in s)),
                                    min=min(s), max=max(s)))
    return out


def _rank_label(k) -> str:
    return "all" if k == "all" else f"{k}-D"


def table1(cmp: List[dict]) -> str:
    """Rows: pair and mode; columns: dtype x rank; cells: % of problems A >= B (wins/n)."""
    cols = []
    for c in cmp:
        if (c["dtype"], c["rank"]) not in cols:
            cols.append((c["dtype"], c["rank"]))
    cols.sort(key=lambda x: (_dtype_key(x[0]), x[1] == "all", str(x[1])))
    rows: Dict[Tuple[str, str, str], Dict[tuple, dict]] = {}
    for c in cmp:
        rows.setdefault((c["a"], c["b"], c["mode"]), {})[(c["dtype"], c["rank"])] = c
    head = "| A vs B | mode | " + " | ".join(
        f"{DTYPE_SHORT.get(d, d)} {_rank_label(k)}" for d, k in cols) + " |"
    lines = [head, "|---|---|" + "---|" * len(cols)]
    for (a, b, mode), cells in rows.items():
        vals = []
        for col in cols:
            c = cells.get(col)
            vals.append(f"{c['pct']:.1f}% ({c['wins']}/{c['n']})" if c else "")
        lines.append(f"| {a} vs {b} | {dict(MODES)[mode]} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def table3(cmp: List[dict]) -> str:
    """Rows: pair, mode, dtype, rank; columns: n, mean / geomean / min / max speedup."""
    lines = ["| A over B | mode | dtype | rank | n | avg speedup | geomean | min | max |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in sorted(cmp, key=lambda c: (IMPL_ORDER.index(c["a"]) if c["a"] in IMPL_ORDER else 99,
                                        IMPL_ORDER.index(c["b"]) if c["b"] in IMPL_ORDER else 99,
                                        c["mode"] != "fwd", _dtype_key(c["dtype"]),
                                        c["rank"] == "all", str(c["rank"]))):
        lines.append(f"| {c['a']} over {c['b']} | {dict(MODES)[c['mode']]} "
                     f"| {DTYPE_SHORT.get(c['dtype'], c['dtype'])} | {_rank_label(c['rank'])} "
                     f"| {c['n']} | {c['mean']:.3f}x | {c['geomean']:.3f}x | {c['min']:.3f}x "
                     f"| {c['max']:.3f}x |")
    return "\n".join(lines)


def _dtype_key(d: str) -> int:
    return ("float16", "bfloat16", "float32").index(d) if d in ITEMSIZE else 9


def efficiency(report: dict) -> str:
    """Median useful TFLOP/s and % of floor per implementation, mode, dtype and rank."""
    groups: Dict[tuple, List[dict]] = {}
    rank_of = _ranks(report)
    for r in report["rows"]:
        for mode, _ in MODES:
            t = r.get(mode)
            if isinstance(t, dict) and "useful_tflops" in t:
                groups.setdefault((r["impl"], mode, r["dtype"], rank_of[r["problem"]]),
                                  []).append(t)
    lines = ["| impl | mode | dtype | rank | n | median useful TFLOP/s | max useful TFLOP/s "
             "| median % floor |", "|---|---|---|---|---|---|---|---|"]
    for key in sorted(groups, key=lambda k: (IMPL_ORDER.index(k[0]) if k[0] in IMPL_ORDER else 99,
                                            k[1] != "fwd", _dtype_key(k[2]), k[3])):
        ts = groups[key]
        tf = [t["useful_tflops"] for t in ts]
        fl = [t["pct_floor"] for t in ts if "pct_floor" in t]
        floor = f"{statistics.median(fl):.3g}" if fl else ""
        lines.append(f"| {key[0]} | {dict(MODES)[key[1]]} | {DTYPE_SHORT.get(key[2], key[2])} "
                     f"| {key[3]}-D | {len(ts)} | {statistics.median(tf):.3g} | {max(tf):.3g} "
                     f"| {floor} |")
    return "\n".join(lines)


def failures(report: dict, limit: int = 12) -> str:
    """Counts of failed / skipped measurements per implementation, and the distinct messages."""
    counts: Dict[str, Dict[str, int]] = {}
    msgs: Dict[Tuple[str, str], int] = {}
    for r in report["rows"]:
        c = counts.setdefault(r["impl"], {"timed": 0, "failed": 0, "skipped": 0})
        if "skipped" in r:
            c["skipped"] += 1
            msgs[(r["impl"], r["skipped"][:160])] = msgs.get((r["impl"], r["skipped"][:160]), 0) + 1
            continue
        for mode, _ in MODES:
            t = r.get(mode)
            if not isinstance(t, dict):
                continue
            if "error" in t:
                c["failed"] += 1
                k = (r["impl"], f"{mode}: " + t["error"][:160])
                msgs[k] = msgs.get(k, 0) + 1
            elif "ms" in t:
                c["timed"] += 1
    lines = ["| impl | timed | failed | skipped |", "|---|---|---|---|"]
    for impl in sorted(counts, key=lambda n: IMPL_ORDER.index(n) if n in IMPL_ORDER else 99):
        c = counts[impl]
        lines.append(f"| {impl} | {c['timed']} | {c['failed']} | {c['skipped']} |")
    top = sorted(msgs.items(), key=lambda kv: -kv[1])[:limit]
    if top:
        lines += ["", "Most frequent failure / skip messages:", ""]
        lines += [f"- {impl} ({n}x): `{m.replace('`', chr(39))}`" for (impl, m), n in top]
    return "\n".join(lines)


def worst(cmp: List[dict], report: dict, k: int = 5) -> str:
    """Per pair (first implementation vs each other, fwd), the k problems with lowest speedup."""
    lines = []
    for mode, label in MODES:
        t = times(report, mode)
        for a, b in pairs(report):
            if a != impls(report)[0]:
                continue
            s = sorted(((per[b] / per[a], prob, d) for (prob, d), per in t.items()
                        if a in per and b in per))
            if not s:
                continue
            lines.append(f"- {a} over {b}, {label}: " + "; ".join(
                f"{prob} {DTYPE_SHORT.get(d, d)} {x:.2f}x" for x, prob, d in s[:k]))
    return "\n".join(lines)


def markdown(report: dict, tolerance_pct: float = 0.0) -> str:
    e = report.get("env", {})
    c = report.get("constants", {})
    st = report.get("status", {})
    cmp = compare(report, tolerance_pct)
    tol = f" (within {tolerance_pct:g}%)" if tolerance_pct else ""
    out = [
        f"# natten_jax sweep ({e.get('device', '?')}, {', '.join(_dtypes(report))}, "
        f"{e.get('date', '?')})",
        "",
        f"Grid `{c.get('size', '?')}`, ranks {report.get('ranks', '?')}, implementations "
        f"{', '.join(impls(report))}; {st.get('done', '?')} of {st.get('planned', '?')} problem x "
        f"dtype runs in {st.get('elapsed_s', '?')} s"
        + (f" (stopped: {st['stopped']})" if st.get("stopped") else "") + ". "
        f"jax {e.get('jax', '?')}; fused backward: {e.get('fused_backward', '?')}. Times: "
        "benchmarks.timing.time_jax (jitted loop of calls when it fits the budget, else median "
        "of single calls). Speedup of A over B = t_B / t_A (the paper's improvement = speedup "
        "- 1). cuDNN = dense self-attention over all tokens.",
        "",
        f"## A at least as fast as B{tol}: share of problems (Table 1 style)",
        "",
        table1(cmp) if cmp else "(no pair of implementations timed on a common problem)",
        "",
        "## Speedup of A over B (Table 3 style)",
        "",
        table3(cmp) if cmp else "(no pair of implementations timed on a common problem)",
        "",
        f"## Useful throughput (roofline: {c.get('peak_tflops', '?')} TFLOP/s, "
        f"{c.get('peak_tbps', '?')} TB/s)",
        "",
        efficiency(report),
        "",
    ]
    w = worst(cmp, report)
    if w:
        out += ["## Lowest speedups", "", w, ""]
    out += ["## Failures", "", failures(report), ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------ plots
def _rank_list(report) -> List[int]:
    return sorted(set(_ranks(report).values()))


def _modes_present(report) -> List[str]:
    return [m for m, _ in MODES if any(_ms(r, m) is not None for r in report["rows"])]


def plots(report: dict, outdir: str) -> List[str]:
    """Writes up to three PNG files (PLOT_FILES) into ``outdir``; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"[report] no plots: matplotlib unavailable ({type(e).__name__}: {e})",
              file=sys.stderr)
        return []
    os.makedirs(outdir, exist_ok=True)
    ranks = _rank_list(report)
    modes = _modes_present(report)
    names = impls(report)
    if not ranks or not modes:
        return []
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    markers = {"float16": "o", "bfloat16": "s", "float32": "^"}
    rank_of = _ranks(report)
    spec_of = {r["problem"]: r for r in report["rows"]}
    written = []

    def grid_axes():
        fig, axes = plt.subplots(len(modes), len(ranks), squeeze=False,
                                 figsize=(4.6 * len(ranks), 3.8 * len(modes)))
        return fig, axes

    def save(fig, name):
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        for ax in fig.axes:  # ticks 1, 2, 5, 10, ... as plain numbers on log axes
            for axis in (ax.xaxis, ax.yaxis):
                if axis.get_scale() == "log":
                    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                    axis.set_minor_formatter(NullFormatter())
        path = os.path.join(outdir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    base = names[0]
    others = names[1:]

    # 1. distribution of speedups of the first implementation over each other one, per rank
    if others:
        fig, axes = grid_axes()
        for i, mode in enumerate(modes):
            t = times(report, mode)
            for j, rank in enumerate(ranks):
                ax = axes[i][j]
                data, labels, who = [], [], []
                for b in others:
                    s = [per[b] / per[base] for (prob, _), per in t.items()
                         if rank_of[prob] == rank and base in per and b in per]
                    if s:
                        data.append(s)
                        labels.append(f"{b}\n(n={len(s)})")
                        who.append(b)
                if data:
                    ax.boxplot(data, whis=(0, 100))
                    ax.set_xticks(list(range(1, len(labels) + 1)))
                    ax.set_xticklabels(labels)
                    for k, s in enumerate(data):
                        xs = [k + 1 + 0.25 * (((h * 0.6180339) % 1.0) - 0.5)
                              for h in range(len(s))]
                        ax.scatter(xs, s, s=8, alpha=0.5, color=colors[who[k]])
                    ax.set_yscale("log")
                ax.axhline(1.0, color="k", lw=0.8, ls="--")
                ax.set_title(f"{rank}-D, {dict(MODES)[mode]}: {base} speedup over")
                ax.set_ylabel(f"t_other / t_{base}")
        save(fig, PLOT_FILES[0])

    # 2. useful TFLOP/s vs window size, with the roofline
    c = report.get("constants", {})
    peak = float(c.get("peak_tflops", 630.0))
    bw = float(c.get("peak_tbps", 3.0))
    bwd = float(c.get("bwd_factor", 2.5))
    fig, axes = grid_axes()
    dtypes = _dtypes(report)
    for i, mode in enumerate(modes):
        for j, rank in enumerate(ranks):
            ax = axes[i][j]
            wins = []
            for n in names:
                for dt in dtypes:
                    pts = [(r.get("window") or math.prod(r["spec"]["kernel"]),
                            r[mode]["useful_tflops"]) for r in report["rows"]
                           if r["impl"] == n and r["dtype"] == dt and rank_of[r["problem"]] == rank
                           and isinstance(r.get(mode), dict) and "useful_tflops" in r[mode]]
                    if pts:
                        wins += [p[0] for p in pts]
                        ax.scatter(*zip(*pts), s=12, alpha=0.7, color=colors[n],
                                   marker=markers.get(dt, "o"),
                                   label=f"{n} {DTYPE_SHORT.get(dt, dt)}")
            if wins:
                lo, hi = max(1, min(wins) / 1.5), max(wins) * 1.5
                xs = [lo * (hi / lo) ** (k / 60) for k in range(61)]
                # Multi-head, no borders: work 4*T*K*D per head against 4*T*D*itemsize bytes;
                # fwd+bwd: (1 + bwd) x the work against 3x the bytes.
                ratio = 1.0 if mode == "fwd" else (1 + bwd) / 3.0
                for s in sorted({ITEMSIZE.get(dt, 2) for dt in dtypes}):
                    ax.plot(xs, [min(peak, bw * x / s * ratio) for x in xs], "k--", lw=0.9,
                            label=f"roofline ({s}-byte, MHA)")
                ax.axhline(peak, color="gray", lw=0.6)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.legend(fontsize=7, loc="lower right")
            ax.set_title(f"{rank}-D, {dict(MODES)[mode]}")
            ax.set_xlabel("window size prod(kernel)")
            ax.set_ylabel("useful TFLOP/s")
    save(fig, PLOT_FILES[1])

    # 3. speedup vs the window's share of all tokens
    if others:
        fig, axes = grid_axes()
        for i, mode in enumerate(modes):
            t = times(report, mode)
            for j, rank in enumerate(ranks):
                ax = axes[i][j]
                for b in others:
                    pts = []
                    for (prob, _), per in t.items():
                        if rank_of[prob] == rank and base in per and b in per:
                            r = spec_of[prob]
                            frac = (r.get("window") or math.prod(r["spec"]["kernel"])) / \
                                (r.get("tokens") or math.prod(r["spec"]["spatial"]))
                            pts.append((frac, per[b] / per[base]))
                    if pts:
                        ax.scatter(*zip(*pts), s=12, alpha=0.7, color=colors[b],
                                   label=f"over {b}")
                ax.axhline(1.0, color="k", lw=0.8, ls="--")
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_title(f"{rank}-D, {dict(MODES)[mode]}: {base} speedup")
                ax.set_xlabel("window / tokens")
                ax.set_ylabel(f"t_other / t_{base}")
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)
        save(fig, PLOT_FILES[2])
    return written


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="?", help="sweep JSON (benchmarks/sweep.py --out)")
    ap.add_argument("--docs", action="store_true",
                    help="rewrite the generated tables of docs/benchmarks.md and docs/plots/*.svg "
                         "from benchmarks/results/*.json")
    ap.add_argument("--check", action="store_true",
                    help="exit with status 1 if --docs would change a file")
    ap.add_argument("--md", help="write the markdown here (else print it)")
    ap.add_argument("--plots", help="folder for the PNG plots")
    ap.add_argument("--tolerance-pct", type=float, default=0.0,
                    help="A 'matches' B when t_A <= t_B * (1 + this / 100) (default 0)")
    a = ap.parse_args(argv)
    if a.docs or a.check:
        from benchmarks import results_docs

        if a.json:
            ap.error("--docs and --check take no sweep JSON")
        if a.check:
            changed = results_docs.stale()
            for p in changed:
                print(f"[report] out of date: {os.path.relpath(p, results_docs.REPO)}",
                      file=sys.stderr)
            if changed:
                print("[report] run: python -m benchmarks.report --docs", file=sys.stderr)
                sys.exit(1)
            return ""
        for p in results_docs.write_docs():
            print(f"[report] wrote {os.path.relpath(p, results_docs.REPO)}", file=sys.stderr)
        return ""
    if not a.json:
        ap.error("give a sweep JSON, or --docs / --check")
    report = load(a.json)
    md = markdown(report, a.tolerance_pct)
    if a.md:
        os.makedirs(os.path.dirname(os.path.abspath(a.md)), exist_ok=True)
        with open(a.md, "w") as fh:
            fh.write(md)
    else:
        print(md)
    if a.plots:
        for p in plots(report, a.plots):
            print(f"[report] plot {p}", file=sys.stderr)
    return md


if __name__ == "__main__":
    main()
