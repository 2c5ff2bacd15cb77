"""CPU tests of the unfused CUDA backends' Python side: backend names and selection, error
messages, and the custom calls' operands, results and attributes as lowered (no GPU needed)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natten_jax
from natten_jax import _ffi, unfused
from natten_jax.backends import unfused_cuda
from natten_jax.checks import UNFUSED_BACKENDS, check_na_call, unfused_attention_unsupported

NO_KERNELS = not _ffi.cuda_kernels_available()


def _x(shape, dtype=jnp.float32):
    return jnp.ones(shape, dtype)


def test_backend_names():
    assert UNFUSED_BACKENDS == ("reference", "gemm", "naive")
    q = _x((1, 8, 2, 4))
    with pytest.raises(ValueError, match="backend"):
        unfused.na1d_qk(q, q, 3, backend="fused")
    with pytest.raises(ValueError, match="backend"):
        unfused.na1d_av(_x((1, 8, 2, 3)), q, 3, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        natten_jax.na1d(q, q, q, 3, backend="unfused")


def test_default_backend_is_reference_without_kernels():
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 9, 2, 4))
    a = unfused.na1d_qk(q, q, 3)
    b = unfused.na1d_qk(q, q, 3, backend="reference")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    attn = jax.nn.softmax(a, axis=-1)
    np.testing.assert_array_equal(np.asarray(unfused.na1d_av(attn, q, 3)),
                                  np.asarray(unfused.na1d_av(attn, q, 3, backend="reference")))


@pytest.fixture
def kernels_faked(monkeypatch):
    """Pretend the compiled kernels and their targets are here (nothing is launched)."""
    monkeypatch.setattr(_ffi, "cuda_kernels_available", lambda: True)
    targets = {t: None for t in (unfused_cuda.TARGET_PN, unfused_cuda.TARGET_NN,
                                 unfused_cuda.TARGET_IN, unfused_cuda.TARGET_RPB_GRAD)}
    monkeypatch.setattr(_ffi, "registrations", lambda: targets)
    # Nothing to register with XLA: the fake targets have no handlers (on a GPU host jax would
    # reject them; lowering alone needs no registration).
    monkeypatch.setattr(_ffi, "register", lambda: True)


def test_cpu_placement_picks_reference(kernels_faked, monkeypatch):
    """With the kernels available, a call placed on the CPU (committed CPU arrays, or the
    default device under jit) runs the reference for backend=None and raises for "gemm"."""
    cpu = jax.devices("cpu")[0]
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 9, 2, 4), jnp.float32)
    want = unfused.na1d_qk(x, x, 3, backend="reference")
    with jax.default_device(cpu):  # the default device decides under jit
        got = jax.jit(lambda q: unfused.na1d_qk(q, q, 3))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # Committed CPU arrays stay on the CPU whatever the default device is.
    monkeypatch.setattr(_ffi, "default_platform", lambda: "cuda")
    q = jax.device_put(x, cpu)
    np.testing.assert_array_equal(np.asarray(unfused.na1d_qk(q, q, 3)), np.asarray(want))
    a = jax.nn.softmax(want, axis=-1)
    np.testing.assert_array_equal(np.asarray(unfused.na1d_av(jax.device_put(a, cpu), q, 3)),
                                  np.asarray(unfused.na1d_av(a, x, 3, backend="reference")))
    with pytest.raises(NotImplementedError, match="'cpu', not on a CUDA GPU"):
        unfused.na1d_qk(q, q, 3, backend="gemm")
    with pytest.raises(NotImplementedError, match="'cpu', not on a CUDA GPU"):
        natten_jax.na1d(q, q, q, 3, backend="naive")


def test_can_run_limits(kernels_faked):
    """The handlers' limits are refused before launch: int32 extents per batch entry, batch,
    and the RPB gradient's heads on gridDim.y."""
    ok = dict(batch=2, tokens=1024, heads=8, dim=64, window=49)
    assert unfused_cuda.can_run(jnp.float16, "cuda", **ok) == (True, "")
    assert not unfused_cuda.can_run(jnp.float16, "cpu", **ok)[0]
    assert "float64" in unfused_cuda.can_run(jnp.float64, "cuda", **ok)[1]
    why = unfused_cuda.can_run(jnp.float16, "cuda", **dict(ok, tokens=2**24, dim=128))[1]
    assert "below 2^31" in why and "16777216" in why, why
    why = unfused_cuda.can_run(jnp.float16, "cuda", **dict(ok, tokens=2**20, window=2**11))[1]
    assert "2048" in why, why  # the window counts too (the logits' last axis)
    assert "batch" in unfused_cuda.can_run(jnp.float16, "cuda", **dict(ok, batch=2**31))[1]
    assert unfused_cuda.can_run(jnp.float16, "cuda", **dict(ok, heads=70000, tokens=4))[0]
    why = unfused_cuda.can_run(jnp.float16, "cuda", **dict(ok, heads=70000, tokens=4), rpb=True)[1]
    assert "65535" in why, why


