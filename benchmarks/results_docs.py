"""The tables and plots of docs/benchmarks.md, generated from ``benchmarks/results/*.json``.

Every results file is one measurement set on one GPU, with a common header::

    {"device": "NVIDIA H200", "commit": "28c65fa", "date": "2026-12-02",
     "command": "python -m benchmarks.bench_na ...", "kind": "bench", "rows": [...]}

``kind`` (default ``"bench"``) says what the rows hold:

* ``bench`` (``bench_na --results``): ``{"problem", "impl", "mode": "fwd" | "fwdbwd", "ms"}``,
  optionally ``"note"`` (said under the table); top level optionally ``"about"`` (a sentence on
  how it was timed) and ``"problems"`` (problem name -> description);
* ``sweep`` (``benchmarks.sweep --out``, header added): the paper-style share and speedup tables
  of :mod:`benchmarks.report`;
* ``models`` (``benchmarks.model_throughput --out``, one device's rows): images/s per model,
  backend, dtype and mode (``"note"`` per row as above);
* ``unfused`` (``benchmarks.unfused_bench --out``, header added): naive vs gemm vs fused;
* ``ragged`` (``benchmarks.bench_ragged --results``): ``{"problem", "mode", "variant", "ms"}``
  with ``"work_fraction"`` and ``"batch"``, variants ``plain``, ``full_extent``,
  ``ragged_full``, ``ragged_half``: the cost of ``valid_extent``; top level ``"problems"``
  (problem name -> description).

In docs/benchmarks.md each file's block sits between the two marker lines that
:func:`begin_marker` and :data:`END_MARKER` write; ``python -m benchmarks.report --docs``
rewrites the blocks and the plots (SVG, docs/plots/), and tests/test_report.py checks that the
committed docs equal what this module makes of the committed JSON.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from typing import Dict, List, Optional, Tuple

from benchmarks import report, svg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")
DOC = os.path.join(REPO, "docs", "benchmarks.md")
PLOTS_DIR = os.path.join(REPO, "docs", "plots")
PLOTS_REL = "plots"  # the plots' folder relative to the doc

KINDS = ("bench", "sweep", "models", "unfused", "ragged")
HEADER = ("device", "commit", "date", "command", "rows")
BENCH_MODES = {"fwd": "forward", "fwdbwd": "forward + backward"}
IMPL_NAMES = {"natten_jax": "natten_jax", "natten": "NATTEN", "cudnn": "cuDNN dense",
              "flex": "Flex", "xla": "XLA dense"}
MODEL_BACKENDS = ("reference", "naive", "gemm", "fused", "dense")
MODEL_MODES = {"infer": "inference", "train": "training step"}
DENSE_IMPLS = {"cudnn": "cuDNN", "xla": "XLA",
               "cudnn_or_xla": "cuDNN; XLA on the 49-token last level, which cuDNN's backward "
                               "rejects"}
SPREAD_PCT = 20.0  # timed calls spreading more than this are named under the models tables
END_MARKER = "<!-- end of generated block -->"
_BEGIN_RE = re.compile(r"<!-- generated from benchmarks/results/([A-Za-z0-9._-]+\.json) by "
                       r"`python -m benchmarks\.report --docs`: edit the JSON, not this -->")


def begin_marker(name: str) -> str:
    return (f"<!-- generated from benchmarks/results/{name} by `python -m benchmarks.report "
            f"--docs`: edit the JSON, not this -->")


# ----------------------------------------------------------------------------------- loading
def load_results(path: str) -> dict:
    """A results file, checked: ValueError naming the file and the missing or bad field."""
    name = os.path.basename(path)
    with open(path) as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{name}: a results file holds a JSON object, got {type(data).__name__}")
    for key in HEADER:
        if key not in data:
            raise ValueError(f"{name}: missing field {key!r} (every results file has "
                             f"{', '.join(HEADER)})")
    kind = data.get("kind", "bench")
    if kind not in KINDS:
        raise ValueError(f"{name}: field 'kind' must be one of {KINDS}, got {kind!r}")
    if not isinstance(data["rows"], list) or not data["rows"]:
        raise ValueError(f"{name}: field 'rows' must be a non-empty list")
    need = {"bench": ("problem", "impl", "mode", "ms"),
            "models": ("variant", "backend", "dtype", "mode"),
            "sweep": ("problem", "impl", "dtype"),
            "unfused": ("problem", "impl", "dtype"),
            "ragged": ("problem", "mode", "variant", "ms")}[kind]
    for i, r in enumerate(data["rows"]):
        for key in need:
            if key not in r:
                raise ValueError(f"{name}: row {i} lacks field {key!r} (rows of kind {kind!r} "
                                 f"have {', '.join(need)})")
        if kind == "bench":
            if r["mode"] not in BENCH_MODES:
                raise ValueError(f"{name}: row {i}: field 'mode' must be one of "
                                 f"{tuple(BENCH_MODES)}, got {r['mode']!r}")
            if not isinstance(r["ms"], (int, float)) or not r["ms"] > 0:
                raise ValueError(f"{name}: row {i}: field 'ms' must be a positive number, got "
                                 f"{r['ms']!r}")
    data["kind"] = kind
    return data


def results_files(results_dir: str = RESULTS_DIR) -> List[str]:
    return sorted(f for f in os.listdir(results_dir) if f.endswith(".json"))


# ------------------------------------------------------------------------------------ pieces
def _ms(x: float) -> str:
    return f"{x:g}"


def _rate(x: Optional[float]) -> str:
    if x is None:
        return ""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _ratio(num: Optional[float], den: Optional[float]) -> str:
    return f"{num / den:.2f}x" if num and den else ""


def _table(head: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _header(res: dict) -> List[str]:
    out = [f"{res['device']}, {res['date']}, natten_jax commit `{res['commit']}`. Made by:", "",
           "    " + res["command"], ""]
    if res.get("about"):
        out += [res["about"], ""]
    return out


def _image(stem: str, title: str) -> str:
    return f"![{title}]({PLOTS_REL}/{stem}.svg)"


# ------------------------------------------------------------------------------------- bench
def _is_f32(r: dict) -> bool:
    """A float32 row of a bench file (``bench_na --dtype float32``: it names its precision);
    they sit beside the file's 16-bit rows and get a table of their own."""
    return r.get("dtype") == "float32" and bool(r.get("precision"))


