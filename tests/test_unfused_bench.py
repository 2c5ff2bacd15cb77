"""CPU test of benchmarks/unfused_bench.py: the summary's ratios (the paper's Table 3 numbers)."""

from benchmarks import unfused_bench


def test_summary_ratios_by_hand():
    rows = [dict(problem="a", dtype="float32", impl=i, fwd=dict(ms=t))
            for i, t in (("naive", 4.0), ("gemm", 2.0), ("fused", 1.0))]
    rows += [dict(problem="b", dtype="float32", impl=i, fwd=dict(ms=t))
             for i, t in (("naive", 1.0), ("gemm", 2.0))]
    rows += [dict(problem="c", dtype="float32", impl="gemm", fwd=dict(skipped="cannot run"))]
    s = unfused_bench.summary(rows, ["float32"], ["fwd"])[0]
    assert s["gemm_over_naive"] == dict(n=2, avg=1.25, min=0.5, max=2.0, wins=1)
    assert s["fused_over_gemm"] == dict(n=1, avg=2.0, min=2.0, max=2.0, wins=1)
    text = unfused_bench.markdown(dict(rows=rows, summary=[s]))
    assert "| float32 | fwd | 1.25x | 0.50x | 2.00x | 1/2 (50%) | 2.00x | 2.00x | 2.00x |" in text
    assert "| c | float32 | gemm | cannot run | - |" in text
    # the CLI, in-process: with no time, every measurement is recorded as not run
    rep = unfused_bench.main(["--quick", "--problems", "q1d", "--time-limit-s", "0"])
    assert [r["problem"] for r in rep["rows"]] == ["q1d", "q1d"]  # float16, float32
    assert all(r[m]["skipped"] == "not run: time limit" for r in rep["rows"]
               for m in ("fwd", "fwd_bwd"))
