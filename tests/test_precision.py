"""precision= (issue 23) on the CPU: how it resolves, where it reaches, what it changes.

* :func:`natten_jax.precision.resolve`: the table of accepted values, ``None`` following
  ``jax.default_matmul_precision`` at trace time, ``ValueError`` naming ``precision``;
* the reference backend at "highest" on float32 against float64 on the issue's five input cases
  (tests/precision_cases.py), and float16 inputs whose logits exceed float16's range;
* the static problem: another precision is another trace, and the lowered program's products
  carry it;
* the unfused operators and the Flax layers (and the NAT model) take it;
* the fused backend's Python side: float32 goes to the custom calls as float32 with the
  ``precision`` attribute, gradients without rescaling; sm80 kernels and 64-token Q tiles only;
  ``can_run``'s float32 rules (the kernels themselves: tests/test_fp32_fused.py, GPU).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natten_jax
import precision_cases as pc
from natten_jax import _ffi, autotune, tiles, unfused
from natten_jax import precision as P
from natten_jax.backends import fused
from natten_jax.checks import check_na_call

CPU = jax.devices("cpu")[0]

TABLE = [
    (None, "default"), ("default", "default"), ("fastest", "default"), ("bfloat16", "default"),
    ("tensorfloat32", "default"), ("DEFAULT", "default"), (jax.lax.Precision.DEFAULT, "default"),
    ("high", "highest"), ("highest", "highest"), ("float32", "highest"),
    ("bfloat16_3x", "highest"), (" Highest ", "highest"), (jax.lax.Precision.HIGH, "highest"),
    (jax.lax.Precision.HIGHEST, "highest"), ("TF32_TF32_F32", "default"),
    ("BF16_BF16_F32", "default"), ("TF32_TF32_F32_X3", "highest"), ("F32_F32_F32", "highest"),
    (("highest", jax.lax.Precision.HIGHEST), "highest"),
]


@pytest.mark.parametrize("value,mode", TABLE)
def test_resolution_table(value, mode):
    assert P.resolve(value) == mode
    assert P.lax_precision(mode) == {"default": jax.lax.Precision.DEFAULT,
                                     "highest": jax.lax.Precision.HIGHEST}[mode]
    assert P.ffi_code(mode) == {"default": 0, "highest": 1}[mode]


def test_dot_algorithm_preset_objects():
    presets = getattr(jax.lax, "DotAlgorithmPreset", None)
    if presets is None:
        pytest.skip("this jax has no DotAlgorithmPreset")
    assert P.resolve(presets.TF32_TF32_F32) == "default"
    assert P.resolve(presets.F32_F32_F32) == "highest"


@pytest.mark.parametrize("context,mode", [("highest", "highest"), ("float32", "highest"),
                                          ("high", "highest"), ("tensorfloat32", "default"),
                                          ("bfloat16", "default"), ("default", "default")])
def test_none_follows_default_matmul_precision(context, mode):
    q = jnp.zeros((1, 8, 2, 32), jnp.float32)
    assert P.resolve(None) == "default"
    with jax.default_matmul_precision(context):
        assert P.resolve(None) == mode
        assert check_na_call(1, q, q, q, 3, 1, 1, False, None).precision == mode
        # an explicit value wins over the context
        assert check_na_call(1, q, q, q, 3, 1, 1, False, None, precision="default"
                             ).precision == "default"
    assert check_na_call(1, q, q, q, 3, 1, 1, False, None).precision == "default"


@pytest.mark.parametrize("bad", ["fast", "float64", "", 3, 1.0, True, object(),
                                 ("default", "highest"), ("highest",)])
def test_bad_precision_is_a_value_error_naming_it(bad):
    q = jnp.zeros((1, 8, 2, 32), jnp.float32)
    with pytest.raises(ValueError, match="`precision`"):
        P.resolve(bad)
    with pytest.raises(ValueError, match="`precision`"):
        natten_jax.na1d(q, q, q, 3, precision=bad)
    with pytest.raises(ValueError, match="`precision`"):
        unfused.na1d_qk(q, q, 3, precision=bad)
    with pytest.raises(ValueError, match="`precision`"):
        unfused.na1d_av(jnp.zeros((1, 8, 2, 3)), q, 3, precision=bad)


# ---------------------------------------------------------------------------------------------
# The reference backend


def _na_cpu(q, k, v, dtype, **kw):
    with jax.default_device(CPU):
        args = [jnp.asarray(np.asarray(x), dtype) for x in (q, k, v)]
        out, lse = natten_jax.na2d(*args, pc.KERNEL, backend="reference", return_lse=True,
                                   **kw)
        return np.asarray(out), np.asarray(lse)


@pytest.mark.parametrize("case", list(pc.CASES))
def test_reference_highest_is_float32_accurate_on_the_issue_cases(case):
    q, k, v = pc.inputs(case, seed=23)
    out64, _ = _na_cpu(q, k, v, jnp.float64)
    out, lse = _na_cpu(q, k, v, jnp.float32, precision="highest")
    assert out.dtype == np.float32 and np.all(np.isfinite(out)) and np.all(np.isfinite(lse))
    err, bound = pc.relative_error(out, out64), pc.highest_bound(case, q, k)
    assert err <= bound, f"{case}: relative error {err:.3g} > {bound:.3g}"
    assert bound < 1e-3  # the large-logit clause (qk_x30) stays a meaningful bound


def test_reference_gradients_at_highest_are_float32_accurate():
    q, k, v = pc.inputs("q_x1e5_k_x1e-5", seed=5, shape=(1, 12, 12, 2, 32))
    ct = np.random.default_rng(6).standard_normal(q.shape)

    def grads(dtype, **kw):
        with jax.default_device(CPU):
            args = [jnp.asarray(x, dtype) for x in (q, k, v)]
            f = lambda *a: natten_jax.na2d(*a, 5, backend="reference", **kw)  # noqa: E731
            _, vjp = jax.vjp(f, *args)
            return [np.asarray(g) for g in vjp(jnp.asarray(ct, dtype))]

    for name, g, g64 in zip(("dq", "dk", "dv"), grads(jnp.float32, precision="highest"),
                            grads(jnp.float64)):
        assert pc.relative_error(g, g64) <= pc.HIGHEST_REL, name


def test_fp16_logits_beyond_fp16_range_are_finite_and_correct_on_the_reference():
    """float16 q and k of ~200: logits up to ~1e5, beyond float16's 65504. The logits are
    float32 inside, so the output is finite and right (up to its float16 rounding and float32's
    rounding of the large logits), at either precision (which changes nothing on float16)."""
    rng = np.random.default_rng(16)
    shape = (1, 12, 12, 2, 64)
    q, k = (np.asarray(200 * rng.standard_normal(shape), np.float16) for _ in range(2))
    v = np.asarray(rng.standard_normal(shape), np.float16)
    assert pc.max_logit(q, k, 5) > 2 * float(np.finfo(np.float16).max)
    with jax.default_device(CPU):
        out64 = np.asarray(natten_jax.na2d(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)), 5,
                                           backend="reference"))
        outs = [np.asarray(natten_jax.na2d(*(jnp.asarray(x) for x in (q, k, v)), 5,
                                           backend="reference", precision=pr))
                for pr in ("default", "highest")]
    np.testing.assert_array_equal(outs[0], outs[1])
    bound = 2.0 ** -10 + 2.0 * 2.0 ** -24 * pc.max_logit(q, k, 5)
    assert outs[0].dtype == np.float16 and np.all(np.isfinite(outs[0]))
    assert pc.relative_error(outs[0], out64) <= bound


def test_16bit_and_float64_ignore_precision():
    q, k, v = pc.inputs("normal", seed=3, shape=(1, 10, 10, 2, 32))
    for dtype in (jnp.bfloat16, jnp.float64):
        a = _na_cpu(q, k, v, dtype, precision="default")
        b = _na_cpu(q, k, v, dtype, precision="highest")
        np.testing.assert_array_equal(a[0], b[0])


# ---------------------------------------------------------------------------------------------
# The static problem and jit


def test_precision_is_static_and_reaches_the_products():
    """Under jit another precision is another trace (with explicit values, and with None under
    jax.default_matmul_precision), and the lowered program's dots carry it."""
    traces = []

    def f(q, precision=None):
        traces.append(precision)
        return natten_jax.na1d(q, q, q, 3, backend="reference", precision=precision)

    jf = jax.jit(f, static_argnames="precision")
    q = jnp.ones((1, 8, 2, 32), jnp.float32)
    with jax.default_device(CPU):
        for pr in ("default", "highest", "default", "highest", "high"):
            jf(q, precision=pr)
        assert traces == ["default", "highest", "high"]
        text = {pr: jf.lower(q, precision=pr).as_text() for pr in ("default", "highest")}
        assert "HIGHEST" in text["highest"] and "HIGHEST" not in text["default"]
        traces.clear()
        jf(q)
        with jax.default_matmul_precision("highest"):
            jf(q)
            assert "HIGHEST" in jf.lower(q).as_text()
        assert len(traces) == 2
    p = check_na_call(1, q, q, q, 3, 1, 1, False, None, precision="highest")
    assert p != dataclasses.replace(p, precision="default") and p.precision == "highest"
    assert hash(p) != hash(dataclasses.replace(p, precision="default"))


