"""The sm90 (Hopper, wgmma) fused forward kernel against the float64 reference.

GPU tests (marked ``gpu``) run the case grid of ``test_fused.py`` through the sm90 kernel
(``NATTEN_JAX_FNA_IMPL=sm90``), outputs poisoned, at the head dims it implements (64, 128); they
skip where the GPU is not compute capability 9.0 or the module lacks sm_90a code. The CPU tests
check the implementation switch (environment, autotuner keys, custom-call attributes).
"""

import itertools

import jax
import numpy as np
import pytest

import natten_jax
from natten_jax import _ffi, autotune, tiles
from natten_jax.backends import fused
from natten_jax.checks import check_na_call
from natten_jax.tiles import _candidates
from test_fused import CASES, TOL, _check, _inputs, _rel  # also sets fused.POISON_OUTPUTS

IMPL_ENV = tiles.IMPL_ENV


def _sm90_ready():
    if not _ffi.cuda_kernels_available():
        return False, _ffi.unavailable_reason()
    if not autotune.hopper_device():
        return False, "the GPU is not compute capability 9.0"
    if not any(a.startswith("90a") for a in _ffi.cuda_compiled_archs()):
        return False, f"module built without sm_90a ({_ffi.cuda_compiled_archs()})"
    return True, ""


@pytest.fixture
def sm90(monkeypatch):
    ok, why = _sm90_ready()
    if not ok:
        pytest.skip(why)
    monkeypatch.setenv(IMPL_ENV, "sm90")


