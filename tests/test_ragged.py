"""Ragged batches (issue 24) on the reference backend (CPU, float64) against the crop oracle.

``valid_extent`` / ``additional_lengths`` must give, per sample, neighborhood attention on the
sample cropped to its extent with its first ``additional_lengths[b]`` additional tokens
(tests/ragged_oracle.py), zeros / LSE 0.0 at padded queries, zero gradients for padding, and
never read padded inputs (NaN there must not leak). Also: jit compiles once for new extents,
vmap, clamping of traced values, errors, the Flax layers and the NAT model.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

import natten_jax
from natten_jax import backends
from ragged_oracle import crop_oracle, poison_padding, random_extents, valid_mask

NA = {1: natten_jax.na1d, 2: natten_jax.na2d, 3: natten_jax.na3d}
TOL = dict(rtol=1e-10, atol=1e-10)

# (rank, spatial, H, Hkv, N extra tokens or 0, additional_lengths or None, na kwargs)
CASES = {
    "1d-causal-stride-dilation-gqa-lengths": (
        1, (13,), 4, 2, 3, [3, 0, 1],
        dict(kernel_size=3, stride=2, dilation=2, is_causal=True)),
    "1d-even-kernel": (1, (11,), 2, 2, 0, None, dict(kernel_size=4)),
    "2d-stride-dilation-causal-axis-extras": (
        2, (9, 10), 2, 1, 2, None,
        dict(kernel_size=(3, 4), stride=(2, 1), dilation=(1, 2), is_causal=(False, True))),
    "2d-uneven-dilation-groups-scale": (
        2, (11, 10), 2, 2, 0, None, dict(kernel_size=3, dilation=(2, 3), scale=0.3)),
    "3d-causal-stride-lengths": (
        3, (6, 7, 5), 2, 1, 3, [2, 3, 0],
        dict(kernel_size=2, stride=(1, 2, 1), dilation=(2, 1, 1),
             is_causal=(True, False, False))),
    "3d-even-odd-kernel": (3, (5, 6, 5), 2, 2, 0, None, dict(kernel_size=(2, 3, 4))),
}


def _inputs(seed, B, S, H, Hkv, N, D=4, Dv=3):
    rng = np.random.default_rng(seed)
    shapes = [(B,) + S + (H, D), (B,) + S + (Hkv, D), (B,) + S + (Hkv, Dv)]
    if N:
        shapes += [(B, N, Hkv, D), (B, N, Hkv, Dv)]
    return rng, [rng.standard_normal(s) for s in shapes]


def _ragged_fn(rank, kw, valid_extent=True, lengths=True):
    """jitted (q, k, v, [ek, ev,] E, [L]) -> (out, lse) on the reference backend."""

    def run(q, k, v, extras, E, L):
        ek, ev = extras if extras else (None, None)
        return NA[rank](q, k, v, **kw, additional_keys=ek, additional_values=ev,
                        valid_extent=E, additional_lengths=L, backend="reference",
                        return_lse=True)

    return jax.jit(run)


def _poison_extras(x, lengths, value=np.nan):
    """``x [B, N, ...]`` with the tokens beyond each sample's length set to ``value``."""
    keep = np.arange(x.shape[1])[None, :] < np.asarray(lengths)[:, None]
    return np.where(keep.reshape(keep.shape + (1,) * (x.ndim - 2)), x, value)


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_crop_oracle_forward_and_backward(name):
    rank, S, H, Hkv, N, lengths, kw = CASES[name]
    B = 3
    rng, arrs = _inputs(hash(name) % 2**32, B, S, H, Hkv, N)
    E = random_extents(rng, B, S, kw["kernel_size"], kw.get("dilation", 1))
    # sample 1 at the smallest extent allowed: kernel_size * dilation on every axis
    E[1] = (np.broadcast_to(kw["kernel_size"], (rank,))
            * np.broadcast_to(kw.get("dilation", 1), (rank,)))
    L = None if lengths is None else np.asarray(lengths, np.int32)
    q, k, v = arrs[:3]
    extras = arrs[3:]

    # The call under test sees NaN in every padded token (and in unused extra tokens).
    poisoned = [poison_padding(x, E) for x in (q, k, v)]
    if extras and L is not None:
        poisoned += [_poison_extras(x, L) for x in extras]
    else:
        poisoned += extras
    poisoned = [jnp.asarray(x) for x in poisoned]
    fn = _ragged_fn(rank, kw)
    (out, lse), vjp = jax.vjp(lambda *a: fn(*a[:3], tuple(a[3:]), E, L), *poisoned)

    (r_out, r_lse), r_vjp = jax.vjp(
        lambda *a: crop_oracle(rank, *a[:3], E, **dict(zip(
            ("additional_keys", "additional_values"), a[3:])), additional_lengths=L, **kw),
        *[jnp.asarray(x) for x in arrs])

    inside = valid_mask(S, E)
    np.testing.assert_allclose(out, r_out, **TOL)
    np.testing.assert_allclose(lse, r_lse, **TOL)
    assert np.all(np.asarray(out)[~inside] == 0.0) and np.all(np.asarray(lse)[~inside] == 0.0)

    d_out = rng.standard_normal(out.shape)
    d_lse = rng.standard_normal(lse.shape)
    grads = vjp((jnp.asarray(d_out), jnp.asarray(d_lse)))
    want = r_vjp((jnp.asarray(d_out), jnp.asarray(d_lse)))
    names = ("dq", "dk", "dv", "d_extra_k", "d_extra_v")
    for n, g, w in zip(names, grads, want):
        assert np.all(np.isfinite(g)), n
        np.testing.assert_allclose(g, w, err_msg=n, **TOL)
    for n, g in zip(names[:3], grads[:3]):
        assert np.all(np.asarray(g)[~inside] == 0.0), n
    if extras and L is not None:
        unused = np.arange(N)[None, :] >= L[:, None]
        for n, g in zip(names[3:], grads[3:]):
            assert np.all(np.asarray(g)[unused] == 0.0), n