def _f32_table(rows: List[dict]) -> List[str]:
    """The float32 rows: ms per problem and precision, one column per mode and impl."""
    name = lambda i: IMPL_NAMES.get(i, i)  # noqa: E731
    keys, impls, t = [], [], {}
    for r in rows:
        if (r["problem"], r["precision"]) not in keys:
            keys.append((r["problem"], r["precision"]))
        if r["impl"] not in impls:
            impls.append(r["impl"])
        t[(r["problem"], r["precision"], r["impl"], r["mode"])] = float(r["ms"])
    cols = [(m, i) for m in BENCH_MODES for i in impls
            if any((p, pr, i, m) in t for p, pr in keys)]
    head = ["problem", "precision"] + [f"{BENCH_MODES[m]}: {name(i)}" for m, i in cols]
    body = [[p, pr] + [_ms(t[(p, pr, i, m)]) if (p, pr, i, m) in t else "" for m, i in cols]
            for p, pr in keys]
    return ["float32 inputs (`bench_na --dtype float32 --precision default,highest`): "
            "`default` runs natten_jax's float32 kernels with TF32 products (3xTF32 logits), "
            "`highest` with 3xTF32 everywhere (float32-accurate); the dense peers run under "
            "`jax.default_matmul_precision` of the same name. Times in ms.", "",
            _table(head, body), ""]


