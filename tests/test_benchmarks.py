"""CPU tests of benchmarks/: problems, work counts, peers' masks, timing, the quick CLI."""

import importlib.util
import itertools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natten_jax
from benchmarks import peers, problems
from benchmarks.problems import Problem, make_problem
from benchmarks.timing import _loop, time_jax
from natten_jax.window import is_neighbor_1d

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _p(spatial, kernel, stride=None, dilation=None, causal=None, heads=2, heads_kv=None,
       batch=1, head_dim=8):
    r = len(spatial)
    spec = dict(batch=batch, heads=heads, spatial=spatial, kernel=kernel, head_dim=head_dim,
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


# ------------------------------------------------------------------------------------ problems
def test_problems_load():
    names = [p.name for p in problems.load()]
    for n in ["2d_gen", "3d_video", "1d_long", "2d_nat_t", "2d_gen_dilated", "2d_nat_t_dilated",
              "3d_video_causal", "1d_long_causal", "2d_gen_gqa4", "2d_gen_gqa1", "3d_video_gqa4",
              "3d_video_gqa1"]:
        assert n in names
    assert len(names) == len(set(names))
    by = {p.name: p for p in problems.load()}
    assert by["2d_gen"].heads_kv == by["2d_gen"].heads == 24
    assert by["2d_gen_gqa4"].heads_kv == 4 and by["3d_video_gqa1"].heads_kv == 1
    assert by["2d_gen_dilated"].dilation == (2, 2) and by["2d_gen_dilated"].kernel == (31, 31)
    assert by["3d_video_causal"].causal == (True, False, False)
    assert by["1d_long"].stride == (1,) and by["1d_long"].causal == (False,)
    quick = {p.name for p in problems.load(quick=True)}
    assert {"q1d", "q1d_causal", "q2d_dilated", "q2d_gqa1", "q3d_causal"} <= quick


def test_local_copy_matches_shared():
    if not os.path.exists(problems.SHARED_JSON):
        pytest.skip(f"no shared copy at {problems.SHARED_JSON}")
    with open(problems.SHARED_JSON, "rb") as a, open(problems.LOCAL_JSON, "rb") as b:
        assert a.read() == b.read(), "benchmarks/problems.json differs from the shared copy"


def test_local_copy_is_valid():
    with open(problems.LOCAL_JSON) as f:
        data = json.load(f)
    assert set(data["problems"]) == {"2d_gen", "3d_video", "1d_long", "2d_nat_t"}


def test_useful_flops_non_causal_formula():
    ps = [p for p in problems.load() + problems.load(quick=True) + SMALL if not any(p.causal)]
    assert len(ps) >= 10
    for p in ps:
        expect = 4 * p.batch * p.heads * p.tokens * int(np.prod(p.kernel)) * p.head_dim
        assert problems.useful_flops(p) == expect, p.name


def test_useful_flops_causal_exact():
    for p in [q for q in SMALL if any(q.causal)] + [problems.select(
            problems.load(quick=True), "q1d_causal")[0]]:
        pairs = int(_brute_mask(p).sum())
        assert problems.useful_flops(p) == 4 * p.batch * p.heads * pairs * p.head_dim
    big = {p.name: p for p in problems.load()}
    # 1-D causal, stride 1: query i sees min(i + 1, k) keys.
    p = big["1d_long_causal"]
    L, k = p.spatial[0], p.kernel[0]
    pairs = sum(min(i + 1, k) for i in range(L))
    assert problems.useful_flops(p) == 4 * p.batch * p.heads * pairs * p.head_dim


def test_min_bytes():
    p = {q.name: q for q in problems.load()}["2d_gen_gqa4"]
    per_head = p.batch * p.tokens * p.head_dim * 2
    assert problems.min_bytes(p, 2) == per_head * (24 + 4 + 4 + 24)


# --------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("i", range(len(SMALL)))
def test_dense_mask_matches_window(i):
    p = SMALL[i]
    np.testing.assert_array_equal(peers.dense_mask(p), _brute_mask(p))


@pytest.mark.parametrize("i", range(len(SMALL)))
def test_mask_mod_formula_numpy(i):
    """The flex mask_mod's integer formula, evaluated with NumPy, equals window.py's mask."""
    p = SMALL[i]
    mm = peers.na_mask_mod(p, np.minimum, np.maximum)
    t = np.arange(p.tokens)
    got = mm(0, 0, t[:, None], t[None, :])
    np.testing.assert_array_equal(got, peers.dense_mask(p))


@pytest.mark.skipif(not HAS_TORCH, reason="torch not importable")
@pytest.mark.parametrize("i", range(len(SMALL)))
def test_mask_mod_torch(i):
    import torch

    p = SMALL[i]
    mm = peers.torch_na_mask_mod(p)
    t = torch.arange(p.tokens, dtype=torch.int32)
    got = mm(torch.tensor(0), torch.tensor(0), t[:, None], t[None, :]).numpy()
    np.testing.assert_array_equal(got, peers.dense_mask(p))


# --------------------------------------------------------------------------------- XLA peer
@pytest.mark.parametrize("i", range(len(SMALL)))
def test_xla_peer_matches_reference(i):
    p = SMALL[i]
    keys = jax.random.split(jax.random.PRNGKey(i), 3)
    shp = lambda h: (p.batch,) + p.spatial + (h, p.head_dim)  # noqa: E731
    q = jax.random.normal(keys[0], shp(p.heads), jnp.float32)
    k = jax.random.normal(keys[1], shp(p.heads_kv), jnp.float32)
    v = jax.random.normal(keys[2], shp(p.heads_kv), jnp.float32)
    got = jax.jit(peers.xla_fn(p))(q, k, v)
    na = getattr(natten_jax, f"na{p.rank}d")
    want = na(q, k, v, backend="reference", **p.na_kwargs())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_xla_peer_too_big():
    p = {q.name: q for q in problems.load()}["3d_video"]
    with pytest.raises(peers.PeerSkipped, match="too big"):
        peers.xla_fn(p)


# -------------------------------------------------------------------------------------- timing
def test_loop_keeps_every_call():
    """The timing loop must not let XLA drop or hoist the timed calls."""
    f = lambda a, b: jnp.tanh(a @ b)  # noqa: E731
    sets = tuple((jnp.full((32, 32), float(i)), jnp.ones((32, 32))) for i in range(2))
    outs = tuple(jnp.zeros((32, 32)) for _ in sets)
    hlo = jax.jit(_loop(f, 4)).lower(sets, outs).compile().as_text()
    assert hlo.count(" dot(") >= len(sets)
    (new_sets, new_outs) = jax.jit(_loop(f, 4))(sets, outs)
    np.testing.assert_allclose(np.asarray(new_outs[1]), np.tanh(np.full((32, 32), 32.0)))


def test_time_jax_keys():
    f = lambda a, b: jnp.tanh(a @ b)  # noqa: E731
    sets = [(jax.random.normal(jax.random.PRNGKey(i), (64, 64)), jnp.ones((64, 64)))
            for i in range(2)]
    r = time_jax(f, sets, reps=3, budget_s=5.0, loop_target_s=0.005)
    assert r["reps"] == 3 and r["ms_call"] > 0 and r["ms_min"] <= r["ms_call"] <= r["ms_max"]
    assert r.get("ms_loop", 0) > 0 and r["ms"] == r["ms_loop"], r


# ------------------------------------------------------------------------------------ the CLI
def _run(args, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m"] + args, cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_bench_quick_cli(tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    peer_list = "xla,cudnn" if HAS_TORCH else "xla,cudnn,flex"  # real flex: minutes of compiling
    r = _run(["benchmarks.bench_na", "--quick", "--backends", "reference", "--peers", peer_list,
              "--time-limit-s", "0", "--out", str(out), "--md", str(md)])
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    last = problems.load(quick=True)[-1].name
    assert lines[-1].startswith(f"| {last} | reference |")  # the table comes last
    assert md.read_text().strip().splitlines()[-1] == lines[-1]
    rep = json.loads(out.read_text())
    assert rep["env"]["jax"] == jax.__version__ and rep["env"]["device"]
    n = len(problems.load(quick=True))
    assert len(rep["rows"]) == (1 + len(peer_list.split(","))) * n
    for row in rep["rows"]:
        if row["impl"] in ("reference", "peer:xla"):
            for mode in ("fwd", "fwd_bwd"):
                t = row[mode]
                assert t["ms"] > 0 and t["useful_tflops"] > 0 and t["pct_floor"] > 0, row
            assert f"| {row['problem']} | {row['impl']} | " in r.stdout
        elif row["impl"] == "peer:flex" and not HAS_TORCH:
            assert "torch" in row["skipped"]


def test_flex_child_reports_errors():
    """The flex child parses a problem and always prints a result line."""
    if HAS_TORCH:
        pytest.skip("torch importable: the child would run the real peer")
    p = SMALL[4]
    r = _run(["benchmarks.peers", "flex", json.dumps(p.to_json()), "--reps", "1"], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1][len(peers.RESULT_PREFIX):])
    assert "torch" in res["error"]


def test_bench_time_limit(capsys):
    from benchmarks import bench_na

    rep = bench_na.main(["--quick", "--problems", "q1d,q2d", "--peers", "xla",
                         "--time-limit-s", "1e-9"])
    assert [r["problem"] for r in rep["rows"]] == ["q1d", "q1d", "q1d", "q2d", "q2d", "q2d"]
    assert all(r["skipped"] == "not run: time limit" for r in rep["rows"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("| q2d | reference |")


def test_fused_sm90_backend_forces_the_impl_only_while_it_runs(monkeypatch):
    from benchmarks import bench_na
    from natten_jax import tiles

    monkeypatch.delenv(tiles.IMPL_ENV, raising=False)
    monkeypatch.delenv(tiles.BWD_IMPL_ENV, raising=False)
    forced = bench_na._forced_impl("fused_sm90")
    assert tiles.impl_setting() == "sm90"
    forced.close()
    assert tiles.impl_setting() == "auto" and tiles.BWD_IMPL_ENV not in os.environ
    forced = bench_na._forced_impl("fused_sm90_bwd")
    assert tiles.impl_setting() == "sm90" and tiles.bwd_impl_setting() == "sm90"
    forced.close()
    assert tiles.bwd_impl_setting() == "auto" and tiles.BWD_IMPL_ENV not in os.environ
    monkeypatch.setenv(tiles.IMPL_ENV, "auto")
    bench_na._forced_impl("fused").close()
    assert tiles.impl_setting() == "auto"
    forced = bench_na._forced_impl("fused_sm90")
    forced.close()
    forced.close()
    assert tiles.impl_setting() == "auto"
