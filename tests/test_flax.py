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
import oracle
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
    embed_dim = kw.pop("embed_dim", EMBED)
    if api == "nnx":
        def make():
            return NNX[rank](embed_dim, HEADS, rngs=nnx.Rngs(seed), **kw)

        module = nnx.eval_shape(make) if abstract else nnx.jit(make)()
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)

        def apply(params, x, **call_kw):
            return nnx.merge(graphdef, params, rest)(x, **call_kw)
    else:
        # embed_dim=None: inferred from the input (keyword form, as users write it).
        module = (LINEN[rank](num_heads=HEADS, **kw) if embed_dim is None
                  else LINEN[rank](embed_dim, HEADS, **kw))
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


def _by_hand64(params, x, rank, num_kv_heads=None, qk_scale=None, kernel_size=None, stride=1,
               dilation=1, is_causal=False):
    """The layer in float64 NumPy from raw params, independent of natten_jax: projections, each
    key/value head repeated for its HEADS // num_kv_heads query heads (query head h uses key/value
    head h // G), the brute-force oracle (tests/oracle.py), output projection."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    lead = x.shape[:-1]
    Hkv = num_kv_heads or HEADS

    def dense(d, x):
        return x @ d["kernel"] + d.get("bias", 0.0)

    if "qkv" in p:
        qkv = dense(p["qkv"], x).reshape(lead + (3, HEADS, HEAD_DIM))
        q, k, v = (qkv[..., i, :, :] for i in range(3))
    else:
        q = dense(p["q"], x).reshape(lead + (HEADS, HEAD_DIM))
        kv = dense(p["kv"], x).reshape(lead + (2, Hkv, HEAD_DIM))
        k, v = kv[..., 0, :, :], kv[..., 1, :, :]
    k, v = (np.repeat(t, HEADS // Hkv, axis=-2) for t in (k, v))
    o, _ = oracle.na_oracle(q, k, v, kernel_size, stride, dilation, is_causal, qk_scale)
    return dense(p["proj"], o.reshape(lead + (EMBED,)))


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
    inferred_apply, inferred_params = _build("linen", rank, seed=1, embed_dim=None)
    x = _x(rank)

    def loss(apply, p):
        return jnp.sum(jnp.sin(apply(p, x)))

    def by_hand(p, x):
        return _by_hand(_pure(p), x, rank, **CONFIG[rank])

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
            linen_inferred_embed_dim=inferred_apply(linen_p, x),
            nnx_grad=jax.grad(functools.partial(loss, nnx_apply))(nnx_params),
            linen_grad=jax.grad(functools.partial(loss, linen_apply))(linen_params),
            nnx_grad_by_hand=jax.grad(functools.partial(loss, by_hand))(nnx_params),
            linen_grad_by_hand=jax.grad(functools.partial(loss, by_hand))(linen_params),
        )

    return dict(x=x, nnx_params=nnx_params, linen_params=linen_params,
                linen_inferred_params=inferred_params,
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
def test_param_shapes_dtypes_and_init(api, rank):
    """The parameters' layout, and their values as the default initialisers make them: zero
    biases, LeCun-normal kernels (truncated normal of standard deviation 1 / sqrt(fan_in),
    cut at two standard deviations of the untruncated normal), a different draw per kernel."""
    params = _pure(_main(rank)[f"{api}_params"])
    assert _param_shapes(params) == _expected_param_shapes(CONFIG[rank].get("num_kv_heads"))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    std = EMBED ** -0.5  # every projection's fan_in is EMBED
    kernels = []
    for name, sub in params.items():
        w = np.asarray(sub["kernel"])
        np.testing.assert_array_equal(np.asarray(sub["bias"]), 0.0, err_msg=name)
        assert abs(w.std() / std - 1) < 0.25 and abs(w.mean()) < 0.4 * std, (name, w.std())
        assert np.abs(w).max() <= 2 * std / 0.87962566103423978 + 1e-6, name
        kernels.append(w.ravel())
    for i, a in enumerate(kernels):  # independent draws: no kernel repeats another's values
        for b in kernels[i + 1:]:
            n = min(a.size, b.size)
            assert not np.allclose(a[:n], b[:n])


@pytest.mark.parametrize("api", APIS)
def test_initialisers_reach_every_projection(api):
    """kernel_init / bias_init initialise every projection, the output projection included
    (here: the grouped-query layout's q, kv and proj)."""
    init = dict(kernel_init=jax.nn.initializers.constant(0.5),
                bias_init=jax.nn.initializers.constant(-0.25))
    _, params = _build(api, 2, num_kv_heads=2, **init)
    params = _pure(params)
    assert set(params) == {"q", "kv", "proj"}
    for name, sub in params.items():
        np.testing.assert_array_equal(np.asarray(sub["kernel"]), 0.5, err_msg=name)
        np.testing.assert_array_equal(np.asarray(sub["bias"]), -0.25, err_msg=name)


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


@pytest.mark.parametrize("rank", RANKS)
def test_linen_infers_embed_dim(rank):
    """embed_dim=None: the parameters (shapes, and with the same seed values) and the output of
    the module built with embed_dim=EMBED."""
    r = _main(rank)
    inferred = r["linen_inferred_params"]
    assert _param_shapes(inferred) == _expected_param_shapes(CONFIG[rank].get("num_kv_heads"))
    assert jax.tree.structure(inferred) == jax.tree.structure(r["linen_params"])
    for a, b in zip(jax.tree.leaves(inferred), jax.tree.leaves(r["linen_params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(r["out"]["linen_inferred_embed_dim"], r["out"]["linen"],
                               rtol=1e-6, atol=1e-6)


@pytest.fixture
def na_calls(monkeypatch):
    """Records every natten_jax.na1d/na2d/na3d call of the layers: a list of dicts with the
    q/k/v shapes and the keyword arguments."""
    calls = []
    for rank in RANKS:
        real = getattr(natten_jax, f"na{rank}d")

        def spy(q, k, v, *args, _real=real, **kwargs):
            calls.append(dict(kwargs, q=q.shape, k=k.shape, v=v.shape))
            return _real(q, k, v, *args, **kwargs)

        monkeypatch.setattr(natten_jax, f"na{rank}d", spy)
    return calls


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_linen_inferred_embed_dim_follows_the_input(num_kv_heads, na_calls):
    width = 24  # not EMBED: head_dim 6
    layer = LINEN[2](num_heads=HEADS, kernel_size=3, num_kv_heads=num_kv_heads,
                     backend="reference")
    x = jnp.zeros((2, 5, 6, width), jnp.float32)
    params = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
    kv = 2 * (num_kv_heads or HEADS) * 6
    want = ({"qkv": {"kernel": (width, 3 * width), "bias": (3 * width,)}} if num_kv_heads is None
            else {"q": {"kernel": (width, width), "bias": (width,)},
                  "kv": {"kernel": (width, kv), "bias": (kv,)}})
    want["proj"] = {"kernel": (width, width), "bias": (width,)}
    assert _param_shapes(params) == want
    na_calls.clear()
    assert jax.eval_shape(layer.apply, {"params": params}, x).shape == x.shape
    (call,) = na_calls
    assert call["q"] == (2, 5, 6, HEADS, 6)
    assert call["k"] == call["v"] == (2, 5, 6, num_kv_heads or HEADS, 6)
    x18 = jnp.zeros((2, 5, 6, 18), jnp.float32)
    with pytest.raises(ValueError, match=r"inferred .*\(18\) must be divisible by `num_heads`"):
        jax.eval_shape(layer.init, jax.random.key(0), x18)


def test_required_arguments():
    """NNX needs embed_dim (parameters are created at construction); Linen needs num_heads and
    kernel_size, whose None defaults exist only so that embed_dim can come first and be None."""
    with pytest.raises(TypeError, match="embed_dim"):
        na_nnx.NeighborhoodAttention2D(None, HEADS, 3, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="num_heads"):
        na_nnx.NeighborhoodAttention2D(EMBED, None, 3, rngs=nnx.Rngs(0))
    for name in ("num_heads", "kernel_size"):
        kw = dict(num_heads=HEADS, kernel_size=3)
        del kw[name]
        for embed_dim in (EMBED, None):
            with pytest.raises(ValueError, match=f"`{name}` is required"):
                na_linen.NeighborhoodAttention2D(embed_dim, **kw)


@pytest.mark.parametrize("bad,name", [(dict(num_kv_heads=3), "num_kv_heads"),
                                      (dict(stride=4), "stride"),
                                      (dict(backend="nope"), "backend")])
def test_linen_inferred_embed_dim_checks_the_rest_at_call(bad, name):
    layer = na_linen.NeighborhoodAttention2D(num_heads=HEADS, kernel_size=3, **bad)
    with pytest.raises(ValueError, match=name):
        jax.eval_shape(layer.init, jax.random.key(0), _x(2))


@pytest.mark.parametrize("api", APIS)
def test_backend_config_reaches_na(api, na_calls):
    config = natten_jax.FusedConfig(forward_impl="sm80", q_tile=64)
    for given in (config, None):
        apply, params = _build(api, 2, abstract=True, backend_config=given)
        na_calls.clear()
        assert jax.eval_shape(apply, params, _x(2)).shape == _x(2).shape
        (call,) = na_calls
        assert call["backend_config"] is given and call["backend"] == "reference"
    with pytest.raises(TypeError, match="backend_config"):
        _build(api, 2, abstract=True, backend_config="sm80")


def test_nnx_backend_config_is_static():
    """The config is part of the NNX graph definition, so nnx.jit traces again for another."""
    def graphdef(config):
        return nnx.graphdef(nnx.eval_shape(lambda: NNX[1](
            EMBED, HEADS, rngs=nnx.Rngs(0), backend_config=config, **CONFIG[1])))

    sm80 = natten_jax.FusedConfig(forward_impl="sm80")
    assert graphdef(sm80) == graphdef(natten_jax.FusedConfig(forward_impl="sm80"))
    assert graphdef(sm80) != graphdef(natten_jax.FusedConfig(forward_impl="sm90"))
    assert graphdef(sm80) != graphdef(None)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("rank", RANKS)
def test_grad_under_jit(api, rank):
    r = _main(rank)
    grads = r["out"][f"{api}_grad"]
    params = r[f"{api}_params"]
    assert _param_shapes(grads) == _param_shapes(params)
    want = r["out"][f"{api}_grad_by_hand"]
    assert jax.tree.structure(grads) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        assert np.max(np.abs(g)) > 0
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


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

    @jax.jit
    def by_hand(p, x):
        f = lambda p: _by_hand(_pure(p), x, 1, **CONFIG[1])  # noqa: E731
        return f(p), jax.grad(lambda p: jnp.sum(f(p) ** 2))(p)

    ref, ref_grads = by_hand(params, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=2e-5, atol=2e-5)
    assert _param_shapes(grads) == _param_shapes(params)
    for g, w in zip(jax.tree.leaves(_pure(grads)), jax.tree.leaves(_pure(ref_grads))):
        assert np.max(np.abs(np.asarray(g))) > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


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
def test_gqa_passes_kv_heads_unrepeated(api, num_kv_heads, qkv_bias, na_calls):
    """Grouped-query layers hand natten_jax num_kv_heads key/value heads (not repeated to
    HEADS), and compute what repeating each for its group of query heads would."""
    rank = 2
    cfg = dict(CONFIG[rank], num_kv_heads=num_kv_heads)
    apply, params = _build(api, rank, qkv_bias=qkv_bias, **cfg)
    assert _param_shapes(params) == _expected_param_shapes(num_kv_heads, qkv_bias)
    params = _perturb(params)  # non-zero biases
    x = _x(rank)
    na_calls.clear()
    y = jax.jit(apply)(params, x)
    (call,) = na_calls
    assert call["q"] == x.shape[:-1] + (HEADS, HEAD_DIM)
    assert call["k"] == call["v"] == x.shape[:-1] + (num_kv_heads, HEAD_DIM)
    np.testing.assert_allclose(np.asarray(y, np.float64), _by_hand64(_pure(params), x, rank, **cfg),
                               rtol=1e-4, atol=1e-5)


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


def _run_python(code):
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=str(pathlib.Path(natten_jax.__file__).parents[1]))
    assert r.returncode == 0, r.stdout + r.stderr


def test_flax_submodules_are_attributes_imported_lazily():
    _run_python("""
import sys, natten_jax
assert "flax" not in sys.modules, "import natten_jax imported flax"
assert {"nnx", "linen", "models"} <= set(dir(natten_jax))
layer = natten_jax.nnx.NeighborhoodAttention2D  # first access imports natten_jax.nnx and flax
assert "flax" in sys.modules and layer.__module__ == "natten_jax.nnx", layer.__module__
assert natten_jax.linen.NeighborhoodAttention2D.__module__ == "natten_jax.linen"
assert natten_jax.models.NAT.__module__ == "natten_jax.models.nat"
import natten_jax.nnx
assert natten_jax.nnx is sys.modules["natten_jax.nnx"]
""")


def test_flax_submodules_without_flax():
    _run_python("""
import sys
sys.modules["flax"] = None  # as if flax were not installed
import natten_jax
for name in ("nnx", "linen", "models"):
    try:
        getattr(natten_jax, name)
    except ImportError as e:
        assert f"natten_jax.{name} needs Flax" in str(e) and "pip install flax" in str(e), e
    else:
        raise AssertionError(f"natten_jax.{name} without flax")
try:
    natten_jax.no_such_name
except AttributeError as e:
    assert "no_such_name" in str(e), e
else:
    raise AssertionError("natten_jax.no_such_name")
""")