def _bench(res: dict, stem: str) -> Tuple[List[str], Dict[str, str]]:
    f32 = [r for r in res["rows"] if _is_f32(r)]
    rows = [r for r in res["rows"] if not _is_f32(r)]
    if not rows:  # float32 rows only: the main table names each impl's precision
        rows = [dict(r, impl=f"{r['impl']} ({r['precision']})") for r in f32]
        f32 = []
    problems: List[str] = []
    impls: List[str] = []
    t: Dict[Tuple[str, str, str], float] = {}
    notes = []
    for r in rows:
        if r["problem"] not in problems:
            problems.append(r["problem"])
        if r["impl"] not in impls:
            impls.append(r["impl"])
        t[(r["problem"], r["impl"], r["mode"])] = float(r["ms"])
        if r.get("note"):
            notes.append(f"- {r['problem']}, {IMPL_NAMES.get(r['impl'], r['impl'])} "
                         f"{BENCH_MODES[r['mode']]}: {r['note']}.")
    base = "natten_jax" if "natten_jax" in impls else impls[0]
    impls = [base] + [i for i in impls if i != base]
    modes = [m for m in BENCH_MODES if any(k[2] == m for k in t)]
    cols = []  # (mode, impl, is_ratio)
    for m in modes:
        present = [i for i in impls if any((p, i, m) in t for p in problems)]
        cols += [(m, i, False) for i in present]
        cols += [(m, i, True) for i in present if i != base]
    name = lambda i: IMPL_NAMES.get(i, i)  # noqa: E731
    head = ["problem"] + [
        f"{BENCH_MODES[m]}: {name(i)} / {name(base)}" if ratio else f"{BENCH_MODES[m]}: {name(i)}"
        for m, i, ratio in cols]
    body = []
    for p in problems:
        cells = [p]
        for m, i, ratio in cols:
            if ratio:
                cells.append(_ratio(t.get((p, i, m)), t.get((p, base, m))))
            else:
                cells.append(_ms(t[(p, i, m)]) if (p, i, m) in t else "")
        body.append(cells)
    out = _header(res)
    out += [_table(head, body), ""]
    others = [name(i) for i in impls if i != base]
    text = "Times in ms (lower is faster); an empty cell was not measured."
    if others:
        text += (f" X / {name(base)} is X's time over {name(base)}'s: above 1, {name(base)} is "
                 "faster.")
    out += [text, ""]
    if res.get("problems"):
        out += ["Problems (layout `[batch, *spatial, heads, head_dim]`, bf16):", ""]
        out += [f"- `{p}`: {res['problems'][p]}" for p in problems if p in res["problems"]]
        out += [""]
    if notes:
        out += ["Notes on single cells:", ""] + notes + [""]
    if f32:
        out += _f32_table(f32)
    plots = {}
    if len(impls) > 1:
        for m in modes:
            series = [i for i in impls if any((p, i, m) in t for p in problems)]
            title = f"{res['device']}: {BENCH_MODES[m]}, ms (log scale)"
            plots[f"{stem}-{m}"] = svg.bars(
                title, problems, [name(i) for i in series],
                {(p, name(i)): t[(p, i, m)] for p in problems for i in series if (p, i, m) in t},
                "ms (lower is faster)")
            out += [_image(f"{stem}-{m}", title), ""]
    return out, plots


# ------------------------------------------------------------------------------------ models
def _dense_label(rows: List[dict]) -> str:
    impls = sorted({r.get("impl") for r in rows if r["backend"] == "dense" and r.get("impl")})
    if len(impls) == 1:
        return f"dense ({DENSE_IMPLS.get(impls[0], impls[0])})"
    return "dense"


