"""docs/benchmarks.md's generated tables and plots against benchmarks/results/*.json
(benchmarks/results_docs.py, benchmarks/svg.py, `python -m benchmarks.report --docs`)."""

import json
import os
import re

import pytest

from benchmarks import report, results_docs, svg

REPO = results_docs.REPO


# ------------------------------------------------------------------------- the committed docs
def test_docs_tables_equal_the_generator():
    """The committed doc is what --docs makes of the committed JSON, block by block."""
    made = results_docs.blocks()
    with open(results_docs.DOC) as fh:
        doc = fh.read()
    assert made, "benchmarks/results/ holds no results"
    for name, (md, _) in made.items():
        begin = results_docs.begin_marker(name)
        assert doc.count(begin) == 1, f"docs/benchmarks.md has no single block for {name}"
        inside = doc.split(begin, 1)[1].split(results_docs.END_MARKER, 1)[0]
        assert inside == "\n" + md + "\n", (
            f"the block of {name} differs from the JSON: run python -m benchmarks.report --docs")
    assert results_docs.rewrite(doc, made) == doc


def test_docs_plots_equal_the_generator():
    made = results_docs.blocks()
    with open(results_docs.DOC) as fh:
        doc = fh.read()
    stems = [s for _, plots in made.values() for s in plots]
    assert stems
    for _, plots in made.values():
        for stem, body in plots.items():
            path = os.path.join(results_docs.PLOTS_DIR, stem + ".svg")
            with open(path) as fh:
                assert fh.read() == body, f"{path} is stale: run python -m benchmarks.report --docs"
            assert f"]({results_docs.PLOTS_REL}/{stem}.svg)" in doc
    # No plot that no results file makes (the duplicated PNGs of old are gone).
    on_disk = sorted(os.listdir(results_docs.PLOTS_DIR))
    assert on_disk == sorted(s + ".svg" for s in stems)
    assert results_docs.stale() == []


def test_docs_hold_no_json_and_no_decoding_marks():
    docs = os.path.join(REPO, "docs")
    found = [os.path.join(d, f) for d, _, fs in os.walk(docs) for f in fs if f.endswith(".json")]
    assert found == []
    with open(results_docs.DOC) as fh:
        doc = fh.read()
    for mark in ("†", "°", "‡", "§", "¶"):
        assert mark not in doc, f"docs/benchmarks.md uses the mark {mark!r}"
    assert not re.search(r"\d~", doc), "a '~' after a number is a mark the reader must decode"
    assert not re.search(r"^#+ Session", doc, re.M), "session-ordered section"


