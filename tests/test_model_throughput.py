"""CPU tests of benchmarks/model_throughput.py: the work count against the papers, the run
loop's order / time limit / error handling (with a fake measurement), the markdown tables, and
the --quick CLI end to end (real models, reference and dense attention)."""

import json
import os
import subprocess
import sys
import time

import pytest

from benchmarks import model_throughput as mt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_env():
    """CPU-only JAX for a child process, with XLA's CPU compiler at its fastest (the quick runs
    compile more than they run)."""
    flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
                XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())

# FLOPs (= multiply-accumulates) at 224x224 in the NAT and DiNAT papers / official READMEs.
PAPER_GFLOPS = {"nat_mini": 2.7, "nat_tiny": 4.3, "nat_small": 7.8, "nat_base": 13.7,
                "dinat_mini": 2.7, "dinat_tiny": 4.3, "dinat_small": 7.8, "dinat_base": 13.7}


@pytest.mark.parametrize("variant", sorted(PAPER_GFLOPS))
def test_gmacs_match_the_papers(variant):
    got = mt.gmacs(mt.model_config(variant))
    assert abs(got - PAPER_GFLOPS[variant]) <= 0.03 * PAPER_GFLOPS[variant], got


def test_model_config_max_depth():
    cfg = mt.model_config("dinat_tiny", max_depth=2)
    assert cfg["depths"] == (2, 2, 2, 2)
    assert cfg["dilations"] == ((1, 8), (1, 4), (1, 2), (1, 1))
    assert mt.model_config("nat_tiny")["depths"] == (3, 4, 18, 5)
    assert mt.gmacs(mt.model_config("nat_tiny", 1)) < mt.gmacs(mt.model_config("nat_tiny"))


def test_cli_names_and_quick_defaults():
    a = mt.parse_args(["--dtypes", "bf16,fp32", "--backends", "fused,dense", "--quick"])
    assert a.dtype_names == ["bfloat16", "float32"] and a.backend_names == ["fused", "dense"]
    assert a.variant_names == ["nat_mini"] and a.batch == 2 and a.image_size == 64
    assert a.max_depth == 1 and a.reps == 1 and a.time_limit_s == 0
    assert mt.parse_args([]).variant_names == list(mt.VARIANTS)
    with pytest.raises(SystemExit):
        mt.parse_args(["--backends", "flash"])


# ---------------------------------------------------------------- run loop, fake measurement
@pytest.fixture
def fake(monkeypatch):
    """measure() without JAX work: fixed rates per backend; some backends fail."""
    calls = []
    rates = {"fused": 400.0, "dense": 200.0, "reference": 100.0}
    state = {"sleep": 0.0, "fail": {}, "spread": {}}

    def measure(variant, backend, dtype, mode, batches, args):
        calls.append((variant, backend, dtype, mode))
        if state["sleep"]:
            import time
            time.sleep(state["sleep"])
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


def test_run_order_errors_and_tables(fake, tmp_path):
    calls, state = fake
    state["fail"] = {"reference": "RESOURCE_EXHAUSTED: Out of memory while trying to allocate"}
    out, md = tmp_path / "t.json", tmp_path / "t.md"
    report = mt.main(["--variants", "nat_mini,nat_base", "--backends",
                      "reference,gemm,fused,dense", "--dtypes", "bf16", "--modes", "infer,train",
                      "--reference-max-params-m", "50", "--time-limit-s", "0", "--out", str(out),
                      "--md", str(md)])
    # Variant by variant, then mode, fused first; reference skipped on nat_base (> 50M).
    assert calls == [("nat_mini", b, "bfloat16", m) for m in ("infer", "train")
                     for b in ("fused", "dense", "reference")] + \
        [("nat_base", b, "bfloat16", m) for m in ("infer", "train") for b in ("fused", "dense")]
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    assert data["status"] == {"planned": 16, "done": 10, "stopped": None,
                              "elapsed_s": data["status"]["elapsed_s"]}
    rows = {(r["variant"], r["backend"], r["mode"]): r for r in data["rows"]}
    assert rows[("nat_mini", "reference", "infer")]["error"].startswith("RuntimeError: RESOURCE")
    assert "skipped above 50M" in rows[("nat_base", "reference", "train")]["skipped"]
    assert rows[("nat_mini", "gemm", "infer")]["skipped"].startswith(mt.UNAVAILABLE)
    assert rows[("nat_mini", "dense", "train")]["images_per_s"] == 100.0
    assert data["backends"]["gemm"] == {"bfloat16": "this natten_jax has no gemm"}
    text = md.read_text()
    assert "## Inference (jitted forward), bf16: images/s" in text
    assert "## Training step (value_and_grad + AdamW), bf16: images/s" in text
    assert "| model | params (M) | GMACs | reference | gemm | fused | dense (xla) | " \
           "fused vs reference | fused vs dense |" in text
    # nat_mini inference: fused 400 img/s, dense 200, reference failed.
    assert f"| nat_mini | 5.0 | {mt.gmacs(mt.model_config('nat_mini')):.2f} | - | - | 400 | " \
           "200 | - | 2.00x |" in text
    assert "nat_mini reference: RuntimeError: RESOURCE_EXHAUSTED" in text
    assert "Backends not run: gemm (bf16): this natten_jax has no gemm" in text
    assert "10 of 16 measurements" in text