# ---------------------------------------------------------------------------------------------
# The unfused operators


@pytest.mark.parametrize("case", ["x1e5", "x1e-6"])
def test_unfused_operators_take_precision(case):
    q, k, v = pc.inputs(case, seed=7, shape=(1, 9, 11, 2, 32))
    with jax.default_device(CPU):
        q64, k64, v64 = (jnp.asarray(x, jnp.float64) for x in (q, k, v))
        logits64 = unfused.na2d_qk(q64, k64, 3, backend="reference")
        logits = unfused.na2d_qk(jnp.asarray(q), jnp.asarray(k), 3, backend="reference",
                                 precision="highest")
        assert logits.dtype == jnp.float32
        assert pc.relative_error(logits, logits64) <= pc.HIGHEST_REL
        attn = jax.nn.softmax(logits64 * 32 ** -0.5, axis=-1)
        out64 = unfused.na2d_av(attn, v64, 3, backend="reference")
        out = unfused.na2d_av(attn.astype(jnp.float32), jnp.asarray(v), 3, backend="reference",
                              precision=jax.lax.Precision.HIGHEST)
        assert pc.relative_error(out, out64) <= pc.HIGHEST_REL
        text = jax.jit(lambda q, k: unfused.na2d_qk(q, k, 3, backend="reference",
                                                    precision="highest")).lower(q, k).as_text()
        assert "HIGHEST" in text