def test_every_results_file_loads_and_has_a_command():
    for name in results_docs.results_files():
        res = results_docs.load_results(os.path.join(results_docs.RESULTS_DIR, name))
        assert res["command"].strip() and re.fullmatch(r"[0-9a-f]{7,40}", res["commit"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", res["date"]), (name, res["date"])


# ---------------------------------------------------------------------------- the generator
def _bench():
    return {"device": "GPU X", "commit": "abcdef1", "date": "2026-01-02",
            "command": "python -m benchmarks.bench_na --results x.json",
            "rows": [{"problem": "p1", "impl": "natten_jax", "mode": "fwd", "ms": 2.0},
                     {"problem": "p1", "impl": "natten", "mode": "fwd", "ms": 3.0,
                      "note": "measured twice"},
                     {"problem": "p1", "impl": "natten_jax", "mode": "fwdbwd", "ms": 8.0},
                     {"problem": "p2", "impl": "cudnn", "mode": "fwd", "ms": 5.0},
                     {"problem": "p2", "impl": "natten_jax", "mode": "fwd", "ms": 0.5}]}


def _write(tmp_path, name, data):
    d = tmp_path / "results"
    d.mkdir(exist_ok=True)
    (d / name).write_text(json.dumps(data))
    return str(d)


def test_bench_table_by_hand(tmp_path):
    res = results_docs.load_results(os.path.join(_write(tmp_path, "g.json", _bench()), "g.json"))
    assert res["kind"] == "bench"
    md, plots = results_docs.block(res, "g.json")
    assert md.startswith("GPU X, 2026-01-02, natten_jax commit `abcdef1`. Made by:\n\n"
                         "    python -m benchmarks.bench_na --results x.json\n")
    head = ("| problem | forward: natten_jax | forward: NATTEN | forward: cuDNN dense "
            "| forward: NATTEN / natten_jax | forward: cuDNN dense / natten_jax "
            "| forward + backward: natten_jax |")
    assert head in md
    assert "| p1 | 2 | 3 |  | 1.50x |  | 8 |" in md  # natten_jax first, ratios t_X / t_ours
    assert "| p2 | 0.5 |  | 5 |  | 10.00x |  |" in md
    assert "- p1, NATTEN forward: measured twice." in md
    assert sorted(plots) == ["g-fwd", "g-fwdbwd"]
    assert "](plots/g-fwd.svg)" in md


def test_bench_float32_rows_get_their_own_table(tmp_path):
    """float32 rows (bench_na --dtype float32: with a precision) leave the main table and its
    plots as they were and add a table by problem and precision."""
    data = _bench()
    plain_md, plain_plots = results_docs.block(results_docs.load_results(os.path.join(
        _write(tmp_path, "g.json", data), "g.json")), "g.json")
    data["rows"] += [
        {"problem": "p1", "impl": "natten_jax", "mode": "fwd", "ms": 4.0, "dtype": "float32",
         "precision": "default"},
        {"problem": "p1", "impl": "natten_jax", "mode": "fwd", "ms": 7.0, "dtype": "float32",
         "precision": "highest"},
        {"problem": "p1", "impl": "xla", "mode": "fwdbwd", "ms": 9.0, "dtype": "float32",
         "precision": "highest"}]
    md, plots = results_docs.block(results_docs.load_results(os.path.join(
        _write(tmp_path, "g.json", data), "g.json")), "g.json")
    assert plots == plain_plots
    main, f32 = md.split("float32 inputs (")
    assert plain_md.startswith(main) and "| 4 |" not in main
    assert ("| problem | precision | forward: natten_jax | forward + backward: XLA dense |"
            in f32)
    assert "| p1 | default | 4 |  |" in f32 and "| p1 | highest | 7 | 9 |" in f32
    only = dict(data, rows=data["rows"][-3:])  # a file of float32 rows only
    md, _ = results_docs.block(results_docs.load_results(os.path.join(
        _write(tmp_path, "h.json", only), "h.json")), "h.json")
    assert "forward: natten_jax (default)" in md and "float32 inputs (" not in md


def test_models_table_by_hand(tmp_path):
    rows = [{"variant": "nat_mini", "backend": b, "dtype": "bfloat16", "mode": "infer",
             "images_per_s": ips, "timing": {"spread_pct": sp}}
            for b, ips, sp in (("fused", 1000.0, 5.0), ("dense", 800.0, 30.0))]
    rows[1]["impl"] = "cudnn"
    rows.append({"variant": "nat_tiny", "backend": "fused", "dtype": "bfloat16",
                 "mode": "infer", "images_per_s": 97.94, "note": "old kernels"})
    rows.append({"variant": "nat_base", "backend": "dense", "dtype": "float32", "mode": "train",
                 "skipped": "not run"})
    data = {"kind": "models", "device": "GPU X", "commit": "abcdef1", "date": "2026-01-02",
            "command": "python -m benchmarks.model_throughput", "config": {"batch": 128,
                                                                            "image_size": 224},
            "variants": ["nat_mini", "nat_tiny", "nat_base"], "rows": rows}
    md, plots = results_docs.block(data, "m.json")
    assert "| model | fused | dense (cuDNN) | fused vs dense |" in md
    assert "| nat_mini | 1,000 | 800 | 1.25x |" in md
    assert "| nat_tiny | 97.9 |  |  |" in md
    assert "nat_base" not in md  # nothing measured: no row, no fp32 table
    assert "Training step" not in md
    assert "nat_mini dense inference bf16 (30%)" in md and "(5%)" not in md
    assert "Old kernels: nat_tiny fused inference bf16." in md
    assert list(plots) == ["m-infer-bf16"]


def test_unfused_summary_by_hand():
    rows = []
    for p, (naive, gemm, fused) in {"a": (4.0, 1.0, 0.5), "b": (3.0, 2.0, 0.5)}.items():
        for impl, ms in (("naive", naive), ("gemm", gemm), ("fused", fused)):
            rows.append({"problem": p, "dtype": "float32", "impl": impl, "fwd": {"ms": ms}})
    data = {"kind": "unfused", "device": "GPU X", "commit": "abcdef1", "date": "2026-01-02",
            "command": "python -m benchmarks.unfused_bench", "rows": rows,
            "problems": [{"name": n, "batch": 1, "spatial": [8], "heads": 1, "head_dim": 32,
                          "kernel": [3], "dilation": [1]} for n in ("a", "b")]}
    md, _ = results_docs.block(data, "u.json")
    # gemm over naive: 4, 1.5 -> mean 2.75; fused over gemm: 2, 4 -> mean 3
    assert "| float32 | fwd | 2.75x | 1.50x | 4.00x | 2 of 2 | 3.00x | 2.00x | 4.00x |" in md
    assert "| a | float32 | 4.000 | 1.000 | 0.500 |" in md


def test_sweep_block_uses_the_report_tables():
    rows = []
    for i, (rank, f, c, fb, cb) in enumerate([(1, 1.0, 2.0, 4.0, 5.0), (1, 2.0, 1.0, None, None),
                                              (2, 1.0, 3.0, None, None)]):
        for impl, fwd, bwd in (("fused", f, fb), ("cudnn", c, cb)):
            r = {"problem": f"p{i}", "rank": rank, "dtype": "float16", "impl": impl,
                 "window": 9, "tokens": 4096, "fwd": {"ms": fwd},
                 "spec": {"spatial": [4096] if rank == 1 else [64, 64], "kernel": [3] * rank}}
            if bwd:
                r["fwd_bwd"] = {"ms": bwd}
            rows.append(r)
    data = {"kind": "sweep", "device": "GPU X", "commit": "abcdef1", "date": "2026-01-02",
            "command": "python -m benchmarks.sweep", "status": {"planned": 4, "done": 3},
            "rows": rows}
    md, plots = results_docs.block(data, "s.json")
    assert "3 of the grid's 4 problems ran" in md
    assert report.table1(report.compare(data)) in md
    assert "| fused vs cudnn | fwd | 50.0% (1/2) | 100.0% (1/1) | 66.7% (2/3) |" in md
    assert report.table3(report.compare(data)) in md
    assert sorted(plots) == ["s-fused-over-cudnn-fwd", "s-fused-over-cudnn-fwdbwd"]


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("commit"), "missing field 'commit'"),
    (lambda d: d.update(kind="plots"), "field 'kind' must be one of"),
    (lambda d: d["rows"][0].pop("impl"), "row 0 lacks field 'impl'"),
    (lambda d: d["rows"][1].update(mode="bwd"), "row 1: field 'mode' must be one of"),
    (lambda d: d["rows"][2].update(ms=0), "row 2: field 'ms' must be a positive number"),
    (lambda d: d.update(rows=[]), "field 'rows' must be a non-empty list"),
])
def test_bad_results_name_the_field(tmp_path, change, message):
    data = _bench()
    change(data)
    path = os.path.join(_write(tmp_path, "bad.json", data), "bad.json")
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        results_docs.load_results(path)
    assert "bad.json" in str(e.value)