def test_cells_whose_calls_spread_widely_are_marked(fake, tmp_path):
    calls, state = fake
    args = ["--variants", "nat_mini", "--backends", "fused,dense", "--dtypes", "bf16",
            "--modes", "infer", "--time-limit-s", "0"]
    text = mt.markdown(mt.main(args))
    assert "| 400 | 200 | - | 2.00x |" in text and "~ = " not in text
    state["spread"] = {"dense": mt.SPREAD_MARK_PCT + 1}
    text = mt.markdown(mt.main(args))
    assert "| 400 | 200~ | - | 2.00x |" in text
    assert f"~ = the timed calls spread more than {mt.SPREAD_MARK_PCT:g}%" in text


def test_time_limit_and_fatal_errors(fake, tmp_path):
    calls, state = fake
    state["sleep"] = 0.2
    report = mt.main(["--variants", "nat_mini", "--backends", "fused,dense", "--dtypes", "bf16",
                      "--modes", "infer,train", "--time-limit-s", "0.1"])
    assert len(calls) == 1  # the first measurement starts, none after the limit
    assert report["status"]["stopped"] == "time limit"
    assert [r.get("skipped") for r in report["rows"][1:]] == ["not run: time limit"] * 3
    calls.clear()
    state["sleep"], state["fail"] = 0.0, {"fused": "XlaRuntimeError: an illegal memory access "
                                                   "was encountered"}
    report = mt.main(["--variants", "nat_mini", "--backends", "fused,dense", "--dtypes", "bf16",
                      "--modes", "infer", "--time-limit-s", "0"])
    assert len(calls) == 1 and report["status"]["stopped"].startswith("device error")
    assert mt.markdown(report).count("not run: device error") == 1


def test_only_measures_the_named_entries_in_grid_order(fake, tmp_path):
    calls, _ = fake
    report = mt.main(["--variants", "nat_base,nat_mini", "--backends", "fused,dense",
                      "--dtypes", "bf16,fp32", "--modes", "infer,train", "--time-limit-s", "0",
                      "--only", "nat_mini:train,nat_base:infer:dense,nat_mini:infer:fused:fp32"])
    # an entry without a dtype (or backend) names every dtype (backend)
    assert calls == [("nat_base", "dense", "bfloat16", "infer"),
                     ("nat_base", "dense", "float32", "infer"),
                     ("nat_mini", "fused", "bfloat16", "train"),
                     ("nat_mini", "dense", "bfloat16", "train"),
                     ("nat_mini", "fused", "float32", "infer"),
                     ("nat_mini", "fused", "float32", "train"),
                     ("nat_mini", "dense", "float32", "train")]
    assert report["status"]["planned"] == report["status"]["done"] == 7
    assert len(report["rows"]) == 7
    with pytest.raises(SystemExit):
        mt.parse_args(["--only", "nat_mini:fly"])


