"""CPU tests of benchmarks/sweep.py (the problem grid, resuming, stopping on a device error)
and of benchmarks/report.py's comparison numbers. The GPU test runs a few grid problems with the
fused kernel."""

import json
import math

import jax
import pytest

from benchmarks import report, sweep
from natten_jax.checks import check_na_call


# ---------------------------------------------------------------------------------------- grid
@pytest.mark.parametrize("size", sorted(sweep.SIZES))
def test_grid_deterministic_and_valid(size):
    spec = sweep.SIZES[size]
    for rank in (1, 2, 3):
        g = sweep.grid(rank, size)
        assert g == sweep.grid(rank, size), "the grid must not change between calls"
        assert len(g) == spec["ranks"][rank]["n"]
        assert len({p.name for p in g}) == len(g)
        for p in g:
            assert p.rank == rank
            assert p.head_dim in spec["head_dim"] and p.batch in spec["batch"]
            assert p.heads % p.heads_kv == 0
            assert p.stride == (1,) * rank and p.causal == (False,) * rank
            for L, k, d in zip(p.spatial, p.kernel, p.dilation):
                assert k * d <= L, p.name
            assert p.batch * p.tokens * p.heads * p.head_dim <= spec["max_elems"]
            assert 4 * p.batch * p.heads * p.tokens ** 2 * p.head_dim <= spec["max_dense_flops"]
            q = jax.ShapeDtypeStruct((p.batch,) + p.spatial + (p.heads, p.head_dim), "float16")
            kv = jax.ShapeDtypeStruct((p.batch,) + p.spatial + (p.heads_kv, p.head_dim),
                                      "float16")
            check_na_call(rank, q, kv, kv, p.kernel, p.stride, p.dilation, p.causal, None)
    # the grid varies what it should
    allp = [p for r in (1, 2, 3) for p in sweep.grid(r, size)]
    if size != "quick":
        assert {p.head_dim for p in allp} == {32, 64, 128}
    assert any(max(p.dilation) > 1 for p in allp) and any(max(p.dilation) == 1 for p in allp)
    assert any(p.heads_kv < p.heads for p in allp)


def test_sweep_problems_interleaves_ranks():
    ps = sweep.sweep_problems([1, 2, 3], "medium")
    assert [p.rank for p in ps[:6]] == [1, 2, 3, 1, 2, 3]
    assert len(ps) == sum(sweep.SIZES["medium"]["ranks"][r]["n"] for r in (1, 2, 3))
    assert [p.name for p in sweep.sweep_problems([2], "small", 3)] == \
        [p.name for p in sweep.grid(2, "small")[:3]]


# ------------------------------------------------------------------------------------ runs
def test_every_backend_of_ours_and_the_cap(tmp_path, monkeypatch):
    """gemm and naive run beside fused and reference, in the tables' order; naive and reference
    skip problems above --reference-max-gflop; the JSON names the fused configuration."""
    ran = []
    monkeypatch.setattr(sweep, "run_impl", lambda kind, name, *a: ran.append((kind, name))
                        or {"fwd": {"ms": 1.0}})
    rep = sweep.main(["--quick", "--dtype", "float32", "--rank", "1", "--backends",
                      "reference,naive,gemm,fused", "--peers", "", "--fwd-only",
                      "--reference-max-gflop", "0", "--out", str(tmp_path / "s.json"),
                      "--no-progress", "--fused-config", "backward=reference"])
    assert rep["impls"] == ["fused", "gemm", "naive", "reference"]
    assert set(ran) == {("ours", "fused"), ("ours", "gemm")}
    capped = [r for r in rep["rows"] if r["impl"] in ("naive", "reference")]
    assert capped and all("--reference-max-gflop" in r["skipped"] for r in capped)
    assert rep["fused_config"]["backward"] == "reference"


def test_device_error_stops_the_run(tmp_path, monkeypatch):
    calls = []

    def fake(kind, name, p, dtype, sets, args, left_s):
        calls.append((p.name, name))
        return {"fwd": {"error": "XlaRuntimeError: INTERNAL: CUDA error: an illegal memory "
                                 "access was encountered"}}

    monkeypatch.setattr(sweep, "run_impl", fake)
    out = tmp_path / "e.json"
    sweep.main(["--quick", "--dtype", "float32", "--backends", "reference", "--peers", "xla",
                "--fwd-only", "--out", str(out), "--no-progress"])
    data = json.loads(out.read_text())
    assert len(calls) == 1 and data["status"]["done"] == 1
    assert data["status"]["stopped"].startswith("device error")