def test_rewrite_and_check_round_trip(tmp_path):
    rdir = _write(tmp_path, "g.json", _bench())
    doc = tmp_path / "doc.md"
    b, e = results_docs.begin_marker("g.json"), results_docs.END_MARKER
    doc.write_text(f"# T\n\nprose\n\n{b}\nold table\n{e}\n\nmore prose\n")
    plots = tmp_path / "plots"
    assert str(doc) in results_docs.stale(str(doc), rdir, str(plots))
    written = results_docs.write_docs(str(doc), rdir, str(plots))
    assert sorted(os.path.basename(p) for p in written) == ["doc.md", "g-fwd.svg",
                                                            "g-fwdbwd.svg"]
    text = doc.read_text()
    assert "old table" not in text and "prose\n\n" + b + "\nGPU X, 2026-01-02" in text
    assert text.endswith(f"{e}\n\nmore prose\n")
    assert results_docs.stale(str(doc), rdir, str(plots)) == []
    # Regenerating is idempotent.
    results_docs.write_docs(str(doc), rdir, str(plots))
    assert doc.read_text() == text


def test_rewrite_errors():
    made = {"a.json": ("A", {}), "b.json": ("B", {})}
    a, b, e = (results_docs.begin_marker("a.json"), results_docs.begin_marker("b.json"),
               results_docs.END_MARKER)
    with pytest.raises(ValueError, match=r"without a block in the doc: \['b.json'\]"):
        results_docs.rewrite(f"{a}\n{e}\n", made)
    with pytest.raises(ValueError, match="c.json, which does not exist"):
        results_docs.rewrite(f"{a}\n{e}\n{b}\n{e}\n{results_docs.begin_marker('c.json')}\n{e}",
                             made)
    with pytest.raises(ValueError, match="block of a.json has no end marker"):
        results_docs.rewrite(f"{a}\nx\n{b}\n{e}\n", made)