def _models(res: dict, stem: str) -> Tuple[List[str], Dict[str, str]]:
    rows = [r for r in res["rows"] if isinstance(r.get("images_per_s"), (int, float))]
    variants = [v for v in res.get("variants", []) if any(r["variant"] == v for r in rows)]
    variants += sorted({r["variant"] for r in rows} - set(variants))
    backends = [b for b in MODEL_BACKENDS if any(r["backend"] == b for r in rows)]
    dtypes = [d for d in ("bfloat16", "float16", "float32") if any(r["dtype"] == d for r in rows)]
    cfg = res.get("config", {})
    out = _header(res)
    out += [f"Images/s (higher is faster) at batch {cfg.get('batch', '?')}, "
            f"{cfg.get('image_size', '?')}x{cfg.get('image_size', '?')}, no relative positional "
            "bias, median of the timed calls. reference = pure JAX, gemm = our unfused kernels, "
            "fused = our fused kernels, dense = the same model with dense self-attention. "
            "An empty cell was not measured on this GPU.", ""]
    plots = {}
    spread, noted = [], {}
    for mode in MODEL_MODES:
        for dt in dtypes:
            sel = [r for r in rows if r["mode"] == mode and r["dtype"] == dt]
            if not sel:
                continue
            cell = {(r["variant"], r["backend"]): r for r in sel}
            here = [b for b in backends if any(r["backend"] == b for r in sel)]
            ratios = [b for b in ("gemm", "dense", "reference") if b in here and "fused" in here]
            head = (["model"] + [_dense_label(sel) if b == "dense" else b for b in here]
                    + [f"fused vs {b}" for b in ratios])
            body = []
            for v in variants:
                if not any((v, b) in cell for b in here):
                    continue
                rate = {b: cell[(v, b)]["images_per_s"] for b in here if (v, b) in cell}
                line = [v] + [_rate(rate.get(b)) for b in here]
                line += [_ratio(rate.get("fused"), rate.get(b)) for b in ratios]
                body.append(line)
                for b in here:
                    r = cell.get((v, b))
                    if r is None:
                        continue
                    pct = (r.get("timing") or {}).get("spread_pct")
                    what = f"{v} {b} {MODEL_MODES[mode]} {report.DTYPE_SHORT.get(dt, dt)}"
                    if pct is not None and pct > SPREAD_PCT:
                        spread.append(f"{what} ({pct:.0f}%)")
                    if r.get("note"):
                        noted.setdefault(r["note"], []).append(what)
            title = f"{MODEL_MODES[mode].capitalize()}, {report.DTYPE_SHORT.get(dt, dt)}"
            out += [f"{title}:", "", _table(head, body), ""]
            if len(here) > 1:
                s = f"{stem}-{mode}-{report.DTYPE_SHORT.get(dt, dt)}"
                plots[s] = svg.bars(
                    f"{res['device']}: {title.lower()}, images/s (log scale)",
                    [line[0] for line in body], here,
                    {(v, b): cell[(v, b)]["images_per_s"] for v in variants for b in here
                     if (v, b) in cell}, "images/s (higher is faster)")
                out += [_image(s, f"{title}, images/s"), ""]
    if spread:
        out += [f"Cells whose timed calls spread more than {SPREAD_PCT:g}% (max - min over the "
                "median; the median is shown): " + ", ".join(spread) + ".", ""]
    for note, cells in noted.items():
        out += [f"{note[0].upper() + note[1:]}: " + ", ".join(cells) + ".", ""]
    return out, plots


# ------------------------------------------------------------------------------------- sweep
def _sweep(res: dict, stem: str) -> Tuple[List[str], Dict[str, str]]:
    cmp = report.compare(res)
    st = res.get("status", {})
    out = _header(res)
    out += [f"{st.get('done', '?')} of the grid's {st.get('planned', '?')} problems ran "
            f"(implementations {', '.join(report.impls(res))}; dtypes "
            f"{', '.join(report.DTYPE_SHORT.get(d, d) for d in report._dtypes(res))}). "
            "Speedup of A over B = time of B / time of A.", "",
            "Share of problems where A is at least as fast as B:", "", report.table1(cmp), "",
            "Speedup of A over B:", "", report.table3(cmp), ""]
    rank_of = report._ranks(res)
    spec_of = {r["problem"]: r for r in res["rows"]}
    names = report.impls(res)
    base, plots = names[0], {}
    for mode, label in report.MODES:
        t = report.times(res, mode)
        for b in names[1:]:
            pts: Dict[str, List[Tuple[float, float]]] = {}
            for (prob, _), per in sorted(t.items()):
                if base in per and b in per:
                    r = spec_of[prob]
                    frac = r["window"] / r["tokens"]
                    pts.setdefault(f"{rank_of[prob]}-D", []).append((frac, per[b] / per[base]))
            if not pts:
                continue
            s = f"{stem}-{base}-over-{b}-{mode.replace('_', '')}"
            title = f"{res['device']}: {base} speedup over {b}, {label}"
            plots[s] = svg.scatter(title, sorted(pts), pts, "window / tokens",
                                   f"time of {b} / time of {base}", hline=1.0)
            out += [_image(s, title), ""]
    return out, plots