def test_resume_runs_only_what_is_missing(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(sweep, "run_impl", lambda kind, name, p, *a: ran.append((p.name, name))
                        or {"fwd": {"ms": 1.0}})
    argv = ["--quick", "--dtype", "float32", "--rank", "1", "--backends", "reference",
            "--peers", "xla", "--fwd-only", "--no-progress"]
    full = sweep.main(argv + ["--out", str(tmp_path / "full.json")])
    n = full["status"]["planned"]
    assert len(ran) == 2 * n and n >= 3
    # an earlier run that stopped after two problems (the second without its xla row)
    part = json.loads((tmp_path / "full.json").read_text())
    names = [p["name"] for p in part["problems"]]
    part["rows"] = [r for r in part["rows"] if r["problem"] in names[:2]][:-1]
    (tmp_path / "part.json").write_text(json.dumps(part))
    ran.clear()
    out = sweep.main(argv + ["--resume", str(tmp_path / "part.json"),
                             "--out", str(tmp_path / "rest.json")])
    assert [x[0] for x in ran[::2]] == names[1:]  # the first problem was not run again
    assert out["status"]["done"] == n and out["resumed_from"]["pairs"] == 1
    assert sorted((r["problem"], r["impl"]) for r in out["rows"]) == \
        sorted((r["problem"], r["impl"]) for r in full["rows"])
    with pytest.raises(SystemExit, match="impls"):  # another set of implementations
        sweep.main([a if a != "xla" else "" for a in argv] +
                   ["--resume", str(tmp_path / "part.json")])


# -------------------------------------------------------------------------------------- report
def _row(name, rank, impl, fwd_ms, bwd_ms=None, dtype="float16", window=9, tokens=4096):
    spatial = [tokens] if rank == 1 else [64, tokens // 64] + [1] * (rank - 2)
    row = {"problem": name, "rank": rank, "dtype": dtype, "impl": impl, "window": window,
           "tokens": tokens, "spec": {"name": name, "spatial": spatial, "kernel": [3] * rank},
           "useful_flops": 1e9, "min_bytes": 1e6}
    if fwd_ms is not None:
        row["fwd"] = {"ms": fwd_ms, "useful_tflops": 1e9 / (fwd_ms / 1e3) / 1e12,
                      "pct_floor": 10.0}
    else:
        row["fwd"] = {"error": "RuntimeError: boom"}
    if bwd_ms is not None:
        row["fwd_bwd"] = {"ms": bwd_ms, "useful_tflops": 3.5e9 / (bwd_ms / 1e3) / 1e12}
    return row


def synthetic() -> dict:
    """fused vs cudnn on 4 1-D and 2 2-D problems (fp16), plus failures.

    1-D fwd ms: fused 1, 2, 3, 4; cudnn 2, 2, 1.5, 8 -> fused at least as fast on 3 of 4 (75%),
    speedups 2, 1, 0.5, 2 -> mean 1.375, min 0.5, max 2, geomean 2^(1/4) = 1.1892.
    2-D fwd ms: fused 1, 1; cudnn 3, 0.5 -> 50%, speedups 3, 0.5 -> mean 1.75.
    fwd+bwd only on the first two 1-D problems: fused 4, 10; cudnn 5, 8 -> 50%, mean 1.025.
    """
    rows = []
    for i, (f, c) in enumerate([(1, 2), (2, 2), (3, 1.5), (4, 8)]):
        fb, cb = [(4, 5), (10, 8), (None, None), (None, None)][i]
        rows.append(_row(f"p1_{i}", 1, "fused", f, fb, window=7 * (i + 1)))
        rows.append(_row(f"p1_{i}", 1, "cudnn", c, cb, window=7 * (i + 1)))
    for i, (f, c) in enumerate([(1, 3), (1, 0.5)]):
        rows.append(_row(f"p2_{i}", 2, "fused", f, window=49 * (i + 1)))
        rows.append(_row(f"p2_{i}", 2, "cudnn", c, window=49 * (i + 1)))
    rows.append(_row("p2_fail", 2, "fused", None))  # failed: not counted
    rows.append(_row("p2_fail", 2, "cudnn", 1.0))
    rows.append({**_row("p2_skip", 2, "cudnn", None), "skipped": "too big"})
    rows[-1].pop("fwd")
    return {"env": {"device": "synthetic", "date": "today", "jax": "x"},
            "constants": {"peak_tflops": 630.0, "peak_tbps": 3.0, "bwd_factor": 2.5,
                          "size": "synthetic"},
            "ranks": [1, 2], "status": {"planned": 7, "done": 7, "stopped": None},
            "rows": rows}


def _cell(cmp, mode, rank):
    (c,) = [c for c in cmp if c["mode"] == mode and c["rank"] == rank]
    return c


def test_report_numbers_by_hand():
    rep = synthetic()
    assert report.impls(rep) == ["fused", "cudnn"]
    cmp = report.compare(rep)
    assert {(c["a"], c["b"]) for c in cmp} == {("fused", "cudnn")}
    c = _cell(cmp, "fwd", 1)
    assert (c["n"], c["wins"], c["pct"]) == (4, 3, 75.0)
    assert c["mean"] == pytest.approx(1.375) and c["min"] == 0.5 and c["max"] == 2.0
    assert c["geomean"] == pytest.approx(2 ** 0.25)
    c = _cell(cmp, "fwd", 2)
    assert (c["n"], c["wins"], c["pct"]) == (2, 1, 50.0) and c["mean"] == pytest.approx(1.75)
    c = _cell(cmp, "fwd", "all")
    assert (c["n"], c["wins"]) == (6, 4)
    assert c["mean"] == pytest.approx((2 + 1 + 0.5 + 2 + 3 + 0.5) / 6)
    c = _cell(cmp, "fwd_bwd", 1)
    assert (c["n"], c["wins"]) == (2, 1) and c["mean"] == pytest.approx((5 / 4 + 8 / 10) / 2)
    # tolerance: 3 vs 1.5 is 100% slower, 10 vs 8 is 25% slower
    c = _cell(report.compare(rep, tolerance_pct=30), "fwd_bwd", 1)
    assert c["wins"] == 2


# ----------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_fused_vs_cudnn_small(tmp_path):
    out = tmp_path / "g.json"
    sweep.main(["--size", "small", "--max-problems", "3", "--backends", "fused", "--peers",
                "cudnn", "--fwd-only", "--reps", "3", "--budget-s", "0.5", "--out", str(out),
                "--no-progress"])
    data = json.loads(out.read_text())
    fused = [r for r in data["rows"] if r["impl"] == "fused"]
    assert len(fused) == 3
    for r in fused:
        assert r["fwd"]["ms"] > 0, r
        assert r["visited_flops"] >= r["useful_flops"]
    md = report.markdown(data)
    assert "fused vs cudnn" in md and not math.isnan(report.compare(data)[0]["mean"])