def test_too_large_call_raises_before_launch(kernels_faked):
    """A call over the int32 limit raises NotImplementedError naming it, and backend=None runs
    the reference instead (traced and lowered only, the default device faked as a CUDA GPU)."""
    q = jax.ShapeDtypeStruct((1, 2**16, 2**9, 64), jnp.float16)  # 2^31 elements per entry
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_ffi, "default_platform", lambda: "cuda")
        with pytest.raises(NotImplementedError, match="2\\^31"):
            jax.eval_shape(lambda q: unfused.na1d_qk(q, q, 3, backend="gemm"), q)
        # backend=None falls back to the reference: no custom call...
        assert lowered_custom_calls(lambda q: unfused.na1d_qk(q, q, 3), q) == []
        assert jax.eval_shape(lambda q: unfused.na1d_qk(q, q, 3), q).shape == (1, 2**16, 2**9, 3)
        # ...where a call within the limits picks the GEMM kernels.
        small = jax.ShapeDtypeStruct((1, 64, 2, 64), jnp.float16)
        (c,) = lowered_custom_calls(lambda q: unfused.na1d_qk(q, q, 3), small)
        assert (c["target"], c["attrs"]["impl"]) == (unfused_cuda.TARGET_PN,
                                                     unfused_cuda.IMPLS["gemm"])


@pytest.mark.skipif(not NO_KERNELS, reason="the CUDA kernels are available here")
@pytest.mark.parametrize("backend", ["gemm", "naive"])
def test_explicit_cuda_backend_without_kernels_raises(backend):
    q = _x((1, 8, 2, 4))
    with pytest.raises(NotImplementedError, match=f"na1d_qk: backend='{backend}'"):
        unfused.na1d_qk(q, q, 3, backend=backend)
    with pytest.raises(NotImplementedError, match="na2d_av"):
        unfused.na2d_av(_x((1, 5, 5, 2, 9)), _x((1, 5, 5, 2, 4)), 3, backend=backend)
    with pytest.raises(NotImplementedError, match=f"backend='{backend}' cannot run"):
        natten_jax.na1d(q, q, q, 3, backend=backend)
    # Argument errors come first, whatever the backend.
    with pytest.raises(ValueError, match="kernel_size"):
        unfused.na1d_qk(q, q, 9, backend=backend)


@pytest.mark.parametrize("backend", ["gemm", "naive"])
def test_na_stride_and_extra_tokens_rejected(backend):
    q = _x((1, 12, 2, 4))
    with pytest.raises(NotImplementedError, match="stride"):
        natten_jax.na1d(q, q, q, 3, stride=2, backend=backend)
    ek = _x((1, 3, 2, 4))
    with pytest.raises(NotImplementedError, match="additional_keys"):
        natten_jax.na1d(q, q, q, 3, additional_keys=ek, additional_values=ek, backend=backend)
    q64 = q.astype(jnp.float64)
    with pytest.raises(NotImplementedError, match="float64"):
        natten_jax.na1d(q64, q64, q64, 3, backend=backend)


def test_unfused_attention_unsupported_reasons():
    q = _x((1, 12, 2, 4))
    p = check_na_call(1, q, q, q, 3, 1, 1, False, None)
    assert unfused_attention_unsupported(p, "gemm") == ""
    p2 = check_na_call(1, q, q, q, 3, 3, 1, False, None)
    assert "stride" in unfused_attention_unsupported(p2, "naive")


