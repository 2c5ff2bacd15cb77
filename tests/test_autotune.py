"""Auto-tuner: modes, problem keys, the shared on-disk cache (CPU, with fake timers)."""

import json
import os
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import pytest

from natten_jax import autotune, tiles
from natten_jax.backends import fused
from natten_jax.checks import NAProblem
from natten_jax.config import FusedConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))


def problem(cache_dir=None, dtype="bfloat16", spatial=(24, 40), **config) -> NAProblem:
    """The test problem with FusedConfig(cache_dir=cache_dir, **config) (the sm80 kernels
    unless ``config`` says otherwise)."""
    config = dict(dict(forward_impl="sm80", backward_impl="sm80"), **config)
    cfg = FusedConfig(cache_dir=None if cache_dir is None else str(cache_dir), **config)
    return NAProblem(rank=2, spatial=spatial, kernel_size=(7, 7), stride=(1, 1), dilation=(1, 1),
                     is_causal=(False, False), scale=0.125, batch=2, heads=4, heads_kv=4,
                     head_dim=64, head_dim_v=64, num_extra=0, dtype=dtype, config=cfg)


def winner(p, backward=False):
    """The candidate the fake timer makes fastest: 4th by the cost model, not the heuristic."""
    return autotune.candidates(p, backward, "on")[3]


def fake_timer(counter=None, delay=0.0):
    """Deterministic timer: ``winner`` takes 0.5 s, the others 1 s and up (by their tiles).
    Each call appends "pid tiles" to ``counter`` (a file) when given."""
    calls = []

    def timer(p, t, backward, *, impl):
        assert impl in tiles.IMPLS
        calls.append(t)
        if counter is not None:
            with open(counter, "a") as f:
                f.write(f"{os.getpid()} {t}\n")
        if delay:
            time.sleep(delay)
        if t == winner(p, backward):
            return 0.5
        return 1.0 + 0.01 * sum((i + 1) * x for i, x in enumerate(t[0] + t[1]))

    timer.calls = calls
    return timer


def heuristic(p, backward=False):
    qt, kt = tiles.choose_tiles(p.spatial, p.kernel_size, p.stride, p.dilation, p.is_causal,
                                p.head_dim, backward=backward, q_tile=p.config.q_tile,
                                dtype=p.dtype)
    return tuple(qt), tuple(kt)


@pytest.fixture
def cache(tmp_path):
    """A fresh cache directory (the tests' problems name it in their config)."""
    autotune.clear_memory_cache()
    yield tmp_path / "cache"
    autotune.clear_memory_cache()