# ---------------------------------------------------------------------------------------------
# Flax layers and the model


@pytest.fixture
def na2d_calls(monkeypatch):
    """The keyword arguments of every natten_jax.na2d call."""
    calls = []
    real = natten_jax.na2d

    def spy(q, k, v, *args, **kwargs):
        calls.append(kwargs)
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(natten_jax, "na2d", spy)
    return calls


def test_flax_layers_take_precision(na2d_calls):
    from flax import nnx

    from natten_jax import linen as na_linen
    from natten_jax import nnx as na_nnx

    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6, 7, 16)), jnp.float32)
    with jax.default_device(CPU):
        layer = na_nnx.NeighborhoodAttention2D(16, 2, 3, precision="highest", backend="reference",
                                               rngs=nnx.Rngs(0))
        assert layer.qkv.precision == "highest" and layer.proj.precision == "highest"
        y = layer(x)
        text = nnx.jit(lambda m, x: m(x)).lower(layer, x).as_text()
        assert "HIGHEST" in text
        lin = na_linen.NeighborhoodAttention2D(16, 2, 3, precision=jax.lax.Precision.HIGHEST,
                                               backend="reference")
        params = lin.init(jax.random.key(0), x)
        y2 = lin.apply(params, x)
        assert y.shape == y2.shape == x.shape
    assert [c["precision"] for c in na2d_calls] == ["highest", "highest", jax.lax.Precision.HIGHEST,
                                                    jax.lax.Precision.HIGHEST]
    with pytest.raises(ValueError, match="`precision`"):
        na_nnx.NeighborhoodAttention2D(16, 2, 3, precision="fast", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`precision`"):
        na_linen.NeighborhoodAttention2D(16, 2, 3, precision="fast")


def test_nat_model_takes_precision(na2d_calls):
    from flax import nnx

    from natten_jax.models import NAT

    with jax.default_device(CPU):
        model = NAT(16, 2.0, (1, 1), (2, 4), kernel_size=3, num_classes=3, rpb=False,
                    backend="reference", precision="highest", rngs=nnx.Rngs(0))
        model.eval()
        out = model(jnp.ones((1, 24, 24, 3), jnp.float32))
    assert out.shape == (1, 3) and np.all(np.isfinite(np.asarray(out)))
    assert [c["precision"] for c in na2d_calls] == ["highest", "highest"]
    assert model.head.precision == "highest" and model.patch_embed.proj[0].precision == "highest"


# ---------------------------------------------------------------------------------------------
# The fused backend, Python side (its custom calls stood in for)


def _problem(dtype, head_dim=64, precision="default", config=None, **kw):
    q = jax.ShapeDtypeStruct((1, 16, 16, 2, head_dim), jnp.dtype(dtype))
    p = check_na_call(2, q, q, q, 5, 1, 1, False, None, backend_config=config,
                      precision=precision)
    return dataclasses.replace(p, platform="cuda", **kw)


def test_float32_runs_sm80_with_64_token_q_tiles(monkeypatch):
    monkeypatch.setattr(autotune, "sm90_runs", lambda: True)
    auto = natten_jax.FusedConfig()
    sm90 = natten_jax.FusedConfig(forward_impl="sm90", backward_impl="sm90")
    for cfg in (auto, sm90):
        assert autotune.impl_candidates(128, cfg, "float32") == ("sm80",)
        assert autotune.bwd_impl(128, cfg, "float32") == "sm80"
        assert autotune.impl_candidates(128, cfg, "bfloat16")[-1] == "sm90"
        assert autotune.bwd_impl(128, cfg, "bfloat16") == "sm90"
    assert tiles.q_tile_sizes(None, "float32") == (6,) and tiles.q_tile_sizes(64, "float32") == (6,)
    assert tiles.q_tile_sizes(None, "float16") == (6, 7)
    with pytest.raises(ValueError, match="q_tile"):
        tiles.q_tile_sizes(128, "float32")
    # the 1-D case the cost model gives 128-token tiles at 16 bits (tests/test_tiles.py)
    args = ((32768,), (2047,), (1,), (1,), (False,), 128)
    assert sum(tiles.choose_tiles(*args)[0]) == 7
    assert sum(tiles.choose_tiles(*args, dtype="float32")[0]) == 6
    p = _problem("float32", 128, config=auto)
    assert autotune.select_config(p)[0] == "sm80"
    assert all(sum(qt) == 6 for qt, _ in autotune.candidates(p))
    key32 = autotune.problem_key(p, device="X")
    assert "precision=default" in key32
    assert autotune.problem_key(dataclasses.replace(p, precision="highest"),
                                device="X") != key32
    p16 = _problem("float16", 128)
    assert autotune.problem_key(p16, device="X") == autotune.problem_key(
        dataclasses.replace(p16, precision="highest"), device="X")
    shape = ((32768,), (2047,), (1,), (1,), (False,), 1, 1, 128)
    assert fused.visited_flops(*shape, auto, dtype="float32") == tiles.visited_flops(
        *shape, impl="sm80", q_tile=64) != fused.visited_flops(*shape, auto)


def test_can_run_float32_rules(monkeypatch):
    monkeypatch.setattr(_ffi, "cuda_kernels_available", lambda: True)
    monkeypatch.setattr(autotune, "sm90_runs", lambda: False)
    cc = {"value": (8, 0)}
    monkeypatch.setattr(autotune, "compute_capability", lambda: cc["value"])
    for d in (32, 64):
        assert fused.can_run(_problem("float32", d)) == (True, "")
    ok, why = fused.can_run(_problem("float32", 128))
    assert not ok and "head_dim 128" in why and "8.0" in why
    assert fused.can_run(_problem("float16", 128)) == (True, "")
    cc["value"] = (9, 0)
    assert fused.can_run(_problem("float32", 128)) == (True, "")
    cc["value"] = None
    assert not fused.can_run(_problem("float32", 128))[0]
    cc["value"] = (9, 0)
    q128 = natten_jax.FusedConfig(q_tile=128)
    ok, why = fused.can_run(_problem("float32", 64, config=q128))
    assert not ok and "q_tile=128" in why
    assert fused.can_run(_problem("float32", 64, config=natten_jax.FusedConfig(q_tile=64)))[0]
    assert fused.can_run(_problem("bfloat16", 64, config=q128))[0]


@pytest.fixture
def standin(monkeypatch):
    """The fused custom calls stood in for on the CPU: records (target, operand dtypes, attrs,
    the operands' values) and answers with the float64 reference (forward) or zeros
    (backward)."""
    calls = []

    def custom_call(target, out_types, attrs):
        def call(*xs):
            def host(*a):
                a = [np.asarray(x) for x in a]
                calls.append(dict(target=target, dtypes=[x.dtype.name for x in a],
                                  attrs=dict(attrs), values=a))
                if target == fused.TARGET:
                    q, k, v = (jnp.asarray(x, jnp.float64) for x in a[:3])
                    rank = q.ndim - 3
                    kw = dict(kernel_size=tuple(int(x) for x in attrs["kernel_size"]),
                              scale=float(attrs["scale"]), backend="reference",
                              return_lse=True)
                    with jax.default_device(CPU):
                        out, lse = getattr(natten_jax, f"na{rank}d")(q, k, v, **kw)
                    return np.asarray(out, a[0].dtype), np.asarray(lse, np.float32)
                return tuple(np.zeros(t.shape, t.dtype) for t in out_types(*a))
            return jax.pure_callback(host, out_types(*xs), *xs)
        return call

    monkeypatch.setattr(_ffi, "custom_call", custom_call)
    monkeypatch.setattr(fused, "can_run", lambda p: (True, ""))
    return calls


@pytest.mark.parametrize("precision,code", [("default", 0), ("highest", 1), ("high", 1)])
def test_float32_reaches_the_fused_calls_as_float32(standin, precision, code):
    """No 16-bit rounding on the way in or out, the precision attribute on both calls, and the
    cotangent passed as it is (no rescaling): tiny and huge values survive."""
    q, k, v = pc.inputs("x1e5", seed=1, shape=(1, 8, 9, 2, 32))
    q = q * np.float32(1e-12)  # 1e-7: below float16's smallest normal
    f = lambda q, k, v: natten_jax.na2d(q, k, v, 3, backend="fused",  # noqa: E731
                                        precision=precision)
    out, vjp = jax.vjp(jax.jit(f), *(jnp.asarray(x) for x in (q, k, v)))
    ct = np.asarray(1e-30 * np.random.default_rng(2).standard_normal(q.shape), np.float32)
    vjp(jnp.asarray(ct))
    fwd = [c for c in standin if c["target"] == fused.TARGET]
    bwd = [c for c in standin if c["target"] == fused.TARGET_BACKWARD]
    assert fwd and bwd
    for c in fwd + bwd:
        assert c["attrs"]["precision"] == code and c["dtypes"][:4 if c in bwd else 3] == \
            ["float32"] * (4 if c in bwd else 3)
    for got, want in zip(fwd[-1]["values"], (q, k, v)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(bwd[-1]["values"][3], ct)
    assert out.dtype == jnp.float32


def test_16bit_fused_calls_get_precision_zero(standin):
    q = jnp.ones((1, 8, 9, 2, 32), jnp.bfloat16)
    natten_jax.na2d(q, q, q, 3, backend="fused", precision="highest")
    assert [c["attrs"]["precision"] for c in standin] == [0]