def test_additional_lengths_alone():
    """additional_lengths without valid_extent: every query is valid, each sample attends to
    its first lengths[b] extra tokens (0 for sample 0); NaN in the unused tokens stays out."""
    rank, S, kw = 2, (7, 8), dict(kernel_size=3, stride=(1, 2))
    rng, (q, k, v, ek, ev) = _inputs(5, 3, S, 2, 1, 4)
    L = np.array([0, 4, 2], np.int32)
    fn = _ragged_fn(rank, kw)
    args = [jnp.asarray(x) for x in (q, k, v, _poison_extras(ek, L), _poison_extras(ev, L))]
    (out, lse), vjp = jax.vjp(lambda *a: fn(*a[:3], tuple(a[3:]), None, L), *args)
    (r_out, r_lse), r_vjp = jax.vjp(
        lambda *a: crop_oracle(rank, *a[:3], None, additional_keys=a[3], additional_values=a[4],
                               additional_lengths=L, **kw),
        *[jnp.asarray(x) for x in (q, k, v, ek, ev)])
    np.testing.assert_allclose(out, r_out, **TOL)
    np.testing.assert_allclose(lse, r_lse, **TOL)
    cot = (jnp.asarray(rng.standard_normal(out.shape)), jnp.asarray(rng.standard_normal(lse.shape)))
    for g, w in zip(vjp(cot), r_vjp(cot)):
        np.testing.assert_allclose(g, w, **TOL)