def _child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + [env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    env["JAX_PLATFORMS"] = "cpu"
    return env


# A second process: tunes (or reads) the test problem with a fake timer that logs to a file.
# argv: cache dir, counter file, [ready file, go file] to start all children at the same moment.
CHILD = r"""
import json, os, sys, time
import test_autotune as T
from natten_jax import autotune
cache, counter = sys.argv[1:3]
if len(sys.argv) > 3:
    open(sys.argv[3], "w").close()
    while not os.path.exists(sys.argv[4]):
        time.sleep(0.005)
t = autotune.select_tiles(T.problem(cache), mode="on", timer=T.fake_timer(counter, delay=0.02))
print(json.dumps(t))
"""


def _lines(path):
    return open(path).read().split("\n")[:-1] if os.path.exists(path) else []


def test_mode_off_is_the_heuristic_and_times_nothing(cache):
    p = problem(cache)
    timer = fake_timer()
    assert autotune.select_tiles(p, timer=timer) == heuristic(p)  # the config's mode: off
    assert autotune.select_tiles(p, backward=True, mode="off", timer=timer) == heuristic(p, True)
    assert autotune.select_tiles(p) == heuristic(p)  # no timer needed
    assert timer.calls == [] and not cache.exists()


def test_mode_comes_from_the_config(cache):
    timer = fake_timer()
    assert autotune.select_tiles(problem(cache, autotune="on"), timer=timer) == winner(problem())
    assert len(timer.calls) == autotune.TOP_K
    assert autotune.resolve_mode(problem(autotune="thorough")) == "thorough"
    assert autotune.resolve_mode(problem(autotune="thorough"), " Off ") == "off"  # argument wins


def test_invalid_mode_and_missing_timer(cache):
    with pytest.raises(ValueError, match="mode"):
        autotune.select_tiles(problem(cache), mode="always", timer=fake_timer())
    with pytest.raises(TypeError, match="timer"):
        autotune.select_tiles(problem(cache, autotune="on"))
    with pytest.raises(ValueError, match="impl"):
        autotune.select_tiles(problem(cache), impl="sm100")


def test_problem_key_is_stable_and_complete():
    p = problem()
    k = autotune.problem_key(p, device="H100")
    assert k == autotune.problem_key(problem(), device="H100")
    import natten_jax
    for part in ("device=H100", "dtype=bfloat16", "dir=forward", "spatial=24x40", "kernel=7x7",
                 "stride=1x1", "dilation=1x1", "causal=0x0", "head_dim=64", "heads=4",
                 "heads_kv=4", "batch=2", f"natten_jax={natten_jax.__version__}", "impl=sm80"):
        assert part in k.split("|")
    assert autotune.problem_key(p, True, device="H100") != k
    assert autotune.problem_key(problem(dtype="float16"), device="H100") != k
    assert autotune.problem_key(p, device="H100", impl="sm90") != k
    # the kernel the config selects, unless named
    assert autotune.problem_key(problem(forward_impl="sm90"), device="H100") == \
        autotune.problem_key(p, device="H100", impl="sm90")


def test_candidates_are_legal_and_ranked():
    p = problem()
    on, full = autotune.candidates(p, False, "on"), autotune.candidates(p, False, "thorough")
    assert len(on) == autotune.TOP_K and on == full[:autotune.TOP_K] and on[0] == heuristic(p)
    assert len(full) == len(set(full)) == (7 + 8) * 7  # rank 2: Q 64 or 128 tokens, KV 64
    assert all(sum(q) in (6, 7) and sum(k) == 6 for q, k in full)
    back = autotune.candidates(p, True, "thorough")
    assert len(back) == 7 * 7 and all(sum(q) == 6 for q, _ in back)
    for q_tile, log2, n in ((64, 6, 7), (128, 7, 8)):  # the config restricts the forward's Q tile
        got = autotune.candidates(problem(q_tile=q_tile), False, "thorough")
        assert len(got) == n * 7 and all(sum(q) == log2 for q, _ in got)
        assert autotune.candidates(problem(q_tile=q_tile), True, "thorough") == back


def test_sm90_forward_candidates_include_128_key_boxes():
    """The sm90 forward takes 128-key boxes with 128-query tiles (kernel_table.h); nothing
    else does, and a cached entry naming them is legal for that kernel only."""
    p = problem()
    full = autotune.candidates(p, False, "thorough", impl="sm90")
    assert len(full) == len(set(full)) == (7 + 8) * 7 + 8 * 8
    assert {(sum(q), sum(k)) for q, k in full} == {(6, 6), (7, 6), (7, 7)}
    assert all(sum(k) == 6 for _, k in autotune.candidates(p, False, "thorough", impl="sm80"))
    assert all(sum(k) == 6 for _, k in autotune.candidates(p, True, "thorough", impl="sm90"))
    wide = ((3, 4), (3, 4))
    assert autotune._legal(p, False, wide, "sm90") == wide
    assert autotune._legal(p, False, wide, "sm80") is None
    assert autotune._legal(p, True, wide, "sm90") is None
    assert autotune._legal(p, False, ((3, 3), (3, 4)), "sm90") is None  # 64-query tile


def test_q_tile_config_tunes_and_caches_apart(cache):
    p, p64 = problem(cache), problem(cache, q_tile=64)
    t_all, t64 = fake_timer(), fake_timer()
    autotune.select_tiles(p, mode="thorough", timer=t_all)
    got = autotune.select_tiles(p64, mode="thorough", timer=t64)  # not served by p's entry
    assert t64.calls and all(sum(q) == 6 for q, _ in t64.calls) and sum(got[0]) == 6
    assert len(t64.calls) < len(t_all.calls)
    assert len(json.load(open(cache / autotune.CACHE_FILE))["entries"]) == 2


def test_mode_on_tunes_once_and_persists(cache):
    p = problem(cache)
    timer = fake_timer()
    got = autotune.select_tiles(p, mode="on", timer=timer)
    assert got == winner(p) != heuristic(p)
    assert sorted(timer.calls) == sorted(autotune.candidates(p, False, "on"))  # each once
    data = json.load(open(cache / autotune.CACHE_FILE))
    entry = data["entries"][autotune.problem_key(p)]
    assert (tuple(entry["q_tile"]), tuple(entry["kv_tile"])) == got and entry["mode"] == "on"
    assert not [f for f in os.listdir(cache) if f.endswith(".tmp")]  # temp file replaced

    assert autotune.select_tiles(p, mode="on", timer=timer) == got  # in-memory hit
    autotune.clear_memory_cache()  # new in-memory state, same directory
    timer2 = fake_timer()
    assert autotune.select_tiles(p, mode="on", timer=timer2) == got and timer2.calls == []

    # The backward is a separate key with its own (64-token) candidates.
    tb = fake_timer()
    assert autotune.select_tiles(p, backward=True, mode="on", timer=tb) == winner(p, True)
    assert len(tb.calls) == autotune.TOP_K
    assert len(json.load(open(cache / autotune.CACHE_FILE))["entries"]) == 2


def test_thorough_times_every_candidate_and_serves_on(cache):
    p = problem(cache)
    on, thorough = fake_timer(), fake_timer()
    autotune.select_tiles(p, mode="on", timer=on)
    got = autotune.select_tiles(p, mode="thorough", timer=thorough)  # "on" entry is not enough
    assert len(thorough.calls) == len(autotune.candidates(p, False, "thorough")) > len(on.calls)
    assert got == winner(p)
    again = fake_timer()
    assert autotune.select_tiles(p, mode="on", timer=again) == got
    assert autotune.select_tiles(p, mode="thorough", timer=again) == got and again.calls == []


def test_second_process_reuses_the_cache(cache, tmp_path):
    p = problem(cache)
    assert autotune.select_tiles(p, mode="on", timer=fake_timer()) == winner(p)
    counter = tmp_path / "counter"
    r = subprocess.run([sys.executable, "-c", CHILD, str(cache), str(counter)], env=_child_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    q, k = json.loads(r.stdout)
    assert (tuple(q), tuple(k)) == winner(p)
    assert _lines(counter) == []  # no timing in the second process


def test_concurrent_processes_tune_once(cache, tmp_path):
    counter, go = tmp_path / "counter", tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(cache), str(counter), str(r),
                               str(go)], env=_child_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in ready]
    try:
        deadline = time.time() + 50
        while not all(r.exists() for r in ready) and time.time() < deadline:
            time.sleep(0.01)
        go.touch()
        outs = [pr.communicate(timeout=50) for pr in procs]
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
    for pr, (out, err) in zip(procs, outs):
        assert pr.returncode == 0, err
    results = {json.dumps(json.loads(out)) for out, _ in outs}
    assert len(results) == 1
    q, k = json.loads(results.pop())
    assert (tuple(q), tuple(k)) == winner(problem())
    lines = _lines(counter)
    assert len(lines) == autotune.TOP_K  # one process timed each candidate once
    assert len({line.split()[0] for line in lines}) == 1


