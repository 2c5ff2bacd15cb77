"""``natten_jax._ffi.batched_call``: the one vmap / partitioning wrapper of every kernel call.

CPU tests: the custom call (``_ffi.custom_call``) is replaced by a pure-JAX stand-in that
records the operand shapes it is called with, so the folding of vmapped axes into the batch,
the chunking above ``max_batch`` and the per-entry fallback are observable (``custom_vmap``
also traces the unmapped call once, for the result types: batch 2 below). Multi-device
partitioning through the same wrapper is tested in tests/test_sharding.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from natten_jax import _ffi


def _math(a, b, bias):
    """Per batch entry: results [B, ...] from a, b [B, ...] and a bias without batch axis."""
    return a * b + bias, jnp.sum(a, axis=-1)


@pytest.fixture
def seen(monkeypatch):
    calls = []

    def standin(target, out_types, attrs):
        def call(*xs):
            calls.append((target, tuple(tuple(x.shape) for x in xs)))
            want = out_types(*xs)
            if target != "t":  # a kernel's target: results of the right types only
                return tuple(jnp.zeros(w.shape, w.dtype) for w in want)
            outs = _math(*xs) if len(xs) == 3 else _math(xs[0], xs[1], 0.0)
            assert [(o.shape, o.dtype) for o in outs] == [(w.shape, w.dtype) for w in want]
            return outs
        return call

    monkeypatch.setattr(_ffi, "custom_call", standin)
    return calls


def _types(a, *_):
    return (jax.ShapeDtypeStruct(a.shape, a.dtype), jax.ShapeDtypeStruct(a.shape[:-1], a.dtype))


def _data(*lead, B=2, C=3, seed=0):
    rng = np.random.default_rng(seed)
    r = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return r(*lead, B, 4, C), r(*lead, B, 4, C), r(C)


def _per_entry(a, b, bias):
    return jax.tree.map(np.asarray, _math(a, b, bias))


def test_plain_call(seen):
    a, b, bias = _data()
    got = _ffi.batched_call("t", _types, {}, n_batched=2)(a, b, bias)
    for x, y in zip(got, _per_entry(a, b, bias)):
        np.testing.assert_allclose(x, y, rtol=1e-6)
    assert seen == [("t", ((2, 4, 3), (2, 4, 3), (3,)))]


def test_vmap_folds_into_batch(seen):
    """One call on batch 5 x 2; an operand without batch axis stays unbatched; nested vmaps
    fold twice."""
    a, b, bias = _data(5)
    f = _ffi.batched_call("t", _types, {}, n_batched=2)
    got = jax.vmap(f, in_axes=(0, 0, None))(a, b, bias)
    want = [np.stack(z) for z in zip(*[_per_entry(a[i], b[i], bias) for i in range(5)])]
    for x, y in zip(got, want):
        np.testing.assert_allclose(x, y, rtol=1e-6)
    assert seen[-1] == ("t", ((10, 4, 3), (10, 4, 3), (3,))), seen
    assert {shapes[0][0] for _, shapes in seen} == {2, 10}, seen
    seen.clear()
    # mapped a, broadcast b (unmapped operands with a batch axis are broadcast, then folded)
    got = jax.vmap(f, in_axes=(0, None, None))(a, b[0], bias)
    np.testing.assert_allclose(got[0][3], _per_entry(a[3], b[0], bias)[0], rtol=1e-6)
    assert seen[-1] == ("t", ((10, 4, 3), (10, 4, 3), (3,))), seen
    seen.clear()
    a2, b2, _ = _data(3, 5)
    got = jax.vmap(jax.vmap(f, in_axes=(0, 0, None)), in_axes=(0, 0, None))(a2, b2, bias)
    np.testing.assert_allclose(got[1][2, 4], _per_entry(a2[2, 4], b2[2, 4], bias)[1], rtol=1e-6)
    assert seen[-1] == ("t", ((30, 4, 3), (30, 4, 3), (3,))), seen
    assert {shapes[0][0] for _, shapes in seen} == {2, 10, 30}, seen  # inner fold, then outer


def test_vmap_above_max_batch_runs_in_chunks(seen):
    """5 mapped entries of batch 2 with at most 4 batch entries a call: calls on 2 entries
    (batch 4) over lax.map, and the remainder (batch 2); the results are those of one call."""
    a, b, bias = _data(5)
    f = _ffi.batched_call("t", _types, {}, n_batched=2, max_batch=4)
    got = jax.vmap(f, in_axes=(0, 0, None))(a, b, bias)
    want = [np.stack(z) for z in zip(*[_per_entry(a[i], b[i], bias) for i in range(5)])]
    for x, y in zip(got, want):
        np.testing.assert_allclose(x, y, rtol=1e-6)
    assert {shapes[0][0] for _, shapes in seen} == {2, 4}, seen  # never 10
    # A batch above max_batch on its own: one entry per call.
    seen.clear()
    jax.vmap(_ffi.batched_call("t", _types, {}, n_batched=2, max_batch=3),
             in_axes=(0, 0, None))(a, b, bias)
    assert {shapes[0][0] for _, shapes in seen} == {2}, seen


def test_vmap_of_operand_without_batch_axis_calls_per_entry(seen):
    a, b, _ = _data(5)
    biases = jnp.arange(15.0, dtype=jnp.float32).reshape(5, 3)
    f = _ffi.batched_call("t", _types, {}, n_batched=2)
    got = jax.vmap(f, in_axes=(None, None, 0))(a[0], b[0], biases)
    for i in range(5):
        np.testing.assert_allclose(got[0][i], _per_entry(a[0], b[0], biases[i])[0], rtol=1e-6)
    assert set(seen) == {("t", ((2, 4, 3), (2, 4, 3), (3,)))}, seen  # inside lax.map


def test_single_result(seen):
    """out_types giving one array: the call returns one array, under vmap too."""
    a, b, _ = _data(4)
    one = lambda a, b: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731

    def standin(target, out_types, attrs):
        return lambda a, b: a * b

    with pytest.MonkeyPatch.context() as m:
        m.setattr(_ffi, "custom_call", standin)
        f = _ffi.batched_call("t", one, {})
        assert isinstance(f(a[0], b[0]), jax.Array)
        got = jax.vmap(f)(a, b)
    np.testing.assert_allclose(got, np.asarray(a * b), rtol=1e-6)


def test_fused_forward_vmap_stays_within_grid_limit(seen):
    """The fused backend's calls put the batch on gridDim.z (<= 65535): a vmapped forward over
    3 x 40000 batch entries runs calls of 40000, never one of 120000 (traced only)."""
    from natten_jax.backends import fused
    from natten_jax.checks import check_na_call

    x = jax.ShapeDtypeStruct((40000, 8, 1, 32), jnp.float16)
    p = check_na_call(1, x, x, x, 3, 1, 1, False, None)
    tiles = ((6,), (6,))
    xs = jax.ShapeDtypeStruct((3,) + x.shape, x.dtype)

    def fwd(q, k, v):
        return fused._forward_call(p, q, k, v, tiles=tiles, impl="sm80")

    out, lse = jax.eval_shape(jax.vmap(fwd), xs, xs, xs)
    assert out.shape == xs.shape and lse.shape == xs.shape[:-1]
    batches = {shapes[0][0] for target, shapes in seen if target == fused.TARGET}
    assert batches == {40000}, seen