@pytest.mark.parametrize("rank,S,kw", [
    (1, (10,), dict(kernel_size=3, stride=2, is_causal=True)),
    (2, (6, 7), dict(kernel_size=(3, 2), dilation=(2, 1))),
    (3, (4, 5, 4), dict(kernel_size=2, is_causal=(False, True, False))),
])
def test_full_extents_equal_the_plain_call_exactly(rank, S, kw):
    rng, (q, k, v, ek, ev) = _inputs(rank, 2, S, 2, 2, 2)
    args = [jnp.asarray(x) for x in (q, k, v)]
    full = np.tile(np.asarray(S, np.int32), (2, 1))

    @jax.jit
    def both(q, k, v, ek, ev):
        extra = dict(additional_keys=ek, additional_values=ev, backend="reference",
                     return_lse=True)
        return (NA[rank](q, k, v, **kw, **extra, valid_extent=full, additional_lengths=[2, 2]),
                NA[rank](q, k, v, **kw, **extra))

    got, want = both(*args, jnp.asarray(ek), jnp.asarray(ev))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_new_extents_never_recompile():
    traces = []
    kw = dict(kernel_size=3, dilation=2)

    @jax.jit
    def f(q, k, v, E):
        traces.append(1)
        return natten_jax.na2d(q, k, v, **kw, valid_extent=E, backend="reference")

    _, (q, k, v) = _inputs(0, 2, (9, 8), 2, 2, 0)
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    for E in (np.array([[9, 8], [6, 7]]), np.array([[7, 6], [9, 8]], np.int32)):
        got = f(q, k, v, jnp.asarray(E, jnp.int32))
        np.testing.assert_allclose(got, crop_oracle(2, q, k, v, E, **kw)[0], **TOL)
    assert len(traces) == 1


def test_traced_values_are_clamped():
    """Out-of-range traced extents / lengths equal the concrete call on the clamped values
    (natten_jax.window.sample_extent: clip(E, kernel_size * dilation, S); lengths clip(L, 0,
    N))."""
    kw = dict(kernel_size=(3, 2), dilation=(1, 2))
    _, (q, k, v, ek, ev) = _inputs(1, 3, (7, 8), 2, 1, 3)
    args = [jnp.asarray(x) for x in (q, k, v, ek, ev)]
    E = jnp.asarray([[0, 100], [-5, 5], [50, 3]], jnp.int32)
    L = jnp.asarray([-1, 99, 2], jnp.int32)
    fn = _ragged_fn(2, kw)
    got = fn(*args[:3], tuple(args[3:]), E, L)
    clamped_E = np.array([[3, 8], [3, 5], [7, 4]])
    want = crop_oracle(2, *args[:3], clamped_E, additional_keys=args[3],
                       additional_values=args[4], additional_lengths=[0, 3, 2], **kw)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, **TOL)


def test_vmap_over_an_outer_axis():
    kw = dict(kernel_size=3, stride=2, is_causal=True)
    rng, (q, k, v, ek, ev) = _inputs(2, 4, (9,), 2, 2, 2)
    shape = lambda x: x.reshape((2, 2) + x.shape[1:])  # noqa: E731
    E = random_extents(rng, 4, (9,), 3)
    L = np.array([2, 0, 1, 2], np.int32)
    args = [jnp.asarray(shape(x)) for x in (q, k, v, ek, ev)]

    def one(q, k, v, ek, ev, e, n):
        return natten_jax.na1d(q, k, v, **kw, additional_keys=ek, additional_values=ev,
                               valid_extent=e, additional_lengths=n, backend="reference",
                               return_lse=True)

    out, lse = jax.vmap(one)(*args, shape(E), shape(L))
    r_out, r_lse = crop_oracle(1, q, k, v, E, additional_keys=ek, additional_values=ev,
                               additional_lengths=L, **kw)
    np.testing.assert_allclose(out.reshape(r_out.shape), r_out, **TOL)
    np.testing.assert_allclose(lse.reshape(r_lse.shape), r_lse, **TOL)