def test_concurrent_threads_tune_once(cache):
    p = problem(cache)
    timer = fake_timer(delay=0.01)
    results = []
    threads = [threading.Thread(
        target=lambda: results.append(autotune.select_tiles(p, mode="on", timer=timer)))
        for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [winner(p)] * 3 and len(timer.calls) == autotune.TOP_K


def test_corrupt_cache_warns_and_is_replaced(cache):
    cache.mkdir()
    (cache / autotune.CACHE_FILE).write_text("{not json")
    p = problem(cache)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        got = autotune.select_tiles(p, mode="on", timer=fake_timer())
    assert got == winner(p)
    data = json.load(open(cache / autotune.CACHE_FILE))  # rewritten, valid
    assert autotune.problem_key(p) in data["entries"]


def test_illegal_cached_tiles_are_ignored(cache):
    p = problem(cache)
    cache.mkdir()
    bad = {"mode": "thorough", "q_tile": [9, 9], "kv_tile": [3, 3]}
    (cache / autotune.CACHE_FILE).write_text(json.dumps(
        {"format": autotune.CACHE_FORMAT, "entries": {autotune.problem_key(p): bad}}))
    timer = fake_timer()
    assert autotune.select_tiles(p, mode="on", timer=timer) == winner(p)
    assert len(timer.calls) == autotune.TOP_K


def test_failing_timer_falls_back_to_the_heuristic(cache):
    p = problem(cache)

    def broken(p, t, backward, *, impl):
        raise RuntimeError("kernel launch failed")

    with pytest.warns(RuntimeWarning, match="could not be timed"):
        assert autotune.select_tiles(p, mode="on", timer=broken) == heuristic(p)
    assert not (cache / autotune.CACHE_FILE).exists()
    assert autotune.select_tiles(p, mode="on", timer=broken) == heuristic(p)  # no retry storm


def test_unwritable_cache_dir_warns(cache, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    p = problem(blocker / "sub")  # its parent is a file
    with pytest.warns(RuntimeWarning):
        assert autotune.select_tiles(p, mode="on", timer=fake_timer()) == winner(p)


def test_fused_attrs_hook(cache, monkeypatch):
    p = problem(cache)
    assert tuple(fused._attrs(p)["q_tile"]) == heuristic(p)[0]  # the config's mode: off
    monkeypatch.setattr(fused, "time_kernel", fake_timer())  # what _attrs hands the tuner
    p_on = problem(cache, autotune="on")
    a, b = fused._attrs(p_on), fused._attrs(p_on, backward=True)
    assert (tuple(a["q_tile"]), tuple(a["kv_tile"])) == winner(p)
    assert (tuple(b["q_tile"]), tuple(b["kv_tile"])) == winner(p, True)
    explicit = ((3, 3), (3, 3))
    assert tuple(fused._attrs(p_on, explicit)["q_tile"]) == (3, 3)  # explicit tiles: no tuning


def test_time_kernel_runs_at_trace_time_on_fresh_operands(cache, monkeypatch):
    """fused.time_kernel through the fused hook, inside jit, with CPU stand-ins for the kernels:
    operands are concrete (not the tracers), of the problem's shapes, freed after tuning."""
    p = problem(cache, dtype="float32", spatial=(8, 16), autotune="on")
    seen = {"fwd": [], "bwd": [], "operands": []}

    def fake_forward(p_, q, k, v, tiles=None, impl=None):
        assert tiles is not None and impl == "sm80"
        seen["fwd"].append(tiles)
        return q * 2, jnp.sum(q, axis=-1)

    def fake_backward(p_, q, k, v, dout, lse, delta, tiles=None, impl=None):
        assert tiles is not None and impl == "sm80"
        assert lse.shape == delta.shape == q.shape[:-1]
        seen["bwd"].append(tiles)
        return q + dout, k * 2, v * 2

    orig = autotune.random_operands

    def spy(p_, backward, forward=None):
        args = orig(p_, backward, forward)
        seen["operands"].append(args)
        return args

    monkeypatch.setattr(fused, "_forward_call", fake_forward)
    monkeypatch.setattr(fused, "_backward_call", fake_backward)
    monkeypatch.setattr(autotune, "random_operands", spy)
    got = {}

    @jax.jit
    def traced(x):
        got["fwd"] = fused._attrs(p)
        got["bwd"] = fused._attrs(p, backward=True)
        return x + 1

    assert float(traced(jnp.float32(1.0))) == 2.0
    fwd_cands = autotune.candidates(p, False, "on")
    bwd_cands = autotune.candidates(p, True, "on")
    assert set(seen["bwd"]) == set(bwd_cands)
    # The forward ran once per forward candidate (plus warm-up runs), and once more with the
    # heuristic forward tiles to make O and LSE for the backward operands.
    assert set(seen["fwd"]) == set(fwd_cands) | {heuristic(p)}
    shape = (2, 8, 16, 4, 64)
    for args in seen["operands"]:
        for a in args:
            assert isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer)
            assert a.shape in (shape, shape[:-1])
            assert bool(jnp.all(jnp.isfinite(a)))
        assert float(jnp.mean(jnp.abs(args[0]))) > 0.1  # random, not zeros
    assert autotune._inputs == {}  # operands released after tuning
    assert (tuple(got["fwd"]["q_tile"]), tuple(got["fwd"]["kv_tile"])) in fwd_cands
    assert (tuple(got["bwd"]["q_tile"]), tuple(got["bwd"]["kv_tile"])) in bwd_cands


def test_random_operands_of_the_backward_need_the_forward():
    with pytest.raises(TypeError, match="forward"):
        autotune.random_operands(problem(), True)


def test_backward_tiles_are_tuned_and_cached_per_backward_kernel(cache):
    """backward_impl="sm90" tiles are timed with the sm90 backward and cached apart."""
    p = problem(cache)
    t80 = fake_timer()
    autotune.select_tiles(p, backward=True, mode="on", timer=t80)
    t90 = fake_timer()
    autotune.select_tiles(problem(cache, backward_impl="sm90"), backward=True, mode="on",
                          timer=t90)
    assert t80.calls and t90.calls  # the sm80 entry did not serve the sm90 kernel
    again = fake_timer()
    autotune.select_tiles(p, backward=True, mode="on", timer=again, impl="sm90")
    autotune.select_tiles(p, backward=True, mode="on", timer=again)
    assert not again.calls


def test_the_timer_times_the_kernel_of_the_entry(cache):
    """Each cache entry is timed with its own kernel, whatever the config selects (the sm80
    entry of device run 5 was timed with the sm90 kernel under `auto`)."""
    seen = []

    def timer(p, t, backward, *, impl):
        seen.append((backward, impl))
        return 1.0

    p = problem(cache, forward_impl="auto", backward_impl="auto")
    for backward in (False, True):
        for impl in ("sm80", "sm90"):
            autotune.select_tiles(p, backward=backward, mode="on", impl=impl, timer=timer)
    assert sorted(set(seen)) == [(False, "sm80"), (False, "sm90"), (True, "sm80"), (True, "sm90")]


@pytest.mark.parametrize("lead, keeps", [(0.01, True), (0.05, False)])
def test_a_winner_inside_the_noise_margin_keeps_the_cost_models_choice(cache, lead, keeps):
    p = problem(cache)
    h = heuristic(p)
    other = next(t for t in autotune.candidates(p, False, "on") if t != h)

    def timer(p_, t, backward, *, impl):
        return {h: 1.0, other: 1.0 - lead}.get(t, 2.0)

    got = autotune.select_tiles(p, mode="on", timer=timer)
    assert got == (h if keeps else other)
    assert autotune.TUNE_MARGIN == 0.02


def test_implementation_choice_keeps_the_cost_models_impl_inside_the_margin(cache, monkeypatch):
    monkeypatch.setattr(autotune, "sm90_runs", lambda: True)
    preferred = autotune.resolve_impl(problem(forward_impl="auto"))
    other = "sm80" if preferred == "sm90" else "sm90"
    for lead, want in ((0.01, preferred), (0.10, other)):
        autotune.clear_memory_cache()

        def timer(p_, t, b, *, impl):
            return 1.0 - lead if impl == other else 1.0

        p = problem(cache / f"lead{lead}", forward_impl="auto")
        impl, _ = autotune.select_config(p, mode="on", timer=timer)
        assert impl == want
        # forced by the config: no choice
        forced = problem(cache / f"lead{lead}", forward_impl=preferred, autotune="on")
        assert autotune.select_config(forced, timer=timer)[0] == preferred
