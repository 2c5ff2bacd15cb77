"""CPU tests of the benchmark harness (benchmarks/harness/) and bench_na: the problem set, the
work model, the peers' masks, the timing loop, the fused config of each row, and the records
the docs' tables are generated from."""

import importlib.util
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natten_jax
from benchmarks import bench_na, peers
from benchmarks.harness import cli, flops, problems, results
from benchmarks.harness.problems import Problem, make_problem
from benchmarks.harness.timing import _loop, time_jax
from natten_jax.window import is_neighbor_1d

HAS_TORCH = importlib.util.find_spec("torch") is not None


def _p(spatial, kernel, stride=None, dilation=None, causal=None, heads=2, heads_kv=None):
    r = len(spatial)
    spec = dict(batch=1, heads=heads, spatial=spatial, kernel=kernel, head_dim=8,
                stride=stride or [1] * r, dilation=dilation or [1] * r,
                is_causal=causal or [False] * r)
    return make_problem("t", spec, heads_kv=heads_kv)


# Small problems covering stride, dilation (uneven groups), causal, even kernels, GQA.
SMALL = [
    _p([13], [4]),
    _p([17], [5], stride=[3], dilation=[2]),
    _p([16], [5], stride=[2], causal=[True]),
    _p([9, 11], [3, 4], stride=[2, 3], dilation=[2, 2]),
    _p([8, 10], [3, 5], dilation=[1, 2], causal=[True, False], heads=4, heads_kv=2),
    _p([4, 5, 6], [3, 2, 3], stride=[1, 2, 3], causal=[False, True, False], heads=4, heads_kv=1),
    _p([6, 4, 7], [2, 3, 3], dilation=[3, 1, 2], causal=[True, True, True]),
]


def _brute_mask(p: Problem) -> np.ndarray:
    """[T, T] neighbor mask by looping over every (query, key) coordinate pair."""
    coords = list(itertools.product(*[range(L) for L in p.spatial]))
    m = np.zeros((len(coords), len(coords)), bool)
    for a, x in enumerate(coords):
        for b, y in enumerate(coords):
            m[a, b] = all(bool(is_neighbor_1d(xi, yi, k, s, d, L, c)) for xi, yi, L, k, s, d, c
                          in zip(x, y, p.spatial, p.kernel, p.stride, p.dilation, p.causal))
    return m


# ------------------------------------------------------------------------- problems, work model
def test_problem_set():
    by = {p.name: p for p in problems.load()}
    assert list(by)[:4] == ["2d_gen", "3d_video", "1d_long", "2d_nat_t"]
    assert set(by) == {"2d_gen", "3d_video", "1d_long", "2d_nat_t", "2d_gen_dilated",
                       "2d_nat_t_dilated", "3d_video_causal", "1d_long_causal", "2d_gen_gqa4",
                       "2d_gen_gqa1", "3d_video_gqa4", "3d_video_gqa1"}
    assert by["2d_gen"].heads_kv == by["2d_gen"].heads == 24
    assert by["2d_gen_gqa4"].heads_kv == 4 and by["3d_video_gqa1"].heads_kv == 1
    assert by["2d_gen_dilated"].dilation == (2, 2) and by["2d_gen_dilated"].kernel == (31, 31)
    assert by["3d_video_causal"].causal == (True, False, False)
    assert Problem.from_json(json.loads(json.dumps(by["3d_video_causal"].to_json()))) == \
        by["3d_video_causal"]
    if os.path.exists(problems.SHARED_JSON):  # the copy that travels must equal the shared file
        with open(problems.SHARED_JSON, "rb") as a, open(problems.LOCAL_JSON, "rb") as b:
            assert a.read() == b.read(), "benchmarks/problems.json differs from the shared copy"
    with pytest.raises(SystemExit, match="--problems"):
        problems.select(problems.load(quick=True), "q1d,nope")