# The custom calls as lowered (jax.jit(f).lower(...).as_text(): no kernels, no GPU needed), e.g.
#   stablehlo.custom_call @natten_jax_unfused_pn(%arg0, %arg1, %arg2) {backend_config = "",
#     mhlo.backend_config = {dilation = dense<1> : tensor<2xi64>, fill = 0xFF800000 : f32, ...},
#     ...} : (tensor<2x6x7x4x8xbf16>, ...) -> tensor<2x6x7x4x15xbf16>
_CUSTOM_CALL = re.compile(r"stablehlo\.custom_call @(?P<target>\w+)\([^)]*\) \{(?P<attrs>.*)\} : "
                          r"\((?P<operands>[^)]*)\) -> (?P<results>.*)$", re.M)
_TENSOR = re.compile(r"tensor<((?:\d+x)*)(\w+)>")
_ATTR = re.compile(r"(\w+) = (?:dense<([^>]*)> : tensor<(\d+)x\w+>|(\S+) : (\w+))")


def _tensor_types(text):
    """[(shape, element type)] of the MLIR tensor types in ``text``, e.g. ((2, 8), "bf16")."""
    return [(tuple(int(d) for d in dims.split("x")[:-1]), dt) for dims, dt in _TENSOR.findall(text)]


def _attr_value(dense, n, scalar, type_):
    if dense:  # a splat "dense<1>" or "dense<[3, 5]>" of n int64
        vals = [int(x) for x in dense.strip("[]").split(",")]
        return tuple(vals * int(n) if len(vals) == 1 else vals)
    if type_ == "f32":  # "5.000000e-01", or the bits of a non-finite value: "0xFF800000"
        return float(np.uint32(int(scalar, 16)).view(np.float32)) if scalar.startswith("0x") \
            else float(scalar)
    return int(scalar)