# ----------------------------------------------------------------------------------- unfused
def _unfused(res: dict, stem: str) -> Tuple[List[str], Dict[str, str]]:
    t: Dict[Tuple[str, str, str, str], float] = {}
    for r in res["rows"]:
        for mode in ("fwd", "fwd_bwd"):
            m = r.get(mode)
            if isinstance(m, dict) and isinstance(m.get("ms"), (int, float)):
                t[(r["problem"], r["dtype"], r["impl"], mode)] = float(m["ms"])
    problems = [p["name"] for p in res.get("problems", [])] or sorted({k[0] for k in t})
    dtypes = [d for d in ("float16", "bfloat16", "float32") if any(k[1] == d for k in t)]
    labels = {"fwd": "fwd", "fwd_bwd": "fwd+bwd"}
    out = _header(res)
    out += ["Each entry is `na*d(..., backend=impl)` under `jax.jit`: naive and gemm run logits "
            "(our unfused kernels), a float32 softmax and the weighted sum; fused is "
            "`backend=\"fused\"`. Speedup of A over B = time of B / time of A, over the "
            "problems below.", ""]
    head = ["dtype", "mode", "gemm over naive: mean", "min", "max", "gemm faster than naive",
            "fused over gemm: mean", "min", "max"]
    body = []
    for dt in dtypes:
        for mode in labels:
            line = [dt, labels[mode]]
            for a, b in (("gemm", "naive"), ("fused", "gemm")):
                s = [t[(p, dt, b, mode)] / t[(p, dt, a, mode)] for p in problems
                     if (p, dt, a, mode) in t and (p, dt, b, mode) in t]
                if s:
                    line += [f"{statistics.fmean(s):.2f}x", f"{min(s):.2f}x", f"{max(s):.2f}x"]
                    if a == "gemm":
                        line.append(f"{sum(x > 1 for x in s)} of {len(s)}")
                else:
                    line += [""] * (4 if a == "gemm" else 3)
            body.append(line)
    out += [_table(head, body), "", "Problems:", ""]
    for p in res.get("problems", []):
        out.append(f"- `{p['name']}`: batch {p['batch']}, extents {tuple(p['spatial'])}, heads "
                   f"{p['heads']}, head dim {p['head_dim']}, kernel {tuple(p['kernel'])}, "
                   f"dilation {tuple(p['dilation'])}")
    out += ["", "Times in ms:", ""]
    impls = [i for i in ("naive", "gemm", "fused") if any(k[2] == i for k in t)]
    head = ["problem", "dtype"] + [f"{i} {labels[m]}" for m in labels for i in impls]
    body = [[p, dt] + [f"{t[(p, dt, i, m)]:.3f}" if (p, dt, i, m) in t else ""
                       for m in labels for i in impls]
            for p in problems for dt in dtypes]
    out += [_table(head, body), ""]
    return out, {}


# ------------------------------------------------------------------------------------ ragged
def _ragged(res: dict, stem: str) -> Tuple[List[str], Dict[str, str]]:
    t: Dict[Tuple[str, str, str], dict] = {}
    problems: List[str] = []
    for r in res["rows"]:
        if r["problem"] not in problems:
            problems.append(r["problem"])
        t[(r["problem"], r["mode"], r["variant"])] = r
    ms = lambda p, m, v: t[(p, m, v)]["ms"] if (p, m, v) in t else None  # noqa: E731
    head = ["problem", "mode", "no valid_extent", "all full", "all full / none",
            "ragged batch: all full", "half the samples half-size", "ideal", "half-size / ideal"]
    body = []
    for p in problems:
        for m in BENCH_MODES:
            if not any(k[:2] == (p, m) for k in t):
                continue
            full, half = ms(p, m, "ragged_full"), ms(p, m, "ragged_half")
            frac = (t.get((p, m, "ragged_half")) or {}).get("work_fraction")
            ideal = full * frac if full and frac else None
            cells = [ms(p, m, "plain"), ms(p, m, "full_extent")]
            body.append([p, BENCH_MODES[m]] + [_ms(x) if x else "" for x in cells]
                        + [f"{cells[1] / cells[0]:.3f}x" if all(cells) else "",
                           _ms(full) if full else "",
                           _ms(half) if half else "", f"{ideal:.4g}" if ideal else "",
                           _ratio(half, ideal)])
    out = _header(res)
    out += [_table(head, body), "",
            "Times in ms. *all full / none*: a call with `valid_extent` at every sample's full "
            "extent over the same call without it (the argument's own cost). The ragged batch "
            "has max(2, batch) samples, every other one half-size on every axis; *ideal* is the "
            "all-full ragged batch's time times the share of its tokens left, and *half-size / "
            "ideal* near 1 means the time follows the work (tiles outside a sample are "
            "skipped).", ""]
    if res.get("problems"):
        out += ["Problems (layout `[batch, *spatial, heads, head_dim]`):", ""]
        out += [f"- `{p}`: {res['problems'][p]}" for p in problems if p in res["problems"]]
        out += [""]
    return out, {}