def test_anchor_problems_load_after_the_headline_ones():
    both = problems.load(anchors=True)
    names = [p.name for p in both]
    assert names[:len(problems.load())] == [p.name for p in problems.load()]
    by = {p.name: p for p in both}
    assert {"2d_flux", "3d_hunyuan", "2d_flux_gna", "3d_hunyuan_gna"} <= set(by)
    assert by["2d_flux_gna"].stride == (16, 16) and by["2d_flux_gna"].kernel == (80, 80)
    if os.path.exists(problems.SHARED_ANCHORS):  # the copy that travels equals the shared file
        with open(problems.SHARED_ANCHORS, "rb") as a, open(problems.LOCAL_ANCHORS, "rb") as b:
            assert a.read() == b.read(), "benchmarks/problems-anchors.json differs"


def test_useful_flops_and_bytes():
    for p in problems.load() + problems.load(quick=True) + SMALL:
        if p.tokens < 1000:
            pairs = int(_brute_mask(p).sum())
        else:  # per axis (neighborhoods are separable): L * k keys, or causal with stride 1:
            pairs = 1  # query i sees min(i + 1, k) keys
            for L, k, s, c in zip(p.spatial, p.kernel, p.stride, p.causal):
                assert s == 1 or not c
                pairs *= sum(min(i + 1, k) for i in range(L)) if c else L * k
        assert flops.useful_flops(p) == 4 * p.batch * p.heads * pairs * p.head_dim, p.name
    p = {q.name: q for q in problems.load()}["2d_gen_gqa4"]
    assert flops.min_bytes(p, 2) == p.batch * p.tokens * p.head_dim * 2 * (24 + 4 + 4 + 24)


def test_derive_floor_and_rates():
    p = _p([13], [4])
    work, nbytes = flops.useful_flops(p), flops.min_bytes(p, 2)
    row = {"fwd": {"ms": 2.0}, "fwd_bwd": {"ms": 5.0}, "other": {"ms": 1.0}}
    flops.derive(row, p, 2, visited=3 * work)
    f, b = row["fwd"], row["fwd_bwd"]
    assert f["useful_tflops"] == pytest.approx(work / 2e-3 / 1e12)
    assert f["visited_tflops"] == pytest.approx(3 * f["useful_tflops"])
    floor_f = max(work / 630e12, nbytes / 3e12)  # the H100 figures
    assert f["floor_ms"] == pytest.approx(floor_f * 1e3)
    assert f["pct_floor"] == pytest.approx(100 * floor_f / 2e-3)
    assert b["useful_tflops"] == pytest.approx(3.5 * work / 5e-3 / 1e12)
    assert b["floor_ms"] == pytest.approx(max(3.5 * work / 630e12, 3 * nbytes / 3e12) * 1e3)
    assert "visited_tflops" not in b and row["other"] == {"ms": 1.0}


# ----------------------------------------------------------------------------------- peers
def test_peer_masks_match_the_window():
    """The XLA peer's mask and the flex mask_mod's integer formula (evaluated with NumPy, and
    torch where importable) equal window.py's neighborhoods."""
    for p in SMALL:
        want = _brute_mask(p)
        np.testing.assert_array_equal(peers.dense_mask(p), want)
        t = np.arange(p.tokens)
        mm = peers.na_mask_mod(p, np.minimum, np.maximum)
        np.testing.assert_array_equal(mm(0, 0, t[:, None], t[None, :]), want)
        if HAS_TORCH:
            import torch

            t = torch.arange(p.tokens, dtype=torch.int32)
            got = peers.torch_na_mask_mod(p)(torch.tensor(0), torch.tensor(0), t[:, None],
                                             t[None, :])
            np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("i", range(len(SMALL)))
def test_xla_peer_matches_reference(i):
    p = SMALL[i]
    q, k, v, _ = (jax.random.normal(jax.random.PRNGKey(10 * i + j), s, jnp.float32)
                  for j, s in enumerate(p.shapes()))
    got = jax.jit(peers.xla_fn(p))(q, k, v)
    want = getattr(natten_jax, f"na{p.rank}d")(q, k, v, backend="reference", **p.na_kwargs())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------- timing
