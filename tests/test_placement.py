"""Where a call runs, and the CUDA backends' ``can_run`` refusing what their kernels cannot run.

CPU tests: the compiled kernels are faked available (``_ffi.cuda_kernels_available``) and, where
a test needs the default device to be a GPU, ``jax.devices`` returns a fake CUDA device; nothing
is launched. A call that wrongly picked the fused backend would fail to lower on the CPU, so the
tests that run a call also show which backend ran.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natten_jax
from natten_jax import _ffi, autotune, backends
from natten_jax.backends import fused, reference
from natten_jax.checks import check_na_call

CPU = jax.devices("cpu")[0]


class _Client:
    def __init__(self, version):
        self.platform_version = version


class FakeGpu:
    """Looks like a JAX GPU device to placement code (never used to run anything)."""

    platform = "gpu"
    id = 0
    device_kind = "Fake GPU"
    compute_capability = "8.0"

    def __init__(self, version="cuda 12.4"):
        self.client = _Client(version)


@pytest.fixture
def kernels_faked(monkeypatch):
    monkeypatch.setattr(_ffi, "cuda_kernels_available", lambda: True)


@pytest.fixture
def gpu_default(monkeypatch):
    """JAX's default backend looks like a CUDA GPU (jax.devices("cpu") stays real)."""
    gpu = FakeGpu()
    monkeypatch.setattr(jax, "devices", lambda backend=None: [CPU] if backend == "cpu" else [gpu])
    return gpu


def _qkv(dtype=jnp.float16, D=32, shape=(2, 16, 4)):
    x = jax.random.normal(jax.random.PRNGKey(0), shape[:-1] + (shape[-1], D), jnp.float32)
    return x.astype(dtype), (x * 0.5).astype(dtype), (x * 2).astype(dtype)


def _problem(q, k=None, v=None, **kw):
    k = q if k is None else k
    v = q if v is None else v
    args = dict(kernel_size=3, stride=1, dilation=1, is_causal=False, scale=None)
    args.update(kw)
    return check_na_call(q.ndim - 3, q, k, v, args.pop("kernel_size"), args.pop("stride"),
                         args.pop("dilation"), args.pop("is_causal"), args.pop("scale"),
                         **args)


# --------------------------------------------------------------------------------------------
# Placement.


def test_device_platform():
    assert _ffi.device_platform(FakeGpu("cuda 12.4")) == "cuda"
    assert _ffi.device_platform(FakeGpu("rocm 6.0")) == "rocm"
    assert _ffi.device_platform(CPU) == "cpu"


def test_default_platform_follows_default_device(gpu_default):
    """No context: the default backend's first device; a jax.default_device context (a device
    or a platform name) wins."""
    assert _ffi.default_platform() == "cuda"
    with jax.default_device(CPU):
        assert _ffi.default_platform() == "cpu"
    with jax.default_device("cpu"):
        assert _ffi.default_platform() == "cpu"


def test_call_platform(gpu_default):
    """Committed arrays name their devices; uncommitted arrays, NumPy arrays and tracers follow
    the default device."""
    x = jnp.ones(3)
    assert not x.committed
    assert _ffi.call_platform(x) == "cuda"
    assert _ffi.call_platform(np.ones(3)) == "cuda"
    c = jax.device_put(np.ones(3), CPU)
    assert _ffi.call_platform(c) == "cpu"
    assert _ffi.call_platform(x, c, None) == "cpu"
    seen = []
    jax.jit(lambda a: seen.append(_ffi.call_platform(a)) or a)(c)
    assert seen == ["cuda"]  # under jit: the default device decides
    with jax.default_device(CPU):
        jax.jit(lambda a: seen.append(_ffi.call_platform(a)) or a)(c + 1)
    assert seen[-1] == "cpu"


def test_problem_records_platform(gpu_default):
    q = jax.device_put(_qkv()[0], CPU)
    assert _problem(q).platform == "cpu"
    assert _problem(jnp.asarray(np.asarray(q))).platform == "cuda"  # uncommitted
    shapes = jax.ShapeDtypeStruct(q.shape, q.dtype)
    assert _problem(shapes).platform == "cuda"


# --------------------------------------------------------------------------------------------
# Backend choice under placement (the kernels faked available).


