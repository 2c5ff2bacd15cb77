"""CPU tests of benchmarks/model_throughput.py: the work count against the papers; with a fake
measurement, the table's numbers and marks and the resume / shard / merge semantics; the GPU
lock around ahead-of-time compiled calls; one real tiny model timed."""

import argparse
import fcntl
import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import model_throughput as mt
from benchmarks.harness.aot import Compiled
from benchmarks.harness.flops import model_gmacs
from benchmarks.harness.timing import time_calls

# FLOPs (= multiply-accumulates) at 224x224 in the NAT and DiNAT papers / official READMEs.
PAPER_GFLOPS = {"nat_mini": 2.7, "nat_tiny": 4.3, "nat_small": 7.8, "nat_base": 13.7,
                "dinat_mini": 2.7, "dinat_tiny": 4.3, "dinat_small": 7.8, "dinat_base": 13.7}


def test_gmacs_match_the_papers():
    for variant, paper in PAPER_GFLOPS.items():
        got = model_gmacs(mt.model_config(variant))
        assert abs(got - paper) <= 0.03 * paper, (variant, got)
    cfg = mt.model_config("dinat_tiny", max_depth=2)  # the smoke tests' cut
    assert cfg["depths"] == (2, 2, 2, 2)
    assert cfg["dilations"] == ((1, 8), (1, 4), (1, 2), (1, 1))


# ---------------------------------------------------------------- run loop, fake measurement
@pytest.fixture
def fake(monkeypatch):
    """measure() without JAX work: fixed rates per backend; some backends fail."""
    calls = []
    rates = {"fused": 400.0, "dense": 200.0, "reference": 100.0}
    state = {"fail": {}, "spread": {}}

    def measure(variant, backend, dtype, mode, batches, args):
        calls.append((variant, backend, dtype, mode))
        if backend in state["fail"]:
            raise RuntimeError(state["fail"][backend])
        rate = rates[backend] / (2 if mode == "train" else 1)
        return {"params": 5_000_000, "ms": 1e3 * args.batch / rate, "images_per_s": rate,
                "timing": {"compile_s": 0.1, "spread_pct": state["spread"].get(backend, 1.0)}}

    monkeypatch.setattr(mt, "measure", measure)
    monkeypatch.setattr(mt, "make_batches", lambda *a, **k: [])
    monkeypatch.setattr(mt, "probe_backend",
                        lambda b, d, a: "" if b != "gemm" else "this natten_jax has no gemm")
    monkeypatch.setattr(mt, "_official_params_m", lambda v: {"nat_mini": 20, "nat_base": 90}[v])
    return calls, state


GRID = ["--variants", "nat_mini,nat_base", "--backends", "fused,dense", "--dtypes", "bf16",
        "--modes", "infer,train", "--time-limit-s", "0"]


def test_run_order_errors_and_tables(fake, tmp_path):
    calls, state = fake
    state["fail"] = {"reference": "RESOURCE_EXHAUSTED: Out of memory while trying to allocate"}
    out, md = tmp_path / "t.json", tmp_path / "t.md"
    report = mt.main(["--variants", "nat_mini,nat_base", "--backends",
                      "reference,gemm,fused,dense", "--dtypes", "bf16", "--modes", "infer,train",
                      "--reference-max-params-m", "50", "--time-limit-s", "0", "--out", str(out),
                      "--md", str(md), "--fused-config", "backward=reference"])
    # Variant by variant, then mode, fused first; reference skipped on nat_base (> 50M).
    assert calls == [("nat_mini", b, "bfloat16", m) for m in ("infer", "train")
                     for b in ("fused", "dense", "reference")] + \
        [("nat_base", b, "bfloat16", m) for m in ("infer", "train") for b in ("fused", "dense")]
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    assert data["status"]["planned"] == 16 and data["status"]["done"] == 10
    assert data["config"]["fused_config"]["backward"] == "reference"
    rows = {(r["variant"], r["backend"], r["mode"]): r for r in data["rows"]}
    assert rows[("nat_mini", "reference", "infer")]["error"].startswith("RuntimeError: RESOURCE")
    assert "skipped above 50M" in rows[("nat_base", "reference", "train")]["skipped"]
    assert rows[("nat_mini", "gemm", "infer")]["skipped"].startswith(mt.UNAVAILABLE)
    text = md.read_text()
    assert "Fused backend: backward=reference." in text
    assert "| model | params (M) | GMACs | reference | gemm | fused | dense (xla) | " \
           "fused vs reference | fused vs dense |" in text
    # nat_mini inference: fused 400 img/s, dense 200, reference failed.
    gmacs = f"{model_gmacs(mt.model_config('nat_mini')):.2f}"
    infer, train = text.split("## Training step")
    assert f"| nat_mini | 5.0 | {gmacs} | - | - | 400 | 200 | - | 2.00x |" in infer
    assert f"| nat_mini | 5.0 | {gmacs} | - | - | 200 | 100 | - | 2.00x |" in train
    assert "nat_mini reference: RuntimeError: RESOURCE_EXHAUSTED" in text
    assert "Backends not run: gemm (bf16): this natten_jax has no gemm" in text
    assert "10 of 16 measurements" in text and "~ = " not in text
    state["spread"] = {"dense": 21.0}  # calls spreading more than 20%: marked
    text = mt.markdown(mt.main(GRID[:1] + ["nat_mini"] + GRID[2:]))
    assert "| 400 | 200~ | - | 2.00x |" in text and "~ = the timed calls spread more than 20%" \
        in text