def test_timing_loop_keeps_every_call():
    """The timed loop must not let XLA drop or hoist calls; its per-call time is the
    headline."""
    f = lambda a, b: jnp.tanh(a @ b)  # noqa: E731
    sets = tuple((jnp.full((32, 32), float(i)), jnp.ones((32, 32))) for i in range(2))
    outs = tuple(jnp.zeros((32, 32)) for _ in sets)
    hlo = jax.jit(_loop(f, 4)).lower(sets, outs).compile().as_text()
    assert hlo.count(" dot(") >= len(sets)
    _, new_outs = jax.jit(_loop(f, 4))(sets, outs)
    np.testing.assert_allclose(np.asarray(new_outs[1]), np.tanh(np.full((32, 32), 32.0)))
    r = time_jax(f, list(sets), reps=3, budget_s=5.0, loop_target_s=0.005)
    assert r["reps"] == 3 and r["ms_min"] <= r["ms_call"] <= r["ms_max"]
    assert r["ms"] == r["ms_loop"] > 0 and r["loop_calls"] % len(sets) == 0


# ------------------------------------------------------------------------ fused configuration
def test_fused_config_option():
    base = natten_jax.FusedConfig(backward="reference")
    got = cli.fused_config("forward_impl=sm90, q_tile=64,cache_dir=/tmp/x", base)
    assert got == base.replace(forward_impl="sm90", q_tile=64, cache_dir="/tmp/x")
    assert cli.fused_config("", base) == base
    assert cli.fused_config("sm80_occupancy=none", base.replace(sm80_occupancy=5)) == base
    for bad, what in (("forward_impl", "field=value"), ("tiles=3", "field=value"),
                      ("q_tile=big", "q_tile takes an integer"), ("q_tile=96", "q_tile"),
                      ("autotune=always", "autotune")):
        with pytest.raises(SystemExit, match=f"--fused-config: .*{what}"):
            cli.fused_config(bad, base)


def test_bench_rows_pass_their_config_and_leave_the_environment(monkeypatch):
    seen = []
    monkeypatch.setattr(natten_jax, "na1d", lambda q, k, v, **kw: seen.append(kw))
    env = dict(os.environ)
    base = natten_jax.FusedConfig(backward="reference", q_tile=64)
    for name in bench_na.BACKENDS:
        bench_na.ours_fn(SMALL[0], name, base)(None, None, None)
    assert os.environ == env
    assert [kw["backend"] for kw in seen] == ["fused"] * 4 + ["reference"]
    assert [kw.get("backend_config") for kw in seen] == [
        base, base.replace(forward_impl="sm80", backward_impl="sm80"),
        base.replace(forward_impl="sm90"),
        base.replace(forward_impl="sm90", backward_impl="sm90"), None]


# ----------------------------------------------------------------------------------- records
def test_device_names():
    for kind, slug in (("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"),
                       ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA GeForce RTX 4090", "rtx4090"),
                       ("cpu", "cpu")):
        assert results.device_slug(kind) == slug
    with pytest.raises(ValueError, match="no file name"):
        results.device_slug("NVIDIA")