def lowered_custom_calls(f, *args):
    """The custom calls of ``jax.jit(f).lower(*args)``: a list of dicts with the ``target``, the
    ``operands`` and ``results`` as (shape, element type) and the FFI attributes ``attrs``."""
    calls = []
    for m in _CUSTOM_CALL.finditer(jax.jit(f).lower(*args).as_text()):
        config = re.search(r"mhlo\.backend_config = \{([^{}]*)\}", m["attrs"])
        attrs = {a[0]: _attr_value(*a[1:]) for a in _ATTR.findall(config[1] if config else "")}
        calls.append(dict(target=m["target"], operands=_tensor_types(m["operands"]),
                          results=_tensor_types(m["results"]), attrs=attrs))
    return calls


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_custom_call_operands_and_attributes(rank):
    """Each operator lowers to one custom call of its target, with the operands, the result
    type and the attributes (window, impl, scale, fill, rpb flag) the handler reads."""
    S = {1: (10,), 2: (6, 7), 3: (4, 5, 6)}[rank]
    ks = {1: (3,), 2: (3, 5), 3: (3, 3, 5)}[rank]
    di = {1: (3,), 2: (2, 1), 3: (1, 1, 1)}[rank]
    ca = {1: (True,), 2: (False, True), 3: (True, False, True)}[rank]
    no_ca = (False,) * rank  # relative positional bias is defined for non-causal windows only
    W, R = int(np.prod(ks)), tuple(2 * k - 1 for k in ks)
    q = jax.ShapeDtypeStruct((2,) + S + (4, 8), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2,) + S + (2, 8), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((2,) + S + (2, 6), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((2,) + S + (4, W), jnp.bfloat16)
    rpb = jax.ShapeDtypeStruct((4,) + R, jnp.float32)
    bf16 = lambda x: (tuple(x.shape), "bf16")  # noqa: E731
    poison = int(unfused_cuda.POISON_OUTPUTS)
    causal = tuple(int(c) for c in ca)

    def window(is_causal):
        return dict(kernel_size=ks, dilation=di, is_causal=is_causal)

    for impl, code in (("gemm", 1), ("naive", 0)):
        (c,) = lowered_custom_calls(
            lambda q, k, b: unfused_cuda.pn(q, k, ks, di, no_ca, b, scale=0.5, impl=impl),
            q, k, rpb)
        assert c == dict(target=unfused_cuda.TARGET_PN,
                         operands=[bf16(q), bf16(k), ((4,) + R, "f32")],
                         results=[((2,) + S + (4, W), "bf16")],
                         attrs=dict(window((0,) * rank), impl=code, has_rpb=1, scale=0.5,
                                    fill=-np.inf, poison=poison))
        (c,) = lowered_custom_calls(
            lambda q, k: unfused_cuda.pn(q, k, ks, di, ca, fill=0.0, impl=impl), q, k)
        assert c["operands"][2] == ((1,), "f32")  # the placeholder of the absent bias
        assert c["attrs"] == dict(window(causal), impl=code, has_rpb=0, scale=1.0, fill=0.0,
                                  poison=poison)
        (c,) = lowered_custom_calls(
            lambda w, v: unfused_cuda.nn(w, v, ks, di, ca, scale=0.25, impl=impl), w, v)
        assert c == dict(target=unfused_cuda.TARGET_NN, operands=[bf16(w), bf16(v)],
                         results=[((2,) + S + (4, 6), "bf16")],
                         attrs=dict(window(causal), impl=code, scale=0.25, poison=poison))
        (c,) = lowered_custom_calls(
            lambda w, q: unfused_cuda.inverse(w, q, 2, ks, di, ca, scale=2.0, impl=impl), w, q)
        assert c == dict(target=unfused_cuda.TARGET_IN, operands=[bf16(w), bf16(q)],
                         results=[((2,) + S + (2, 8), "bf16")],
                         attrs=dict(window(causal), impl=code, scale=2.0, poison=poison))
    # The RPB gradient: per-chunk partial sums of RPB_CHUNK_TOKENS query tokens, added up here.
    chunks = -(-int(np.prod(S)) // unfused_cuda.RPB_CHUNK_TOKENS)
    grad = lambda w: unfused_cuda.rpb_grad(w, ks, di, no_ca)  # noqa: E731
    (c,) = lowered_custom_calls(grad, w)
    assert c == dict(target=unfused_cuda.TARGET_RPB_GRAD, operands=[bf16(w)],
                     results=[((chunks, 4, int(np.prod(R))), "f32")],
                     attrs=dict(window((0,) * rank), poison=poison))
    assert jax.eval_shape(grad, w) == jax.ShapeDtypeStruct((4,) + R, jnp.float32)
    # vmap folds the mapped axis into the batch of one call...
    qb = jax.ShapeDtypeStruct((3,) + q.shape, q.dtype)
    pn = jax.vmap(lambda q: unfused_cuda.pn(q, jnp.zeros(k.shape, k.dtype), ks, di, ca))
    (c,) = lowered_custom_calls(pn, qb)
    assert c["operands"][:2] == [((6,) + S + (4, 8), "bf16"), ((6,) + S + (2, 8), "bf16")]
    assert c["results"] == [((6,) + S + (4, W), "bf16")]
    assert jax.eval_shape(pn, qb).shape == (3, 2) + S + (4, W)
    # ...except the RPB gradient's (no batch axis in its result): one call per mapped entry.
    wb = jax.ShapeDtypeStruct((3,) + w.shape, w.dtype)
    (c,) = lowered_custom_calls(jax.vmap(grad), wb)
    assert c["operands"] == [bf16(w)]
    assert jax.eval_shape(jax.vmap(grad), wb).shape == (3, 4) + R


def test_unknown_impl():
    with pytest.raises(ValueError, match="impl"):
        unfused_cuda.nn(_x((1, 8, 2, 3)), _x((1, 8, 2, 4)), (3,), (1,), (False,), impl="fast")


def test_can_run_reasons():
    ok, why = unfused_cuda.can_run(jnp.float32)
    if NO_KERNELS:
        assert not ok and why == _ffi.unavailable_reason()
    else:
        assert ok and why == ""
        assert "float64" in unfused_cuda.can_run(jnp.float64)[1]
