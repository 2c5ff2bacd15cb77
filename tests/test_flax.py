"""Flax layers: natten_jax.nnx and natten_jax.linen NeighborhoodAttention{1,2,3}D.

CPU time here is dominated by XLA compiles, so the numeric checks of each rank share one jitted
program (``_main``), and checks that only need shapes/dtypes/errors run on abstract values.
"""

import functools
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import natten_jax
from natten_jax import linen as na_linen
from natten_jax import nnx as na_nnx

EMBED, HEADS = 16, 4
HEAD_DIM = EMBED // HEADS
SPATIAL = {1: (9,), 2: (5, 6), 3: (3, 4, 6)}
# Per rank: non-trivial window settings (extent-compatible with SPATIAL), and the head layout:
# rank 1 plain multi-head (fused qkv), rank 2 multi-query (1 kv head), rank 3 grouped-query.
CONFIG = {
    1: dict(kernel_size=3, dilation=2, stride=2, is_causal=False),
    2: dict(kernel_size=(3, 2), dilation=1, stride=(1, 2), is_causal=(True, False),
            num_kv_heads=1, qk_scale=0.3),
    3: dict(kernel_size=3, dilation=(1, 1, 2), stride=1, is_causal=False, num_kv_heads=2),
}
NNX = {1: na_nnx.NeighborhoodAttention1D, 2: na_nnx.NeighborhoodAttention2D,
       3: na_nnx.NeighborhoodAttention3D}
LINEN = {1: na_linen.NeighborhoodAttention1D, 2: na_linen.NeighborhoodAttention2D,
         3: na_linen.NeighborhoodAttention3D}
RANKS = (1, 2, 3)
APIS = ("nnx", "linen")


def _x(rank, batch=2, dtype=jnp.float32, seed=1):
    shape = (batch,) + SPATIAL[rank] + (EMBED,)
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _build(api, rank, seed=0, abstract=False, **overrides):
    """Build a layer; returns ``(apply, params)`` with ``apply(params, x, **call_kwargs)`` pure.

    ``params``: an ``nnx.State`` of Params (nnx) or the linen ``params`` dict. ``abstract``:
    shapes only (no compile, no computation).
    """
    kw = dict(CONFIG[rank], backend="reference")
    kw.update(overrides)
    if api == "nnx":
        def make():
            return NNX[rank](EMBED, HEADS, rngs=nnx.Rngs(seed), **kw)

        module = nnx.eval_shape(make) if abstract else nnx.jit(make)()
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)

        def apply(params, x, **call_kw):
            return nnx.merge(graphdef, params, rest)(x, **call_kw)
    else:
        module = LINEN[rank](EMBED, HEADS, **kw)
        init = functools.partial(module.init, jax.random.key(seed), _x(rank, 1))
        params = (jax.eval_shape(init) if abstract else jax.jit(init)())["params"]

        def apply(params, x, **call_kw):
            return module.apply({"params": params}, x, **call_kw)
    return apply, params


def _pure(params):
    return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


def _dense(p, x):
    y = jnp.einsum("...i,io->...o", x, p["kernel"], precision="highest")
    return y + p["bias"] if "bias" in p else y


def _by_hand(params, x, rank, num_kv_heads=None, qk_scale=None, kernel_size=None, stride=1,
             dilation=1, is_causal=False):
    """projection -> natten_jax.na{rank}d(backend="reference") -> projection, from raw params."""
    lead = x.shape[:-1]
    if num_kv_heads in (None, HEADS):
        qkv = _dense(params["qkv"], x).reshape(lead + (3, HEADS, HEAD_DIM))
        q, k, v = (qkv[..., i, :, :] for i in range(3))
    else:
        q = _dense(params["q"], x).reshape(lead + (HEADS, HEAD_DIM))
        kv = _dense(params["kv"], x).reshape(lead + (2, num_kv_heads, HEAD_DIM))
        k, v = kv[..., 0, :, :], kv[..., 1, :, :]
    fn = {1: natten_jax.na1d, 2: natten_jax.na2d, 3: natten_jax.na3d}[rank]
    o = fn(q, k, v, kernel_size, stride=stride, dilation=dilation, is_causal=is_causal,
           scale=qk_scale, backend="reference")
    return _dense(params["proj"], o.reshape(lead + (EMBED,)))