def test_resume_keeps_measured_rows(fake, tmp_path):
    calls, state = fake
    first = tmp_path / "a.json"
    state["fail"] = {"dense": "RESOURCE_EXHAUSTED: Out of memory"}
    mt.main(["--variants", "nat_mini", "--backends", "fused,dense", "--dtypes", "bf16",
             "--modes", "infer,train", "--time-limit-s", "0", "--out", str(first)])
    assert len(calls) == 4
    calls.clear()
    state["fail"] = {}
    report = mt.main(["--variants", "nat_mini,nat_base", "--backends", "fused,dense",
                      "--dtypes", "bf16", "--modes", "infer", "--time-limit-s", "0",
                      "--resume", str(first)])
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
    grid = ["--variants", "nat_mini,nat_base", "--backends", "fused,dense", "--dtypes", "bf16",
            "--modes", "infer,train", "--time-limit-s", "0"]
    first = tmp_path / "first.json"
    mt.main(grid + ["--only", "nat_mini:infer:fused", "--out", str(first)])
    calls.clear()
    parts = []
    for i in range(3):
        state["fail"] = {"dense": "RESOURCE_EXHAUSTED: Out of memory"} if i == 1 else {}
        parts.append(tmp_path / f"part{i}.json")
        report = mt.main(grid + ["--resume", str(first), "--shard", f"{i}/3",
                                 "--out", str(parts[-1])])
        assert report["shard"] == f"{i}/3"
    # the 7 rows left, dealt round-robin in grid order; the kept row measured by none
    order = [("nat_mini", "dense", "bfloat16", "infer"), ("nat_mini", "fused", "bfloat16", "train"),
             ("nat_mini", "dense", "bfloat16", "train"), ("nat_base", "fused", "bfloat16", "infer"),
             ("nat_base", "dense", "bfloat16", "infer"), ("nat_base", "fused", "bfloat16", "train"),
             ("nat_base", "dense", "bfloat16", "train")]
    assert calls == order[0::3] + order[1::3] + order[2::3]
    calls.clear()
    merged = mt.main(grid + ["--merge"] + [x for p in [first] + parts for x in ("--resume", str(p))])
    assert calls == []  # merging measures nothing
    rows = {(r["variant"], r["backend"], r["mode"]): r for r in merged["rows"]}
    assert len(rows) == 8 and merged["status"]["done"] == merged["status"]["planned"] == 8
    assert rows[("nat_mini", "fused", "infer")]["resumed_from"] == str(first)
    assert "error" in rows[("nat_base", "dense", "infer")]  # shard 1's failure is a result too
    assert rows[("nat_mini", "dense", "train")]["images_per_s"] == 100.0
    # a measured row wins over a failed one, whatever the order of the files
    retry = tmp_path / "retry.json"
    mt.main(grid + ["--only", "nat_base:infer:dense", "--out", str(retry)])
    merged = mt.main(grid + ["--merge", "--resume", str(parts[1]), "--resume", str(retry)])
    rows = {(r["variant"], r["backend"], r["mode"]): r for r in merged["rows"]}
    assert rows[("nat_base", "dense", "infer")]["images_per_s"] == 200.0
    assert rows[("nat_base", "fused", "infer")]["skipped"] == "not measured in the merged runs"
    text = mt.markdown(merged)  # cells without a number: grouped by reason
    assert "nat_base fused, nat_base dense: not measured in the merged runs" in text
    assert "3 of 8 cells measured, merged from 2 runs." in text
    for bad in (["--shard", "3/3"], ["--shard", "x"], ["--merge"]):
        with pytest.raises(SystemExit):
            mt.parse_args(bad)


def test_gpu_lock_is_shared_while_compiling_and_exclusive_for_device_calls(tmp_path):
    """With a lock file, compilation holds it shared (another compiler could take it, a timer
    could not) and every device call holds it exclusively (nobody else can take it)."""
    import fcntl

    import jax
    import jax.numpy as jnp

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
    fn = jax.jit(lambda a: a @ a)

    def args(peek=False):
        seen.append(("peek" if peek else "call", held()))
        return (x,)

    call = mt.Compiled(fn, args)
    t = mt.time_calls(call, reps=3, warmup=2, budget_s=10.0, gpu_lock=str(lock))
    assert seen[0] == ("peek", "shared")  # lowering and compiling: shared
    assert seen[1:] == [("call", "exclusive")] * 5  # 2 warm-up + 3 timed calls
    assert t["reps"] == 3 and t["compile_s"] > 0 and not held()
    assert t["temp_bytes"] >= 0 and t["output_bytes"] == x.nbytes
    assert call.exe is not None
    # without a lock: the same numbers of calls, no lock file needed
    seen.clear()
    t = mt.time_calls(mt.Compiled(fn, args), reps=2, warmup=1, budget_s=10.0)
    assert [k for k, _ in seen] == ["peek", "call", "call", "call"] and t["reps"] == 2


def test_gpu_lock_waiting_timer_goes_before_later_compilers(tmp_path):
    """A compiler holds the lock shared; a timer asks for it exclusively and waits; a second
    compiler that asks after the timer must not get in before the timer has had its turn."""
    import threading

    lock, order = str(tmp_path / "gpu.lock"), []
    first_in, release_first = threading.Event(), threading.Event()

    def compiler(name, hold_until=None):
        with mt._file_lock(lock, shared=True):
            order.append(name)
            if hold_until is not None:
                first_in.set()
                hold_until.wait(10)

    def timer():
        with mt._file_lock(lock):
            order.append("timer")

    a = threading.Thread(target=compiler, args=("compile 1", release_first))
    a.start()
    assert first_in.wait(10)
    t = threading.Thread(target=timer)
    t.start()
    time.sleep(0.3)  # the timer is waiting (holding the turnstile)
    b = threading.Thread(target=compiler, args=("compile 2",))
    b.start()
    time.sleep(0.3)
    assert order == ["compile 1"]  # neither the timer nor the later compiler got in
    release_first.set()
    for th in (a, t, b):
        th.join(10)
    assert order == ["compile 1", "timer", "compile 2"]