def test_cli_check_fails_on_a_stale_doc(tmp_path, monkeypatch):
    rdir = _write(tmp_path, "g.json", _bench())
    doc = tmp_path / "doc.md"
    doc.write_text(f"{results_docs.begin_marker('g.json')}\nold\n{results_docs.END_MARKER}\n")
    monkeypatch.setattr(results_docs, "RESULTS_DIR", rdir)
    monkeypatch.setattr(results_docs, "DOC", str(doc))
    monkeypatch.setattr(results_docs, "PLOTS_DIR", str(tmp_path / "plots"))
    monkeypatch.setattr(results_docs.write_docs, "__defaults__",
                        (str(doc), rdir, str(tmp_path / "plots")))
    monkeypatch.setattr(results_docs.stale, "__defaults__",
                        (str(doc), rdir, str(tmp_path / "plots")))
    with pytest.raises(SystemExit) as e:
        report.main(["--check"])
    assert e.value.code == 1
    report.main(["--docs"])
    report.main(["--check"])  # current now: no exit
    with pytest.raises(SystemExit):
        report.main(["--docs", "x.json"])


# -------------------------------------------------------------------------------------- svg
def test_svg_bars_scale_and_errors():
    text = svg.bars("T", ["a", "b"], ["s1", "s2"], {("a", "s1"): 1.0, ("a", "s2"): 10.0,
                                                    ("b", "s1"): 100.0}, "ms")
    assert text.startswith("<svg ") and text.rstrip().endswith("</svg>")
    widths = [float(w) for w in re.findall(r'<rect x="150" y="[\d.]+" width="([\d.]+)"', text)]
    assert len(widths) == 3  # the missing ("b", "s2") has no bar
    # log axis over [1, 100]: bar lengths 0 (clamped to 1 px), half and full width
    assert widths[0] == 1.0 and widths[2] == pytest.approx(2 * widths[1], abs=0.2)
    assert text == svg.bars("T", ["a", "b"], ["s1", "s2"], {("a", "s1"): 1.0,
                            ("a", "s2"): 10.0, ("b", "s1"): 100.0}, "ms")  # deterministic
    with pytest.raises(ValueError, match="no positive value"):
        svg.bars("T", ["a"], ["s"], {}, "ms")


def test_svg_scatter_points_and_errors():
    text = svg.scatter("T", ["1-D"], {"1-D": [(0.01, 2.0), (0.1, 0.5)]}, "x", "y", hline=1.0)
    assert text.count("<circle") == 2 + 1  # two points and one legend dot
    assert 'stroke-dasharray="5,4"' in text
    with pytest.raises(ValueError, match="positive"):
        svg.scatter("T", ["s"], {"s": [(0.0, 1.0)]}, "x", "y")