def _perturb(params, scale=0.1):
    """Add noise to every leaf (so that zero-initialised biases are exercised too)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(tree, [a + scale * jax.random.normal(k, a.shape, a.dtype)
                                     for a, k in zip(leaves, keys)])


@functools.lru_cache(maxsize=None)
def _main(rank):
    """Build both layers of ``rank`` (different seeds) and run every numeric check's
    computation in one jitted program."""
    nnx_apply, nnx_params = _build("nnx", rank, seed=0)
    linen_apply, linen_params = _build("linen", rank, seed=1)
    x = _x(rank)

    def loss(apply, p):
        return jnp.sum(jnp.sin(apply(p, x)))

    @jax.jit
    def run(nnx_params, linen_params, x):
        nnx_p, linen_p = _perturb(nnx_params), _perturb(linen_params)
        nnx_pure = _pure(nnx_p)
        return dict(
            nnx=nnx_apply(nnx_p, x),
            nnx_by_hand=_by_hand(nnx_pure, x, rank, **CONFIG[rank]),
            linen=linen_apply(linen_p, x),
            linen_by_hand=_by_hand(linen_p, x, rank, **CONFIG[rank]),
            linen_with_nnx_params=linen_apply(nnx_pure, x),
            nnx_grad=jax.grad(functools.partial(loss, nnx_apply))(nnx_params),
            linen_grad=jax.grad(functools.partial(loss, linen_apply))(linen_params),
        )

    return dict(x=x, nnx_params=nnx_params, linen_params=linen_params,
                out=jax.tree.map(np.asarray, run(nnx_params, linen_params, x)))


def _param_shapes(params):
    return {name: {k: tuple(v.shape) for k, v in sub.items()}
            for name, sub in _pure(params).items()}


def _expected_param_shapes(num_kv_heads, qkv_bias=True):
    if num_kv_heads in (None, HEADS):
        shapes = {"qkv": {"kernel": (EMBED, 3 * EMBED), "bias": (3 * EMBED,)}}
    else:
        kv = 2 * num_kv_heads * HEAD_DIM
        shapes = {"q": {"kernel": (EMBED, EMBED), "bias": (EMBED,)},
                  "kv": {"kernel": (EMBED, kv), "bias": (kv,)}}
    if not qkv_bias:
        for sub in shapes.values():
            del sub["bias"]
    shapes["proj"] = {"kernel": (EMBED, EMBED), "bias": (EMBED,)}
    return shapes


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("rank", RANKS)
def test_param_shapes_and_dtypes(api, rank):
    params = _main(rank)[f"{api}_params"]
    assert _param_shapes(params) == _expected_param_shapes(CONFIG[rank].get("num_kv_heads"))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("rank", RANKS)
def test_matches_hand_written(api, rank):
    r = _main(rank)
    y = r["out"][api]
    assert y.shape == r["x"].shape and y.dtype == np.float32
    np.testing.assert_allclose(y, r["out"][f"{api}_by_hand"], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("rank", RANKS)
def test_nnx_and_linen_agree(rank):
    r = _main(rank)
    assert _param_shapes(r["nnx_params"]) == _param_shapes(r["linen_params"])
    # The linen layer run with the nnx layer's parameters gives the nnx layer's output.
    np.testing.assert_allclose(r["out"]["linen_with_nnx_params"], r["out"]["nnx"], rtol=1e-6,
                               atol=1e-6)
    assert np.max(np.abs(r["out"]["nnx"] - r["out"]["linen"])) > 1e-3  # different inits
    # Linen parameters load into an nnx State one-to-one.
    state = jax.tree.map(lambda a: a, r["nnx_params"])
    nnx.replace_by_pure_dict(state, r["linen_params"])
    for a, b in zip(jax.tree.leaves(_pure(state)), jax.tree.leaves(r["linen_params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("rank", RANKS)
def test_grad_under_jit(api, rank):
    r = _main(rank)
    grads = r["out"][f"{api}_grad"]
    params = r[f"{api}_params"]
    assert _param_shapes(grads) == _param_shapes(params)
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(g)) and np.max(np.abs(g)) > 0


def test_nnx_transforms_on_module():
    """nnx.jit / nnx.grad directly on the module object (rank 1)."""
    m = nnx.jit(lambda: NNX[1](EMBED, HEADS, rngs=nnx.Rngs(0), backend="reference",
                               **CONFIG[1]))()
    x = _x(1)

    @nnx.jit
    def fwd_and_grad(m, x):
        return m(x), nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m)

    y, grads = fwd_and_grad(m, x)
    params = nnx.state(m, nnx.Param)
    ref = jax.jit(lambda p, x: _by_hand(_pure(p), x, 1, **CONFIG[1]))(params, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=2e-5, atol=2e-5)
    assert _param_shapes(grads) == _param_shapes(params)
    assert all(np.max(np.abs(np.asarray(g))) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("api", APIS)
def test_bf16(api):
    rank = 2
    x = _x(rank)
    # bf16 compute, fp32 params: output bf16, close to an fp32 hand-written computation.
    apply, params = _build(api, rank, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    y, ref = jax.jit(lambda p, x: (apply(p, x), _by_hand(_pure(p), x, rank, **CONFIG[rank])))(
        params, x)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), atol=0.05, rtol=0.05)
    # bf16 params and compute.
    apply, params = _build(api, rank, abstract=True, dtype=jnp.bfloat16,
                           param_dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    assert jax.eval_shape(apply, params, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    assert jax.eval_shape(apply, params, x).dtype == jnp.bfloat16
    # dtype=None: bf16 params with fp32 input promote to fp32.
    apply, params = _build(api, rank, abstract=True, param_dtype=jnp.bfloat16)
    assert jax.eval_shape(apply, params, x).dtype == jnp.float32


@pytest.mark.parametrize("api,num_kv_heads,qkv_bias", [("nnx", 1, False), ("linen", 2, True),
                                                       ("nnx", 4, False)])
def test_gqa_passes_kv_heads_unrepeated(api, num_kv_heads, qkv_bias, monkeypatch):
    rank = 2
    seen = []
    real = natten_jax.na2d

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape, k.shape, v.shape))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(natten_jax, "na2d", spy)
    apply, params = _build(api, rank, abstract=True, num_kv_heads=num_kv_heads,
                           qkv_bias=qkv_bias)
    assert _param_shapes(params) == _expected_param_shapes(num_kv_heads, qkv_bias)
    x = _x(rank)
    seen.clear()
    assert jax.eval_shape(apply, params, x).shape == x.shape
    (qs, ks, vs), = seen
    assert qs == x.shape[:-1] + (HEADS, HEAD_DIM)
    assert ks == vs == x.shape[:-1] + (num_kv_heads, HEAD_DIM)


BAD_ARGS = [
    (dict(embed_dim=18), "embed_dim"),
    (dict(embed_dim=0), "embed_dim"),
    (dict(num_heads=0), "num_heads"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(kernel_size=(3, 3, 3)), "kernel_size"),
    (dict(dilation=0), "dilation"),
    (dict(stride=0), "stride"),
    (dict(stride=4), "stride"),
    (dict(is_causal=(True,)), "is_causal"),
    (dict(proj_drop=1.5), "proj_drop"),
    (dict(qk_scale=-1.0), "qk_scale"),
    (dict(backend="nope"), "backend"),
]


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("bad,name", BAD_ARGS)
def test_bad_constructor_args(api, bad, name):
    kw = dict(embed_dim=EMBED, num_heads=HEADS, kernel_size=3)
    kw.update(bad)
    with pytest.raises(ValueError, match=name):
        if api == "nnx":
            na_nnx.NeighborhoodAttention2D(**kw, rngs=nnx.Rngs(0))
        else:
            na_linen.NeighborhoodAttention2D(**kw)


@pytest.mark.parametrize("api", APIS)
def test_bad_input(api):
    apply, params = _build(api, 2, abstract=True, kernel_size=3, stride=1)
    with pytest.raises(ValueError, match="rank 4"):
        jax.eval_shape(apply, params, jnp.zeros((2, 5, EMBED), jnp.float32))
    with pytest.raises(ValueError, match="embed_dim"):
        jax.eval_shape(apply, params, jnp.zeros((2, 5, 6, EMBED + 1), jnp.float32))
    with pytest.raises(ValueError, match="kernel_size"):  # window larger than the input
        jax.eval_shape(apply, params, jnp.zeros((2, 2, 6, EMBED), jnp.float32))


def _check_dropout(y_train, y_eval, rate=0.5):
    y_train, y_eval = np.asarray(y_train), np.asarray(y_eval)
    dropped = y_train == 0
    assert 0.2 < dropped.mean() < 0.8
    np.testing.assert_allclose(y_train[~dropped], y_eval[~dropped] / (1 - rate), rtol=1e-5,
                               atol=1e-6)


def test_dropout_nnx():
    m = nnx.jit(lambda: NNX[1](EMBED, HEADS, rngs=nnx.Rngs(0), proj_drop=0.5,
                               backend="reference", **CONFIG[1]))()
    x = _x(1)
    call = nnx.jit(lambda m, x, det: m(x, deterministic=det), static_argnums=2)
    m.eval()
    y_eval = call(m, x, None)
    m.train()
    y_train = call(m, x, None)
    _check_dropout(y_train, y_eval)
    assert not np.array_equal(np.asarray(call(m, x, None)), np.asarray(y_train))  # rng advances
    np.testing.assert_array_equal(np.asarray(call(m, x, True)), np.asarray(y_eval))


def test_dropout_linen():
    kw = dict(CONFIG[1], backend="reference", proj_drop=0.5)
    mod = LINEN[1](EMBED, HEADS, **kw)
    v = {"params": _main(1)["linen_params"]}
    x = _x(1)
    apply = jax.jit(mod.apply, static_argnames="deterministic")
    y_eval = apply(v, x, deterministic=True)
    y_train = apply(v, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    _check_dropout(y_train, y_eval)
    with pytest.raises(ValueError, match="deterministic"):
        jax.eval_shape(mod.apply, v, x)  # dropout active but `deterministic` given nowhere
    # The `deterministic` attribute works as a default.
    det = LINEN[1](EMBED, HEADS, deterministic=True, **kw)
    np.testing.assert_array_equal(np.asarray(jax.jit(det.apply)(v, x)), np.asarray(y_eval))


def test_module_types():
    for rank in RANKS:
        assert issubclass(LINEN[rank], nn.Module) and issubclass(NNX[rank], nnx.Module)
        assert LINEN[rank].__doc__ and NNX[rank].__doc__


def test_import_natten_jax_does_not_import_flax():
    code = "import sys, natten_jax; assert 'flax' not in sys.modules, 'flax imported'"
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=str(pathlib.Path(natten_jax.__file__).parents[1]))