def test_resume_keeps_measured_rows(fake, tmp_path):
    calls, state = fake
    first = tmp_path / "a.json"
    state["fail"] = {"dense": "RESOURCE_EXHAUSTED: Out of memory"}
    mt.main(GRID[:1] + ["nat_mini"] + GRID[2:] + ["--out", str(first)])
    assert len(calls) == 4
    calls.clear()
    state["fail"] = {}
    report = mt.main(GRID[:7] + ["infer", "--time-limit-s", "0", "--resume", str(first)])
    # nat_mini fused infer was measured: kept; dense failed there: measured now
    assert calls == [("nat_mini", "dense", "bfloat16", "infer"),
                     ("nat_base", "fused", "bfloat16", "infer"),
                     ("nat_base", "dense", "bfloat16", "infer")]
    rows = {(r["variant"], r["backend"]): r for r in report["rows"]}
    assert rows[("nat_mini", "fused")]["resumed_from"] == str(first)
    assert report["status"]["done"] == report["status"]["planned"] == 4
    with pytest.raises(SystemExit, match="batch"):
        mt.main(["--variants", "nat_mini", "--batch", "64", "--resume", str(first)])


def test_shards_split_the_rows_left_and_merge_puts_them_together(fake, tmp_path):
    calls, state = fake
    first = tmp_path / "first.json"
    mt.main(GRID + ["--only", "nat_mini:infer:fused", "--out", str(first)])
    calls.clear()
    parts = []
    for i in range(3):
        state["fail"] = {"dense": "RESOURCE_EXHAUSTED: Out of memory"} if i == 1 else {}
        parts.append(tmp_path / f"part{i}.json")
        report = mt.main(GRID + ["--resume", str(first), "--shard", f"{i}/3",
                                 "--out", str(parts[-1])])
        assert report["shard"] == f"{i}/3"
    # the 7 rows left, dealt round-robin in grid order; the kept row measured by none
    order = [("nat_mini", "dense", "bfloat16", "infer"), ("nat_mini", "fused", "bfloat16", "train"),
             ("nat_mini", "dense", "bfloat16", "train"), ("nat_base", "fused", "bfloat16", "infer"),
             ("nat_base", "dense", "bfloat16", "infer"), ("nat_base", "fused", "bfloat16", "train"),
             ("nat_base", "dense", "bfloat16", "train")]
    assert calls == order[0::3] + order[1::3] + order[2::3]
    calls.clear()
    files = [x for p in [first] + parts for x in ("--resume", str(p))]
    merged = mt.main(GRID + ["--merge"] + files)
    assert calls == []  # merging measures nothing
    rows = {(r["variant"], r["backend"], r["mode"]): r for r in merged["rows"]}
    assert len(rows) == 8 and merged["status"]["done"] == merged["status"]["planned"] == 8
    assert rows[("nat_mini", "fused", "infer")]["resumed_from"] == str(first)
    assert "error" in rows[("nat_base", "dense", "infer")]  # shard 1's failure is a result too
    # a measured row wins over a failed one, whatever the order of the files
    retry = tmp_path / "retry.json"
    mt.main(GRID + ["--only", "nat_base:infer:dense", "--out", str(retry)])
    merged = mt.main(GRID + ["--merge", "--resume", str(parts[1]), "--resume", str(retry)])
    rows = {(r["variant"], r["backend"], r["mode"]): r for r in merged["rows"]}
    assert rows[("nat_base", "dense", "infer")]["images_per_s"] == 200.0
    assert rows[("nat_base", "fused", "infer")]["skipped"] == "not measured in the merged runs"
    text = mt.markdown(merged)  # cells without a number: grouped by reason
    assert "nat_base fused, nat_base dense: not measured in the merged runs" in text
    assert "3 of 8 cells measured, merged from 2 runs." in text
    for bad in (["--shard", "3/3"], ["--shard", "x"], ["--merge"]):
        with pytest.raises(SystemExit):
            mt.parse_args(bad)