def test_default_device_cpu_picks_reference(kernels_faked, gpu_default):
    """On a (fake) GPU host, a call under jax.default_device(cpu) runs the reference for
    backend=None, and backend="fused" says why it cannot run."""
    q, k, v = _qkv()
    with jax.default_device(CPU):  # the same computation on the same device as `got` below
        want = natten_jax.na1d(q, k, v, 3, backend="reference")
    traced = jax.ShapeDtypeStruct(q.shape, q.dtype)
    p_gpu = _problem(traced)
    assert fused.can_run(p_gpu) == (True, "")
    assert backends.select(p_gpu, None) is fused.run
    with jax.default_device(CPU):
        p = _problem(traced)
        assert p.platform == "cpu"
        assert backends.select(p, None) is reference.run
        got = jax.jit(lambda q, k, v: natten_jax.na1d(q, k, v, 3))(q, k, v)
        with pytest.raises(NotImplementedError, match="'cpu', not on a CUDA GPU"):
            jax.jit(lambda q, k, v: natten_jax.na1d(q, k, v, 3, backend="fused"))(q, k, v)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_committed_cpu_arrays_pick_reference(kernels_faked, gpu_default):
    q, k, v = (jax.device_put(x, CPU) for x in _qkv())
    want = natten_jax.na1d(q, k, v, 3, backend="reference")
    np.testing.assert_array_equal(np.asarray(natten_jax.na1d(q, k, v, 3)), np.asarray(want))
    with pytest.raises(NotImplementedError, match="backend='fused'.*'cpu'"):
        natten_jax.na1d(q, k, v, 3, backend="fused")


# --------------------------------------------------------------------------------------------
# What the fused handlers (src/cuda/ffi/fna.cc) would refuse, refused by can_run first.


def _on_cuda(p, **changes):
    return dataclasses.replace(p, platform="cuda", **changes)


@pytest.mark.parametrize("changes,match", [
    (dict(dtype="float64"), "dtype float64"),
    (dict(head_dim=160, head_dim_v=160), "head_dim 160.*up to 128"),
    (dict(head_dim_v=136), "value head_dim 136"),
    (dict(scale=-0.5), "scale"),
    (dict(scale=0.0), "scale"),
    (dict(scale=1e-50), "scale"),   # 0 in float32: the kernel's scale > 0 check
    (dict(scale=1e39), "scale"),    # inf in float32
    (dict(batch=65536), "batch must be <= 65535, got 65536"),
    (dict(heads=8192, heads_kv=8192, dilation=(9,)), "heads x dilation groups.*8192 x 9"),
    (dict(spatial=(2**31,)), "2\\^31"),
    (dict(platform="rocm"), "'rocm', not on a CUDA GPU"),
])
def test_fused_can_run_refuses(kernels_faked, changes, match):
    p = _on_cuda(_problem(jax.ShapeDtypeStruct((2, 16, 4, 32), jnp.float16)))
    assert fused.can_run(p) == (True, "")
    ok, why = fused.can_run(dataclasses.replace(p, **changes))
    assert not ok
    assert re.search(match, why), why


def test_fused_can_run_limits_are_inclusive(kernels_faked):
    p = _on_cuda(_problem(jax.ShapeDtypeStruct((2, 16, 4, 32), jnp.float16)))
    assert fused.can_run(dataclasses.replace(p, batch=65535))[0]
    assert fused.can_run(dataclasses.replace(p, heads=65535 // 5, heads_kv=1, dilation=(5,)))[0]


@pytest.mark.parametrize("field", ["forward_impl", "backward_impl"])
def test_fused_can_run_refuses_sm90_where_it_cannot_run(kernels_faked, monkeypatch, field):
    monkeypatch.setattr(autotune, "sm90_runs", lambda: False)
    p = _on_cuda(_problem(jax.ShapeDtypeStruct((2, 16, 4, 64), jnp.bfloat16)))
    cfg = natten_jax.FusedConfig(**{field: "sm90"})
    ok, why = fused.can_run(dataclasses.replace(p, config=cfg))
    assert not ok and f"{field}='sm90'" in why and "9.0" in why, why
    # "auto" never picks it here; sm90 lacks head dim 32, which then runs sm80.
    assert fused.can_run(dataclasses.replace(p, config=natten_jax.FusedConfig()))[0]
    p32 = _on_cuda(_problem(jax.ShapeDtypeStruct((2, 16, 4, 32), jnp.bfloat16)))
    assert fused.can_run(dataclasses.replace(p32, config=cfg))[0]
    if field == "backward_impl":  # no backward kernel: the reference VJP
        cfg_ref = natten_jax.FusedConfig(backward_impl="sm90", backward="reference")
        assert fused.can_run(dataclasses.replace(p, config=cfg_ref))[0]
    monkeypatch.setattr(autotune, "sm90_runs", lambda: True)
    assert fused.can_run(dataclasses.replace(p, config=cfg))[0]


def test_fused_unavailable_reason_comes_first():
    if _ffi.cuda_kernels_available():
        pytest.skip("the CUDA kernels are available here")
    p = _on_cuda(_problem(jax.ShapeDtypeStruct((2, 16, 4, 32), jnp.float16)))
    assert fused.can_run(p) == (False, _ffi.unavailable_reason())