def test_records_merge(tmp_path):
    run = [{"problem": "a", "impl": "fused", "fused_config": {"q_tile": 64},
            "fwd": {"ms": 1.0, "spread_pct": 3.0, "floor_ms": 0.1}, "fwd_bwd": {"error": "x"}},
           {"problem": "a", "impl": "peer:cudnn", "fwd": {"ms": 2.0}, "fwd_bwd": {"ms": 5.0}},
           {"problem": "a", "impl": "reference", "skipped": "not run: time limit"},
           {"problem": "b", "impl": "fused_sm80", "fwd": {"ms": 3.0}}]
    recs = results.records(run, "bfloat16", "c1")
    assert [(r["problem"], r["impl"], r["mode"], r["ms"]) for r in recs] == [
        ("a", "natten_jax", "fwd", 1.0), ("a", "cudnn", "fwd", 2.0), ("a", "cudnn", "fwdbwd", 5.0),
        ("b", "natten_jax/fused_sm80", "fwd", 3.0)]
    assert recs[0]["spread_pct"] == 3.0 and "floor_ms" not in recs[0]
    assert recs[0]["fused_config"] == {"q_tile": 64} and recs[1]["backend"] == "peer:cudnn"
    assert {(r["dtype"], r["commit"]) for r in recs} == {("bfloat16", "c1")}
    path = str(tmp_path / "h200.json")
    with open(path, "w") as fh:  # a file with rows of another source and a description
        json.dump({"device": "GPU X", "commit": "c0", "date": "2026-01-01", "command": "by hand",
                   "about": "how", "rows": [{"problem": "a", "impl": "natten", "mode": "fwd",
                                             "ms": 9.0},
                                            {"problem": "a", "impl": "cudnn", "mode": "fwd",
                                             "ms": 8.0}]}, fh)
    data = results.merge(path, "GPU X", "c1", "python -m benchmarks.bench_na", recs)
    assert data == json.loads(open(path).read())
    assert [(r["impl"], r["mode"], r["ms"]) for r in data["rows"]] == [
        ("natten", "fwd", 9.0), ("cudnn", "fwd", 2.0), ("natten_jax", "fwd", 1.0),
        ("cudnn", "fwdbwd", 5.0), ("natten_jax/fused_sm80", "fwd", 3.0)]
    assert data["about"] == "how" and data["commit"] == "c1" and data["date"] != "2026-01-01"
    assert data["command"] == "by hand; python -m benchmarks.bench_na"
    data = results.merge(path, "GPU X", "c2", "python -m benchmarks.bench_na",
                         results.records(run[:1], "bfloat16", "c2"))
    assert data["command"] == "by hand; python -m benchmarks.bench_na" and len(data["rows"]) == 5
    assert [r.get("commit") for r in data["rows"]] == [None, "c1", "c2", "c1", "c1"]
    with pytest.raises(SystemExit, match="holds 'GPU X' rows"):
        results.merge(path, "GPU Y", "c2", "x", recs)
    with pytest.raises(SystemExit, match="one dtype per file"):
        results.merge(path, "GPU X", "c2", "x", results.records(run, "float16", "c2"))


def test_float32_records_sit_beside_16bit_rows(tmp_path):
    """float32 rows carry their precision, are keyed by it, and merge into a 16-bit file."""
    path = str(tmp_path / "h200.json")
    bf16 = [{"problem": "a", "impl": "fused", "dtype": "bfloat16", "fwd": {"ms": 1.0}}]
    results.merge(path, "GPU X", "c1", "x", results.records(bf16, "bfloat16", "c1"))
    f32 = [{"problem": "a", "impl": "fused", "dtype": "float32", "precision": pr,
            "fwd": {"ms": ms}} for pr, ms in (("default", 2.0), ("highest", 3.0))]
    recs = results.records(f32, "float32", "c2")
    assert [(r["dtype"], r["precision"], r["ms"]) for r in recs] == [
        ("float32", "default", 2.0), ("float32", "highest", 3.0)]
    data = results.merge(path, "GPU X", "c2", "y", recs)
    assert [(r["dtype"], r.get("precision"), r["ms"]) for r in data["rows"]] == [
        ("bfloat16", None, 1.0), ("float32", "default", 2.0), ("float32", "highest", 3.0)]
    f32[1]["fwd"]["ms"] = 4.0
    data = results.merge(path, "GPU X", "c3", "y", results.records(f32[1:], "float32", "c3"))
    assert [r["ms"] for r in data["rows"]] == [1.0, 2.0, 4.0]
    with pytest.raises(SystemExit, match="one dtype per file"):
        results.merge(path, "GPU X", "c4", "z",
                      results.records([dict(bf16[0], dtype="float16")], None, "c4"))