# ---------------------------------------------------------------------------------------------
# GPU: correctness


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_matches_reference(sm90, case, dtype):
    spatial, kernel, stride, dilation, causal = CASES[case]
    rank = len(spatial)
    D = (64, 128)[case % 2]
    H, Hkv = [(4, 4), (4, 2), (4, 1)][case % 3]
    q, k, v = _inputs(jax.random.PRNGKey(2000 + case), spatial, 2, H, Hkv, D, dtype)
    f = getattr(natten_jax, f"na{rank}d")
    out, lse = jax.jit(lambda q, k, v: f(q, k, v, kernel, stride, dilation, causal,
                                         backend="fused", return_lse=True))(q, k, v)
    _check(q, k, v, out, lse, spatial, kernel, stride, dilation, causal, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("D", [64, 128])
def test_every_tile_shape(sm90, rank, D):
    """64-query (one consumer warpgroup) and 128-query (two) tiles, KV boxes of every shape."""
    spatial = {1: (150,), 2: (21, 19), 3: (7, 9, 11)}[rank]
    kernel = {1: 13, 2: (5, 6), 3: (3, 4, 5)}[rank]
    dilation = {1: 2, 2: (1, 2), 3: (2, 1, 1)}[rank]
    q, k, v = _inputs(jax.random.PRNGKey(10 + rank), spatial, 1, 2, 1, D, "bfloat16")
    p = check_na_call(rank, q, k, v, kernel, 1, dilation, False, None)
    pairs = list(itertools.product(_candidates(rank, 6) + _candidates(rank, 7),
                                   _candidates(rank, 6)))
    rng = np.random.default_rng(rank * 7 + D)
    for i in rng.choice(len(pairs), size=min(len(pairs), 12), replace=False):
        qt, kt = pairs[i]
        out, lse = fused._forward_call(p, q, k, v, tiles=(qt, kt), impl="sm90")
        _check(q, k, v, out, lse, spatial, kernel, 1, dilation, False, "bfloat16")


# Many boxes per tile (more than the pipeline's stages, so stages wrap around), warpgroups that
# skip boxes, causal windows, partial tiles.
LARGE = [
    ((3000,), 511, 1, 1, False),
    ((2500,), 300, 1, 1, True),
    ((72, 80), (31, 23), (1, 1), (1, 1), (False, False)),
    ((40, 64), (13, 17), (2, 1), (2, 3), (True, False)),
    ((10, 24, 24), (5, 9, 9), (1, 1, 1), (1, 1, 1), (True, False, False)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", range(len(LARGE)))
def test_large_windows(sm90, case, D):
    spatial, kernel, stride, dilation, causal = LARGE[case]
    rank = len(spatial)
    q, k, v = _inputs(jax.random.PRNGKey(300 + case), spatial, 1, 2, 1, D, "bfloat16")
    p = check_na_call(rank, q, k, v, kernel, stride, dilation, causal, None)
    for qn in (6, 7):  # both consumer-warpgroup variants, with the cost model's shapes
        tl = tiles._choose_tiles(tuple(spatial), p.kernel_size, p.stride, p.dilation,
                                 p.is_causal, D, (qn,), "sm90")
        out, lse = fused._forward_call(p, q, k, v, tiles=tl, impl="sm90")
        _check(q, k, v, out, lse, spatial, kernel, stride, dilation, causal, "bfloat16")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sm90_matches_sm80(sm90, dtype):
    """Same problem and tiles through both kernels: equal up to accumulation order."""
    spatial, kernel = (33, 45), (9, 11)
    q, k, v = _inputs(jax.random.PRNGKey(5), spatial, 2, 4, 2, 128, dtype)
    p = check_na_call(2, q, k, v, kernel, 1, 1, False, None)
    for qt in ((3, 3), (3, 4)):
        a, la = fused._forward_call(p, q, k, v, tiles=(qt, (3, 3)), impl="sm80")
        b, lb = fused._forward_call(p, q, k, v, tiles=(qt, (3, 3)), impl="sm90")
        assert _rel(b.astype(np.float32), a.astype(np.float32)) < TOL[dtype] / 2
        np.testing.assert_allclose(np.asarray(lb), np.asarray(la), atol=5e-3, rtol=1e-3)


@pytest.mark.gpu
def test_head_dim_32_falls_back_to_sm80(sm90):
    q, k, v = _inputs(jax.random.PRNGKey(6), (20, 20), 1, 2, 2, 32, "float16")
    p = check_na_call(2, q, k, v, 5, 1, 1, False, None)
    assert fused._attrs(p)["impl"] == tiles.impl_code("sm80")
    out, lse = natten_jax.na2d(q, k, v, 5, backend="fused", return_lse=True)
    _check(q, k, v, out, lse, (20, 20), 5, 1, 1, False, "float16")


# ---------------------------------------------------------------------------------------------
# CPU: the implementation switch


def _problem(D=64):
    q = np.zeros((1, 12, 10, 2, D), np.float32)
    return check_na_call(2, q, q, q, (5, 3), 1, 1, False, None)


def test_impl_setting(monkeypatch):
    monkeypatch.delenv(IMPL_ENV, raising=False)
    assert tiles.impl_setting() == "auto"
    for s in ("sm80", "SM90", " auto "):
        monkeypatch.setenv(IMPL_ENV, s)
        assert tiles.impl_setting() == s.strip().lower()
    monkeypatch.setenv(IMPL_ENV, "sm100")
    with pytest.raises(ValueError, match=IMPL_ENV):
        tiles.impl_setting()
    assert [tiles.impl_code(i) for i in tiles.IMPLS] == [0, 1]


def test_impl_candidates(monkeypatch):
    monkeypatch.setattr(autotune, "sm90_runs", lambda: True)
    monkeypatch.setenv(IMPL_ENV, "sm90")
    assert autotune.impl_candidates(64) == ("sm90",)
    assert autotune.impl_candidates(32) == ("sm80",)  # no sm90 kernel at head dim 32
    monkeypatch.setenv(IMPL_ENV, "auto")
    assert autotune.impl_candidates(128) == ("sm80", "sm90")
    monkeypatch.setattr(autotune, "sm90_runs", lambda: False)
    assert autotune.impl_candidates(128) == ("sm80",)
    monkeypatch.setenv(IMPL_ENV, "sm80")
    assert autotune.impl_candidates(128) == ("sm80",)


def test_attrs_carry_impl(monkeypatch):
    monkeypatch.delenv(autotune.MODE_ENV, raising=False)
    p = _problem()
    monkeypatch.delenv(IMPL_ENV, raising=False)
    monkeypatch.delenv(tiles.BWD_IMPL_ENV, raising=False)
    monkeypatch.setattr(autotune, "sm90_runs", lambda: False)  # auto, where sm90 cannot run
    assert fused._attrs(p)["impl"] == 0
    assert fused._attrs(p, backward=True)["impl"] == 0
    monkeypatch.setattr(autotune, "sm90_runs", lambda: True)  # auto on a Hopper GPU
    assert fused._attrs(p)["impl"] == 1
    assert fused._attrs(p, backward=True)["impl"] == 1
    monkeypatch.setenv(tiles.BWD_IMPL_ENV, "sm80")
    monkeypatch.setenv(IMPL_ENV, "sm90")
    a = fused._attrs(p)
    assert a["impl"] == 1
    qt, kt = tiles.choose_tiles(p.spatial, p.kernel_size, p.stride, p.dilation, p.is_causal,
                                p.head_dim, impl="sm90")
    assert tuple(a["q_tile"]) == tuple(qt) and tuple(a["kv_tile"]) == tuple(kt)
    assert fused._attrs(p, ((3, 3), (3, 3)))["impl"] == 1
    assert fused._attrs(p, ((3, 3), (3, 3)), impl="sm80")["impl"] == 0
    # The backward follows NATTEN_JAX_FNA_BWD_IMPL only (tests/test_fused_backward_sm90.py).
    assert fused._attrs(p, backward=True)["impl"] == 0


def test_autotune_keys_and_config(monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.CACHE_DIR_ENV, str(tmp_path))
    autotune.clear_memory_cache()
    p = _problem()
    k80 = autotune.problem_key(p, device="H100")
    k90 = autotune.problem_key(p, device="H100", impl="sm90")
    assert k80 != k90 and "impl=sm90" in k90 and "impl" not in k80
    kb80 = autotune.problem_key(p, True, device="H100")
    kb90 = autotune.problem_key(p, True, device="H100", impl="sm90")  # the sm90 backward
    assert kb80 != kb90 and "impl=sm90" in kb90 and "impl" not in kb80 and kb90 != k90
    monkeypatch.setattr(autotune, "sm90_runs", lambda: True)
    monkeypatch.setattr(autotune, "device_kind", lambda: "H100")
    monkeypatch.setenv(IMPL_ENV, "auto")
    # Tuning off: the cost model (sm90's predicted per-pair cost is lower).
    impl, t = autotune.select_config(p, mode="off")
    assert impl == "sm90" and t == autotune._heuristic(p, False, "sm90")
    # Tuning on: each implementation's candidates are timed; the faster winner is taken.
    calls = []

    def timer(p_, t_, backward):
        calls.append(t_)
        return 1.0 + 0.01 * len(calls)

    impl, t = autotune.select_config(p, mode="on", timer=timer)
    n = len(autotune.candidates(p, False, "on"))
    assert len(calls) == n + len(autotune.candidates(p, False, "on", impl="sm90"))
    assert impl == "sm80" and t == calls[0]  # the first timed candidate was the fastest
    autotune.clear_memory_cache()