def test_low_precision_matches_the_oracle():
    """float32 in: float32 out, float32 LSE, equal to the float64 crop oracle."""
    kw = dict(kernel_size=3, dilation=(1, 2))
    rng, arrs = _inputs(3, 2, (8, 9), 2, 2, 0)
    E = np.array([[5, 9], [8, 6]], np.int32)
    q, k, v = (jnp.asarray(poison_padding(x, E), jnp.float32) for x in arrs)
    out, lse = natten_jax.na2d(q, k, v, **kw, valid_extent=E, backend="reference",
                               return_lse=True)
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
    r_out, r_lse = crop_oracle(2, *(x.astype(np.float32) for x in arrs), E, **kw)
    np.testing.assert_allclose(out, r_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, r_lse, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Errors.


def _qkv(B=2, S=(8, 9)):
    x = jnp.zeros((B,) + S + (2, 4))
    return x, x, x


@pytest.mark.parametrize("bad,msg", [
    (np.array([[8, 9]]), r"`valid_extent` must have shape \[batch, rank\] = \(2, 2\)"),
    (np.array([8, 9]), r"`valid_extent` must have shape"),
    (np.array([[8, 9], [2, 9]]), r"valid_extent\[1, 0\] = 2 \(kernel_size \* dilation = 3"),
    (np.array([[8, 10], [8, 9]]), r"valid_extent\[0, 1\] = 10 .*extent 9"),
    (jnp.array([[8, 9], [8, 0]]), r"valid_extent\[1, 1\] = 0"),
    ([[8, 9], [8]], r"`valid_extent` must be a rectangular integer array"),
])
def test_bad_valid_extent_values(bad, msg):
    with pytest.raises(ValueError, match=msg):
        natten_jax.na2d(*_qkv(), 3, valid_extent=bad, backend="reference")


@pytest.mark.parametrize("bad", [np.array([[8.0, 9.0], [8.0, 9.0]]),
                                 np.ones((2, 2), bool), "8x9", 8])
def test_non_integer_valid_extent_is_a_type_error(bad):
    with pytest.raises(TypeError, match="`valid_extent`"):
        natten_jax.na2d(*_qkv(), 3, valid_extent=bad, backend="reference")


def test_bad_additional_lengths():
    q, k, v = _qkv()
    ek = jnp.zeros((2, 3, 2, 4))
    with pytest.raises(ValueError, match="`additional_lengths` needs `additional_keys`"):
        natten_jax.na2d(q, k, v, 3, additional_lengths=[1, 2], backend="reference")
    extra = dict(additional_keys=ek, additional_values=ek, backend="reference")
    with pytest.raises(ValueError, match=r"additional_lengths\[1\] = 4"):
        natten_jax.na2d(q, k, v, 3, additional_lengths=np.array([3, 4]), **extra)
    with pytest.raises(ValueError, match=r"additional_lengths\[0\] = -1"):
        natten_jax.na2d(q, k, v, 3, additional_lengths=[-1, 0], **extra)
    with pytest.raises(ValueError, match=r"`additional_lengths` must have shape \[batch\]"):
        natten_jax.na2d(q, k, v, 3, additional_lengths=[[1, 2]], **extra)
    with pytest.raises(TypeError, match="`additional_lengths` must have an integer dtype"):
        natten_jax.na2d(q, k, v, 3, additional_lengths=np.array([1.0, 2.0]), **extra)


def test_traced_values_skip_the_value_checks():
    q, k, v = _qkv()
    out = jax.jit(lambda e: natten_jax.na2d(q, k, v, 3, valid_extent=e,
                                            backend="reference"))(jnp.array([[0, 0], [99, 9]]))
    assert np.all(np.isfinite(out))
    with pytest.raises(TypeError, match="`valid_extent` must have an integer dtype"):
        jax.jit(lambda e: natten_jax.na2d(q, k, v, 3, valid_extent=e))(jnp.ones((2, 2)))


@pytest.mark.parametrize("backend", ["gemm", "naive"])
def test_unfused_backends_refuse_ragged_calls(backend):
    with pytest.raises(NotImplementedError, match="valid_extent"):
        natten_jax.na2d(*_qkv(), 3, valid_extent=[[8, 9], [8, 9]], backend=backend)
    p = natten_jax.checks.check_na_call(2, *_qkv(), 3, 1, 1, False, None)
    run = functools.partial(backends._unfused_run, impl=backend)
    for kw, name in ((dict(valid_extent=jnp.ones((2, 2), jnp.int32)), "valid_extent"),
                     (dict(additional_lengths=jnp.ones((2,), jnp.int32)), "additional_lengths")):
        with pytest.raises(NotImplementedError, match=f"`{name}`"):
            run(p, *_qkv(), **kw)


def test_problem_flags():
    q, k, v = _qkv()
    ek = jnp.zeros((2, 3, 2, 4))
    p = natten_jax.checks.check_na_call(2, q, k, v, 3, 1, 1, False, None, ek, ek, None,
                                        [[8, 9], [8, 9]], [1, 2])
    assert p.ragged and p.ragged_extra
    p = natten_jax.checks.check_na_call(2, q, k, v, 3, 1, 1, False, None)
    assert not p.ragged and not p.ragged_extra


# ------------------------------------------------------------------------------------------
# Flax layers and the NAT model.


def _crop(x, e):
    return x[(slice(None),) + tuple(slice(0, int(n)) for n in e)]


def test_nnx_layer_passes_valid_extent():
    layer = natten_jax.nnx.NeighborhoodAttention2D(8, 2, 3, dilation=(1, 2), backend="reference",
                                                  param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((2, 8, 9, 8))
    E = np.array([[8, 9], [5, 6]], np.int32)
    y = layer(jnp.asarray(poison_padding(x, E)), valid_extent=E)
    for b in range(2):
        want = layer(jnp.asarray(_crop(x[b:b + 1], E[b])))
        np.testing.assert_allclose(_crop(y[b:b + 1], E[b]), want, **TOL)
    assert np.all(np.isfinite(y))


def test_linen_layer_passes_valid_extent():
    layer = natten_jax.linen.NeighborhoodAttention1D(num_heads=2, kernel_size=3, stride=2,
                                                     is_causal=True, backend="reference",
                                                     param_dtype=jnp.float64)
    x = np.random.default_rng(1).standard_normal((2, 11, 8))
    E = np.array([[11], [6]], np.int32)
    params = layer.init(jax.random.key(0), jnp.asarray(x))
    y = layer.apply(params, jnp.asarray(poison_padding(x, E)), valid_extent=E)
    for b in range(2):
        want = layer.apply(params, jnp.asarray(_crop(x[b:b + 1], E[b])))
        np.testing.assert_allclose(_crop(y[b:b + 1], E[b]), want, **TOL)
    assert isinstance(layer, linen.Module)


def test_nat_model_ragged_batch_equals_each_image_alone():
    """A padded batch of images of different sizes: each sample's logits equal those of its
    image alone, whatever (large values, NaN) fills the padding."""
    from natten_jax.models import NATAttention
    from test_models import tiny_nat

    model = tiny_nat(param_dtype=jnp.float64, dtype=jnp.float64, depths=(1, 1),
                     dilations=((2,), (1,)))
    model.eval()
    x = np.random.default_rng(0).standard_normal((3, 48, 48, 3))
    # multiples of the total stride (8), and one that is not (convs: ceil(e / 2) each)
    E = np.array([[48, 48], [32, 40], [45, 23]], np.int32)
    call = nnx.jit(lambda m, x, e: m(x, valid_extent=e))
    one = nnx.jit(lambda m, x: m(x))
    alone = [np.asarray(one(model, jnp.asarray(_crop(x[b:b + 1], E[b]))))[0] for b in range(3)]
    for fill in (np.nan, 1e30):
        y = call(model, jnp.asarray(poison_padding(x, E, fill)), jnp.asarray(E))
        for b in range(3):
            np.testing.assert_allclose(y[b], alone[b], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match=r"`valid_extent` must lie in \[1, 48\]"):
        model(jnp.asarray(x), valid_extent=np.array([[48, 48], [0, 8], [8, 8]]))
    rpb_layer = NATAttention(8, 2, 3, rpb=True, rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="valid_extent"):
        rpb_layer(jnp.zeros((1, 6, 6, 8)), valid_extent=[[6, 6]])
