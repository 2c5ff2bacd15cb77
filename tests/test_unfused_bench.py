"""CPU smoke test of benchmarks/unfused_bench.py (--quick: tiny problems, reference only)."""

import json

from benchmarks import unfused_bench


def test_quick_cli(tmp_path, capsys):
    out, md = tmp_path / "u.json", tmp_path / "u.md"
    rep = unfused_bench.main(["--quick", "--time-limit-s", "120", "--budget-s", "0.05",
                              "--reps", "2", "--out", str(out), "--md", str(md)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == rep["rows"] and saved["summary"] == rep["summary"]
    n = len(unfused_bench.QUICK) * 2 * len(rep["env"]["impls"])
    assert len(rep["rows"]) == n
    for row in rep["rows"]:
        for mode in ("fwd", "fwd_bwd"):
            assert row[mode].get("ms", 0) > 0 or "skipped" in row[mode], row
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == md.read_text().strip().splitlines()[-1]
    assert any(line.startswith("| float32 | fwd_bwd |") for line in printed)
    assert {s["dtype"] for s in rep["summary"]} == {"float16", "float32"}


def test_time_limit_and_summary():
    rep = unfused_bench.main(["--quick", "--problems", "q1d", "--time-limit-s", "0"])
    assert all(r[m]["skipped"] == "not run: time limit" for r in rep["rows"]
               for m in ("fwd", "fwd_bwd"))
    rows = [dict(problem="a", dtype="float32", impl=i, fwd=dict(ms=t))
            for i, t in (("naive", 4.0), ("gemm", 2.0), ("fused", 1.0))]
    rows += [dict(problem="b", dtype="float32", impl=i, fwd=dict(ms=t))
             for i, t in (("naive", 1.0), ("gemm", 2.0))]
    s = unfused_bench.summary(rows, ["float32"], ["fwd"])[0]
    assert s["gemm_over_naive"] == dict(n=2, avg=1.25, min=0.5, max=2.0, wins=1)
    assert s["fused_over_gemm"] == dict(n=1, avg=2.0, min=2.0, max=2.0, wins=1)
    assert "1/2 (50%)" in unfused_bench.markdown(dict(rows=rows, summary=[s]))
