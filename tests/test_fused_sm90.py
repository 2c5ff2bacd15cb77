"""The sm90 (Hopper, wgmma) fused forward kernel against the float64 reference, per element.

GPU tests (marked ``gpu``) run the case grid of ``test_fused.py`` through the sm90 kernel
(``FusedConfig(forward_impl="sm90")``), outputs poisoned, at the head dims it implements (64,
128), with the per-element rule of ``test_fused.py``; they skip where the GPU is not compute
capability 9.0 or the module lacks sm_90a code. The CPU tests check which forward kernel the
configuration selects (``auto`` on a GPU where sm90 runs or not; the custom call's attribute);
tests/test_config.py checks the attributes of explicit configs.
"""


import jax
import numpy as np
import pytest

import natten_jax
from natten_jax import FusedConfig, _ffi, autotune, tiles
from natten_jax.backends import fused
from natten_jax.checks import check_na_call
from test_fused import (CASES, _inputs, check_forward, check_forward_case,  # POISON_OUTPUTS
                        reference_forward)

SM90 = FusedConfig(forward_impl="sm90")


def _sm90_ready():
    if not _ffi.cuda_kernels_available():
        return False, _ffi.unavailable_reason()
    if not autotune.hopper_device():
        return False, "the GPU is not compute capability 9.0"
    if not any(a.startswith("90a") for a in _ffi.cuda_compiled_archs()):
        return False, f"module built without sm_90a ({_ffi.cuda_compiled_archs()})"
    return True, ""