# ------------------------------------------------------------------------------ real models
def test_quick_cli_end_to_end(tmp_path):
    """nat_mini (one layer per level, 64x64, batch 2) on CPU: reference and dense (XLA) timed
    in inference and training, fused probed and listed as unavailable (no GPU kernels)."""
    out, md = tmp_path / "q.json", tmp_path / "q.md"
    cmd = [sys.executable, "-m", "benchmarks.model_throughput", "--quick", "--dtypes", "fp32",
           "--backends", "reference,fused,dense", "--out", str(out), "--md", str(md)]
    r = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["config"]["batch"] == 2 and data["config"]["image_size"] == 64
    assert data["status"]["done"] == 4 and data["status"]["stopped"] is None
    timed = [r for r in data["rows"] if "images_per_s" in r]
    assert {(r["backend"], r["mode"]) for r in timed} == \
        {(b, m) for b in ("reference", "dense") for m in ("infer", "train")}
    for row in timed:
        assert row["images_per_s"] > 0 and row["ms"] > 0 and row["params"] > 1e6
        assert row["timing"]["reps"] >= 1 and row["timing"]["compile_s"] > 0
    assert [r["impl"] for r in data["rows"] if r["backend"] == "dense"] == ["xla", "xla"]
    assert data["backends"]["fused"]["float32"]  # the reason it cannot run here
    text = md.read_text()
    assert text.strip() in r.stdout
    for title in ("Inference (jitted forward), fp32", "Training step (value_and_grad + AdamW), "
                  "fp32"):
        assert f"## {title}: images/s" in text
    table_rows = [ln for ln in text.splitlines() if ln.startswith("| nat_mini |")]
    assert len(table_rows) == 2
    for ln in table_rows:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        # model, params, GMACs, reference, fused, dense, fused/ref, fused/dense
        assert len(cells) == 8 and float(cells[3].replace(",", "")) > 0
        assert cells[4] == "-" and float(cells[5].replace(",", "")) > 0


def test_dense_cudnn_falls_back_to_xla_on_the_levels_cudnn_rejects(monkeypatch):
    import argparse

    from benchmarks import model_throughput as mt

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
    assert "49" in row["fallback"]
    assert args.dense_impl == "cudnn"  # the caller's arguments are untouched
    with pytest.raises(NotImplementedError):  # other backends: the error stands
        mt.measure_dense_fallback("nat_mini", "fused", "bfloat16", "train", None, args, {})


def test_merged_rows_keep_their_device_and_cells_of_another_are_marked(fake, tmp_path):
    """Rows name the GPU they ran on (rows of older files: the file's); a merged table marks
    the cells of a device other than most rows' and gives no speedup across two devices."""
    grid = ["--variants", "nat_mini,nat_base", "--backends", "fused,dense", "--dtypes", "bf16",
            "--modes", "infer", "--time-limit-s", "0"]
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    mt.main(grid + ["--out", str(old)])
    data = json.loads(old.read_text())
    assert {r["device"] for r in data["rows"]} == {data["env"]["device"]}
    for r in data["rows"]:  # a file written before rows named their device
        del r["device"]
    data["env"]["device"] = "GPU A"
    old.write_text(json.dumps(data))
    mt.main(grid + ["--only", "nat_base:infer:fused", "--out", str(new)])
    data = json.loads(new.read_text())
    data["env"]["device"] = data["rows"][0]["device"] = "GPU B"
    new.write_text(json.dumps(data))
    # the older file first: its rows win; the new one fills no gap here, so nothing is marked
    merged = mt.main(grid + ["--merge", "--resume", str(old), "--resume", str(new)])
    assert {r["device"] for r in merged["rows"]} == {"GPU A"}
    assert "Measured on another device" not in mt.markdown(merged)
    # the new file first: nat_base fused from GPU B, beside GPU A's dense
    merged = mt.main(grid + ["--merge", "--resume", str(new), "--resume", str(old)])
    rows = {(r["variant"], r["backend"]): r["device"] for r in merged["rows"]}
    assert rows[("nat_base", "fused")] == "GPU B" and rows[("nat_base", "dense")] == "GPU A"
    text = mt.markdown(merged)
    assert "# NAT / DiNAT throughput (GPU A," in text
    assert "| nat_mini | 5.0 | " in text and "| 400 | 200 | - | 2.00x |" in text
    assert "| 400\u2020 | 200 | - | - |" in text  # nat_base: no speedup across devices
    assert "Measured on another device: \u2020 GPU B (unmarked: GPU A)." in text