_KIND = {"bench": _bench, "models": _models, "sweep": _sweep, "unfused": _unfused,
         "ragged": _ragged}


def block(res: dict, name: str) -> Tuple[str, Dict[str, str]]:
    """(markdown between the markers, {plot stem: SVG text}) of results file ``name``."""
    stem = name[:-len(".json")]
    lines, plots = _KIND[res["kind"]](res, stem)
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines), plots


def blocks(results_dir: str = RESULTS_DIR) -> Dict[str, Tuple[str, Dict[str, str]]]:
    return {n: block(load_results(os.path.join(results_dir, n)), n)
            for n in results_files(results_dir)}


# ------------------------------------------------------------------------------- the doc
def rewrite(doc: str, made: Dict[str, Tuple[str, Dict[str, str]]]) -> str:
    """``doc`` with each generated block replaced by ``made[name][0]``. ValueError for a marker
    naming a file that ``made`` lacks, a begin marker without its end, and a results file with
    no block in the doc."""
    out, pos, seen = [], 0, set()
    for m in _BEGIN_RE.finditer(doc):
        if m.start() < pos:
            continue
        name = m.group(1)
        if name not in made:
            raise ValueError(f"docs block names benchmarks/results/{name}, which does not exist")
        end = doc.find(END_MARKER, m.end())
        nxt = _BEGIN_RE.search(doc, m.end())
        if end < 0 or (nxt and nxt.start() < end):
            raise ValueError(f"the block of {name} has no end marker ({END_MARKER!r})")
        out += [doc[pos:m.end()], "\n", made[name][0], "\n"]
        pos = end
        seen.add(name)
    out.append(doc[pos:])
    missing = sorted(set(made) - seen)
    if missing:
        raise ValueError(f"results without a block in the doc: {missing}; add the lines "
                         f"{begin_marker(missing[0])!r} and {END_MARKER!r} where they belong")
    return "".join(out)


def write_docs(doc_path: str = DOC, results_dir: str = RESULTS_DIR,
               plots_dir: str = PLOTS_DIR) -> List[str]:
    """Rewrites the generated blocks of ``doc_path`` and the plots; returns the files written."""
    made = blocks(results_dir)
    with open(doc_path) as fh:
        text = rewrite(fh.read(), made)
    with open(doc_path, "w") as fh:
        fh.write(text)
    written = [doc_path]
    os.makedirs(plots_dir, exist_ok=True)
    for _, plots in made.values():
        for stem, body in plots.items():
            path = os.path.join(plots_dir, stem + ".svg")
            with open(path, "w") as fh:
                fh.write(body)
            written.append(path)
    return written


def stale(doc_path: str = DOC, results_dir: str = RESULTS_DIR,
          plots_dir: str = PLOTS_DIR) -> List[str]:
    """The files ``write_docs`` would change (empty when the docs are current)."""
    made = blocks(results_dir)
    with open(doc_path) as fh:
        text = fh.read()
    out = [] if rewrite(text, made) == text else [doc_path]
    for _, plots in made.values():
        for stem, body in plots.items():
            path = os.path.join(plots_dir, stem + ".svg")
            if not os.path.exists(path) or open(path).read() != body:
                out.append(path)
    return out