def test_bench_precision_option():
    a = bench_na.parse_args(["--dtype", "float32", "--precision", "default,highest"])
    assert a.precisions == ["default", "highest"]
    assert bench_na.parse_args(["--dtype", "float32"]).precisions == ["default"]
    assert bench_na.parse_args([]).precisions == [None]  # 16-bit: no precision
    with pytest.raises(SystemExit, match="--precision"):
        bench_na.parse_args(["--precision", "highest"])
    with pytest.raises(SystemExit, match="--precision"):
        bench_na.parse_args(["--dtype", "float32", "--precision", "fast"])


def test_bench_quick_writes_records_the_docs_read(tmp_path):
    """bench_na --quick (reference and the XLA peer on CPU) into a records folder: the file is
    named after the device and loads in the docs' generator."""
    from benchmarks import results_docs

    out = tmp_path / "bench.json"
    rep = bench_na.main(["--quick", "--problems", "q1d,q2d_dilated", "--backends", "reference",
                         "--peers", "xla", "--time-limit-s", "0", "--out", str(out),
                         "--results", str(tmp_path) + os.sep, "--commit", "abc1234"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(rep))
    path = tmp_path / f"{results.device_slug(rep['env']['device'])}.json"
    data = results_docs.load_results(str(path))
    assert data["device"] == rep["env"]["device"] and data["commit"] == "abc1234"
    assert data["command"].startswith("python -m benchmarks.bench_na --quick")
    got = {(r["problem"], r["impl"], r["mode"]): r["ms"] for r in data["rows"]}
    want = {(r["problem"], {"reference": "natten_jax/reference", "peer:xla": "xla"}[r["impl"]],
             m2): r[m1]["ms"] for r in rep["rows"] for m1, m2 in (("fwd", "fwd"),
                                                                   ("fwd_bwd", "fwdbwd"))}
    assert got == want and len(got) == 8 and all(ms > 0 for ms in got.values())
    rep = bench_na.main(["--quick", "--problems", "q1d", "--peers", "xla", "--time-limit-s",
                         "1e-9"])
    assert [r["skipped"] for r in rep["rows"]] == ["not run: time limit"] * 3


def test_bench_ragged_quick_writes_the_ragged_records_the_docs_render(tmp_path):
    """bench_ragged --quick with the reference backend on CPU: every variant of each mode has a
    positive time, the ragged batch's work fraction is that of its half-size samples, and
    ragged-<device>.json loads and renders as kind "ragged" in the docs' generator."""
    from benchmarks import bench_ragged, results_docs

    rep = bench_ragged.main(["--quick", "--backend", "reference", "--problems", "q2d",
                             "--results", str(tmp_path) + os.sep, "--commit", "abc1234"])
    p = problems.select(bench_ragged.base_problems(True), "q2d")[0]
    assert bench_ragged.half_extent(p) == (5, 6)  # ceil(10/2), ceil(12/2); >= kernel
    got = {(r["mode"], r["variant"]): r for r in rep["rows"]}
    assert set(got) == {(m, v) for m in ("fwd", "fwdbwd") for v in bench_ragged.VARIANTS}
    assert all(r["ms"] > 0 for r in got.values())
    half = got[("fwd", "ragged_half")]
    assert half["batch"] == 2 and half["work_fraction"] == pytest.approx((1 + 30 / 120) / 2)
    assert got[("fwd", "plain")]["batch"] == 1
    path = tmp_path / f"ragged-{results.device_slug(rep['env']['device'])}.json"
    data = results_docs.load_results(str(path))
    assert data["kind"] == "ragged" and data["commit"] == "abc1234"
    assert data["command"].startswith("python -m benchmarks.bench_ragged --quick")
    text, plots = results_docs.block(data, path.name)
    assert plots == {}
    line = next(ln for ln in text.splitlines() if ln.startswith("| q2d | forward |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    want_ideal = got[("fwd", "ragged_full")]["ms"] * half["work_fraction"]
    assert float(cells[7]) == pytest.approx(want_ideal, rel=1e-3)
    assert float(cells[8].rstrip("x")) == pytest.approx(half["ms"] / want_ideal, abs=0.006)