def test_merged_rows_keep_their_device_and_cells_of_another_are_marked(fake, tmp_path):
    """Rows name the GPU they ran on (rows of older files: the file's); a merged table marks
    the cells of a device other than most rows' and gives no speedup across two devices."""
    grid = GRID[:7] + ["infer", "--time-limit-s", "0"]
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    mt.main(grid + ["--out", str(old)])
    data = json.loads(old.read_text())
    for r in data["rows"]:  # a file written before rows named their device
        del r["device"]
    data["env"]["device"] = "GPU A"
    old.write_text(json.dumps(data))
    mt.main(grid + ["--only", "nat_base:infer:fused", "--out", str(new)])
    data = json.loads(new.read_text())
    data["env"]["device"] = data["rows"][0]["device"] = "GPU B"
    new.write_text(json.dumps(data))
    # the older file first: its rows win; nothing is marked
    merged = mt.main(grid + ["--merge", "--resume", str(old), "--resume", str(new)])
    assert {r["device"] for r in merged["rows"]} == {"GPU A"}
    assert "Measured on another device" not in mt.markdown(merged)
    # the new file first: nat_base fused from GPU B, beside GPU A's dense
    merged = mt.main(grid + ["--merge", "--resume", str(new), "--resume", str(old)])
    text = mt.markdown(merged)
    assert "# NAT / DiNAT throughput (GPU A," in text and "| 400 | 200 | - | 2.00x |" in text
    assert "| 400\u2020 | 200 | - | - |" in text  # nat_base: no speedup across devices
    assert "Measured on another device: \u2020 GPU B (unmarked: GPU A)." in text


def test_dense_cudnn_falls_back_to_xla_on_the_levels_cudnn_rejects(monkeypatch):
    seen = []

    def fake_measure(variant, backend, dtype, mode, batches, args):
        seen.append(args.dense_impl)
        if args.dense_impl == "cudnn":
            raise NotImplementedError("Unsupported sequence length Q 49, KV 49.")
        return {"ms": 1.0}

    monkeypatch.setattr(mt, "measure", fake_measure)
    args = argparse.Namespace(dense_impl="cudnn", batch=2)
    row = {"impl": "cudnn"}
    assert mt.measure_dense_fallback("nat_mini", "dense", "bfloat16", "train", None, args,
                                     row) == {"ms": 1.0}
    assert seen == ["cudnn", "cudnn_or_xla"] and row["impl"] == "cudnn_or_xla"
    assert "49" in row["fallback"] and args.dense_impl == "cudnn"
    with pytest.raises(NotImplementedError):  # other backends: the error stands
        mt.measure_dense_fallback("nat_mini", "fused", "bfloat16", "train", None, args, {})


# ------------------------------------------------------------------- timing under the GPU lock
def test_gpu_lock_is_shared_while_compiling_and_exclusive_for_device_calls(tmp_path):
    """With a lock file, compilation holds it shared (another compiler could take it, a timer
    could not) and every device call holds it exclusively (nobody else can take it)."""
    lock = tmp_path / "gpu.lock"
    seen = []

    def can_take(mode):
        with open(lock, "a") as fh:
            try:
                fcntl.flock(fh, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(fh, fcntl.LOCK_UN)
            return True

    def held():  # "shared", "exclusive" or False, as another open file description sees it
        if can_take(fcntl.LOCK_EX):
            return False
        return "shared" if can_take(fcntl.LOCK_SH) else "exclusive"

    x = jnp.arange(64.0).reshape(8, 8)

    def args(peek=False):
        seen.append(("peek" if peek else "call", held()))
        return (x,)

    call = Compiled(jax.jit(lambda a: a @ a), args)
    t = time_calls(call, reps=3, warmup=2, budget_s=10.0, gpu_lock=str(lock))
    assert seen == [("peek", "shared")] + [("call", "exclusive")] * 5  # 2 warm-up + 3 timed
    assert t["reps"] == 3 and t["compile_s"] > 0 and not held()
    assert t["output_bytes"] == x.nbytes and t["ms_min"] <= t["ms"] <= t["ms_max"]


def test_quick_run_times_a_real_model(tmp_path):
    """nat_mini (one layer per level, 64x64, batch 2) on CPU: the dense (XLA) model's inference
    timed; the fused backend probed and listed as unavailable (no GPU kernels)."""
    report = mt.main(["--quick", "--dtypes", "fp32", "--backends", "fused,dense", "--modes",
                      "infer"])
    (fused, dense) = report["rows"]
    assert fused["skipped"].startswith(mt.UNAVAILABLE) and report["backends"]["fused"]["float32"]
    assert dense["impl"] == "xla" and dense["params"] > 1e6 and dense["timing"]["reps"] == 1
    assert dense["images_per_s"] == pytest.approx(2 / (dense["ms"] / 1e3))
    assert dense["timing"]["compile_s"] > 0 and dense["timing"]["temp_bytes"] >= 0