@pytest.fixture
def sm90():
    ok, why = _sm90_ready()
    if not ok:
        pytest.skip(why)


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
    call = jax.jit(lambda q, k, v: f(q, k, v, kernel, stride, dilation, causal, backend="fused",
                                     backend_config=SM90, return_lse=True))
    assert f"impl = {tiles.impl_code('sm90')} : i64" in call.lower(q, k, v).as_text()
    out, lse = call(q, k, v)
    check_forward_case(q, k, v, out, lse, kernel, stride, dilation, causal,
                       name=f"case {case} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("D", [64, 128])
def test_every_tile_shape(sm90, rank, D):
    """64-query (one consumer warpgroup) and 128-query (two) tiles, KV boxes of every shape
    (64 keys; 128 keys with 128-query tiles)."""
    spatial = {1: (150,), 2: (21, 19), 3: (7, 9, 11)}[rank]
    kernel = {1: 13, 2: (5, 6), 3: (3, 4, 5)}[rank]
    dilation = {1: 2, 2: (1, 2), 3: (2, 1, 1)}[rank]
    q, k, v = _inputs(jax.random.PRNGKey(10 + rank), spatial, 1, 2, 1, D, "bfloat16")
    p = check_na_call(rank, q, k, v, kernel, 1, dilation, False, None, backend_config=SM90)
    refs = reference_forward(q, k, v, kernel, 1, dilation, False)
    pairs = list(tiles.tile_shapes(rank, (6, 7), "sm90"))
    wide = [i for i, (_, kt) in enumerate(pairs) if sum(kt) == 7]
    rng = np.random.default_rng(rank * 7 + D)
    picks = set(rng.choice(len(pairs), size=min(len(pairs), 12), replace=False).tolist())
    picks |= set(rng.choice(wide, size=min(len(wide), 6), replace=False).tolist())
    for i in sorted(picks):
        qt, kt = pairs[i]
        out, lse = fused._forward_call(p, q, k, v, tiles=(qt, kt), impl="sm90")
        check_forward(out, lse, refs, name=f"tiles {qt} {kt}")


# Many boxes per tile (more than the pipeline's stages, so stages wrap around), warpgroups that
# skip boxes, causal windows, partial tiles.
LARGE = [
    ((3000,), 511, 1, 1, False),
    ((2500,), 300, 1, 1, True),
    ((72, 80), (31, 23), (1, 1), (1, 1), (False, False)),
    ((40, 64), (13, 17), (2, 1), (2, 3), (True, False)),
    ((10, 24, 24), (5, 9, 9), (1, 1, 1), (1, 1, 1), (True, False, False)),
    # block-dense (GNA strides: every Q tile sees whole KV boxes), and its causal variant
    ((64, 64), (32, 32), (16, 16), (1, 1), (False, False)),
    ((16, 32, 32), (8, 16, 16), (8, 8, 8), (1, 1, 1), (True, False, False)),
]


def _best_tiles(spatial, p, D, qn, kn):
    """The cost model's shape among Q tiles of 2^qn and KV boxes of 2^kn tokens."""
    shapes = [t for t in tiles.tile_shapes(len(spatial), (qn,), "sm90")
              if sum(t[1]) == kn]
    return min(shapes, key=lambda t: tiles.visited_pairs(tuple(spatial), p.kernel_size, p.stride,
                                                         p.dilation, p.is_causal, *t))


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", range(len(LARGE)))
def test_large_windows(sm90, case, D):
    spatial, kernel, stride, dilation, causal = LARGE[case]
    rank = len(spatial)
    q, k, v = _inputs(jax.random.PRNGKey(300 + case), spatial, 1, 2, 1, D, "bfloat16")
    p = check_na_call(rank, q, k, v, kernel, stride, dilation, causal, None, backend_config=SM90)
    refs = reference_forward(q, k, v, kernel, stride, dilation, causal)
    # every kernel variant (one or two consumer warpgroups; 64- or 128-key boxes), each with
    # its fewest visited pairs
    for qn, kn in ((6, 6), (7, 6), (7, 7)):
        tl = _best_tiles(spatial, p, D, qn, kn)
        out, lse = fused._forward_call(p, q, k, v, tiles=tl, impl="sm90")
        check_forward(out, lse, refs, name=f"{1 << qn}-query tiles {tl}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sm90_and_sm80_on_the_same_tiles(sm90, dtype):
    """Same problem and tiles through both kernels: each within the rule."""
    spatial, kernel = (33, 45), (9, 11)
    q, k, v = _inputs(jax.random.PRNGKey(5), spatial, 2, 4, 2, 128, dtype)
    p = check_na_call(2, q, k, v, kernel, 1, 1, False, None)
    refs = reference_forward(q, k, v, kernel)
    for qt in ((3, 3), (3, 4)):
        for impl in ("sm80", "sm90"):
            out, lse = fused._forward_call(p, q, k, v, tiles=(qt, (3, 3)), impl=impl)
            check_forward(out, lse, refs, name=f"{impl} q tile {qt}")


@pytest.mark.gpu
def test_head_dim_32_falls_back_to_sm80(sm90):
    q, k, v = _inputs(jax.random.PRNGKey(6), (20, 20), 1, 2, 2, 32, "float16")
    p = check_na_call(2, q, k, v, 5, 1, 1, False, None, backend_config=SM90)
    assert fused._attrs(p)["impl"] == tiles.impl_code("sm80")
    out, lse = natten_jax.na2d(q, k, v, 5, backend="fused", backend_config=SM90, return_lse=True)
    check_forward_case(q, k, v, out, lse, 5, name="head dim 32")


# ---------------------------------------------------------------------------------------------
# CPU: which forward kernel a configuration selects


def _problem(config, D=64, dtype=np.float16):
    q = np.zeros((1, 12, 10, 2, D), dtype)
    return check_na_call(2, q, q, q, (5, 3), 1, 1, False, None, backend_config=config)


def test_impl_candidates(monkeypatch):
    monkeypatch.setattr(autotune, "sm90_runs", lambda: True)
    assert autotune.impl_candidates(64, SM90) == ("sm90",)
    assert autotune.impl_candidates(32, SM90) == ("sm80",)  # no sm90 kernel at head dim 32
    auto = FusedConfig(forward_impl="auto")
    assert autotune.impl_candidates(128, auto) == ("sm80", "sm90")
    monkeypatch.setattr(autotune, "sm90_runs", lambda: False)
    assert autotune.impl_candidates(128, auto) == ("sm80",)
    assert autotune.impl_candidates(128, FusedConfig(forward_impl="sm80")) == ("sm80",)


def test_auto_runs_sm90_only_where_it_runs(monkeypatch):
    """``auto`` (forward and backward): the sm80 kernels where sm90 cannot run, the sm90 ones
    (the cost model's choice for this problem) on a Hopper GPU with sm_90a code; the lowered
    custom calls of jax.grad carry that choice."""
    p = _problem(FusedConfig(forward_impl="auto", backward_impl="auto"))
    q = np.zeros((1, 12, 10, 2, 64), np.float16)

    def lowered_impls():
        loss = lambda q, k, v: fused.run(p, q, k, v)[0].astype(np.float32).sum()  # noqa: E731
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, q, q).lower(
            lowering_platforms=("cuda",)).as_text()
        calls = [ln for ln in text.splitlines() if "stablehlo.custom_call @natten_jax_fna" in ln]
        assert len(calls) == 2, calls
        return {ln.split("@")[1].split("(")[0]: int(ln.split("impl = ")[1].split()[0])
                for ln in calls}

    monkeypatch.setattr(autotune, "sm90_runs", lambda: False)
    assert fused._attrs(p)["impl"] == 0 and fused._attrs(p, backward=True)["impl"] == 0
    assert lowered_impls() == {fused.TARGET: 0, fused.TARGET_BACKWARD: 0}
    monkeypatch.setattr(autotune, "sm90_runs", lambda: True)
    assert fused._attrs(p)["impl"] == 1 and fused._attrs(p, backward=True)["impl"] == 1
    assert lowered_impls() == {fused.TARGET: 1, fused.TARGET_BACKWARD: 1}
