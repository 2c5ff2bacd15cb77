"""CPU tests of the unfused CUDA backends' Python side: backend names and selection, error
messages, and the shapes / dtypes of the custom calls under jax.eval_shape (no GPU needed)."""

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


def test_on_gpu_false_for_cpu_arrays():
    if jax.default_backend() == "gpu":
        pytest.skip("JAX's default backend is a GPU")
    assert not unfused._on_gpu(jnp.ones(3))
    assert jax.jit(lambda x: jnp.float32(unfused._on_gpu(x)))(jnp.ones(3)) == 0


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


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_custom_call_shapes(rank):
    S = {1: (10,), 2: (6, 7), 3: (4, 5, 6)}[rank]
    ks = {1: (3,), 2: (3, 5), 3: (3, 3, 5)}[rank]
    di, ca = (1,) * rank, (False,) * rank
    W, R = int(np.prod(ks)), tuple(2 * k - 1 for k in ks)
    q = jax.ShapeDtypeStruct((2,) + S + (4, 8), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2,) + S + (2, 8), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((2,) + S + (2, 6), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((2,) + S + (4, W), jnp.bfloat16)
    rpb = jax.ShapeDtypeStruct((4,) + R, jnp.float32)
    for impl in ("gemm", "naive"):
        o = jax.eval_shape(lambda q, k, b: unfused_cuda.pn(q, k, ks, di, ca, b, impl=impl), q, k,
                           rpb)
        assert (o.shape, o.dtype) == ((2,) + S + (4, W), jnp.bfloat16)
        o = jax.eval_shape(lambda w, v: unfused_cuda.nn(w, v, ks, di, ca, impl=impl), w, v)
        assert (o.shape, o.dtype) == ((2,) + S + (4, 6), jnp.bfloat16)
        o = jax.eval_shape(lambda w, q: unfused_cuda.inverse(w, q, 2, ks, di, ca, impl=impl),
                           w, q)
        assert (o.shape, o.dtype) == ((2,) + S + (2, 8), jnp.bfloat16)
    o = jax.eval_shape(lambda w: unfused_cuda.rpb_grad(w, ks, di, ca), w)
    assert (o.shape, o.dtype) == ((4,) + R, jnp.float32)
    # vmap folds the mapped axis into the batch.
    qb = jax.ShapeDtypeStruct((3,) + q.shape, q.dtype)
    o = jax.eval_shape(jax.vmap(lambda q: unfused_cuda.pn(q, jnp.zeros(k.shape, k.dtype), ks,
                                                          di, ca)), qb)
    assert o.shape == (3, 2) + S + (4, W)
    wb = jax.ShapeDtypeStruct((3,) + w.shape, w.dtype)
    o = jax.eval_shape(jax.vmap(lambda w: unfused_cuda.rpb_grad(w, ks, di, ca)), wb)
    assert o.shape == (3, 4) + R


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
