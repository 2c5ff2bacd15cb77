"""NAT / DiNAT models (natten_jax.models): configurations, parameter counts, forward, training,
checkpoint conversion and the relative-positional-bias attention."""

import importlib.util
import unittest.mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import natten_jax
from natten_jax import models
from natten_jax.models import NAT, NATAttention, NATLayer, convert_torch_state_dict
from natten_jax.window import is_neighbor_1d

HAS_UNFUSED = importlib.util.find_spec("natten_jax.unfused") is not None
needs_unfused = pytest.mark.skipif(not HAS_UNFUSED, reason="natten_jax.unfused not available")
HAS_TORCH = importlib.util.find_spec("torch") is not None

# Parameter counts of the papers / official READMEs (classification/NAT.md, DiNAT.md of
# SHI-Labs/Neighborhood-Attention-Transformer), ImageNet-1k heads at 224x224.
PAPER_PARAMS = {
    "nat_mini": 20e6, "nat_tiny": 28e6, "nat_small": 51e6, "nat_base": 90e6,
    "dinat_mini": 20e6, "dinat_tiny": 28e6, "dinat_small": 51e6, "dinat_base": 90e6,
    "dinat_large": 200e6,
}


def closed_form_params(cfg, num_classes=1000, in_chans=3):
    """Parameter count of the official architecture, written out independently of the code."""
    C0, k = cfg["embed_dim"], cfg["kernel_size"]
    n = 3 * 9 * (C0 // 2) + C0 // 2 + (C0 // 2) * 9 * C0 + C0 + 2 * C0  # tokenizer
    for i, (depth, heads) in enumerate(zip(cfg["depths"], cfg["num_heads"])):
        C = C0 * 2 ** i
        hid = int(C * cfg["mlp_ratio"])
        layer = (4 * C                       # norm1, norm2
                 + 3 * C * C + 3 * C          # qkv
                 + heads * (2 * k - 1) ** 2   # rpb
                 + C * C + C                  # proj
                 + C * hid + hid + hid * C + C)  # mlp
        if cfg.get("layer_scale") is not None:
            layer += 2 * C
        n += depth * layer
        if i < len(cfg["depths"]) - 1:
            n += 9 * C * 2 * C + 2 * 2 * C    # downsample conv (no bias) + norm
    Cf = C0 * 2 ** (len(cfg["depths"]) - 1)
    return n + 2 * Cf + Cf * num_classes + num_classes


def tiny_nat(rngs=None, **kw):
    cfg = dict(embed_dim=16, mlp_ratio=2.0, depths=(1, 2), num_heads=(2, 4), kernel_size=3,
               dilations=((2,), (1, 1)), num_classes=5, layer_scale=0.5, drop_path_rate=0.1,
               rpb=False, backend="reference")
    cfg.update(kw)
    return NAT(**cfg, rngs=rngs or nnx.Rngs(0))


def images(shape=(2, 16, 16, 3), seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def flat_params(model):
    return {models.convert.torch_name(p): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ------------------------------------------------------------------------------------------
# Configurations and parameter counts.


def test_official_configs():
    c = models.CONFIGS
    assert c["nat_mini"]["depths"] == (3, 4, 6, 5) and c["nat_tiny"]["depths"] == (3, 4, 18, 5)
    assert [c[n]["mlp_ratio"] for n in ("nat_mini", "nat_tiny", "nat_small", "nat_base")] == \
        [3, 3, 2, 2]
    assert [c[n]["embed_dim"] for n in ("dinat_mini", "dinat_small", "dinat_base",
                                        "dinat_large")] == [64, 96, 128, 192]
    assert c["dinat_large"]["num_heads"] == (6, 12, 24, 48)
    assert "layer_scale" not in c["nat_tiny"] and c["nat_small"]["layer_scale"] == 1e-5
    assert "layer_scale" not in c["dinat_small"] and c["dinat_base"]["layer_scale"] == 1e-5
    for name, cfg in c.items():
        assert cfg["kernel_size"] == 7
        if not name.startswith("dinat"):
            assert "dilations" not in cfg
            continue
        size = 384 if name.endswith("384") else 224
        for i, (depth, dil) in enumerate(zip(cfg["depths"], cfg["dilations"])):
            assert len(dil) == depth
            assert all(d == 1 for d in dil[0::2])  # alternating non-dilated / dilated
            extent = size // 4 // 2 ** i
            assert 7 * max(dil) <= extent < 7 * (max(dil) + 1) or max(dil) == 1
        assert c[name]["dilations"][0][1] == (8 if size == 224 else 13)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_variant_param_count(name):
    model = nnx.eval_shape(lambda: models.create_model(name, rngs=nnx.Rngs(0)))
    n = models.count_params(model)
    assert n == closed_form_params(models.CONFIGS[name])
    assert abs(n - PAPER_PARAMS[name]) <= 0.01 * PAPER_PARAMS[name], n
    names = set(flat_params(model))
    depths = models.CONFIGS[name]["depths"]
    for expected in ("patch_embed.proj.0.weight", "patch_embed.proj.1.bias",
                     "patch_embed.norm.weight", "levels.0.blocks.0.attn.qkv.weight",
                     "levels.0.blocks.0.attn.rpb", "levels.0.blocks.0.attn.proj.bias",
                     "levels.0.blocks.0.mlp.fc1.weight", "levels.0.blocks.0.norm2.bias",
                     "levels.2.downsample.reduction.weight", "levels.2.downsample.norm.bias",
                     f"levels.3.blocks.{depths[3] - 1}.mlp.fc2.weight", "norm.weight",
                     "head.weight", "head.bias"):
        assert expected in names, expected
    assert not any(n.startswith("levels.3.downsample") for n in names)
    assert ("levels.1.blocks.0.gamma1" in names) == ("layer_scale" in models.CONFIGS[name])
    assert not any("reduction.bias" in n for n in names)
    qkv = model.levels[1].blocks[0].attn
    assert qkv.rpb.shape == (models.CONFIGS[name]["num_heads"][1], 13, 13)
    if name.startswith("dinat"):
        assert model.levels[0].blocks[1].attn.dilation == (8, 8)
        assert model.levels[2].blocks[3].attn.dilation == (2, 2)


# ------------------------------------------------------------------------------------------
# Forward and training (rpb=False: natten_jax.na2d).


@nnx.jit
def apply(model, x):
    return model(x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tiny_forward(dtype):
    model = tiny_nat(dtype=dtype)
    model.eval()
    x = images()
    y = apply(model, x)
    assert y.shape == (2, 5) and y.dtype == dtype
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    if dtype == jnp.float32:
        assert nnx.jit(lambda m, x: m.forward_features(x))(model, x).shape == (2, 32)
        # Odd input size: convs give ceil(H / 2); the 2x2 level-1 map is padded to 3x3.
        assert apply(model, images((1, 13, 15, 3))).shape == (1, 5)
        headless = tiny_nat(num_classes=0)
        headless.eval()
        assert apply(headless, x).shape == (2, 32)


def test_train_step_reduces_loss():
    """The shared step (natten_jax.models.training, as the example and the throughput
    benchmark use it): AdamW with the weight-decay mask, label smoothing."""
    model = tiny_nat(num_classes=4)
    optimizer = nnx.Optimizer(model, models.training.adamw(3e-3), wrt=nnx.Param)
    x = images((8, 16, 16, 3), seed=1)
    labels = jnp.asarray([0, 1, 2, 3, 0, 1, 2, 3])
    step = nnx.jit(models.training.train_step)

    model.train()
    losses = [float(step(model, optimizer, x, labels)[0]) for _ in range(15)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    mask = models.training.weight_decay_mask(nnx.state(tiny_nat(rpb=True), nnx.Param))
    flat = {models.convert.torch_name(p): bool(getattr(v, "get_value", lambda: v)())
            for p, v in nnx.to_flat_state(mask)}
    assert flat["levels.0.blocks.0.attn.qkv.weight"]
    assert not any(flat[k] for k in ("levels.0.blocks.0.attn.qkv.bias", "norm.weight",
                                     "levels.0.blocks.0.attn.rpb", "levels.0.blocks.0.gamma1"))


def test_dense_attention_equals_a_window_over_the_whole_map():
    """dense_attention: every token attends to every token, i.e. NA with the window = the map."""
    x = images((2, 5, 7, 16))
    na = NATAttention(16, 2, (5, 7), rpb=False, backend="reference", rngs=nnx.Rngs(0))
    dense = NATAttention(16, 2, 3, dilation=2, rpb=False, dense_attention="xla",
                         rngs=nnx.Rngs(0))
    np.testing.assert_allclose(dense(x), na(x), rtol=1e-5, atol=1e-6)
    # A map smaller than kernel_size * dilation is not padded: still plain attention over it.
    small = NATAttention(16, 2, 3, dilation=3, rpb=False, dense_attention="auto",
                         rngs=nnx.Rngs(0))
    full = NATAttention(16, 2, 4, rpb=False, backend="reference", rngs=nnx.Rngs(0))
    x = images((1, 4, 4, 16))
    np.testing.assert_allclose(small(x), full(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rpb=False"):
        NATAttention(16, 2, 3, dense_attention="xla", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dense_attention"):
        NATAttention(16, 2, 3, rpb=False, dense_attention="flash", rngs=nnx.Rngs(0))
    # cudnn_or_xla: cuDNN on even token counts, XLA on odd ones (recorded, not run: CPU)
    seen = []
    real = jax.nn.dot_product_attention

    def spy(*a, implementation=None, **k):
        seen.append(implementation)
        return real(*a, implementation="xla", **k)

    mixed = NATAttention(16, 2, 3, rpb=False, dense_attention="cudnn_or_xla", rngs=nnx.Rngs(0))
    with unittest.mock.patch.object(jax.nn, "dot_product_attention", spy):
        for shape in ((1, 7, 7, 16), (1, 4, 6, 16)):
            whole = NATAttention(16, 2, shape[1:3], rpb=False, backend="reference",
                                 rngs=nnx.Rngs(0))
            np.testing.assert_allclose(mixed(images(shape)), whole(images(shape)), rtol=1e-5,
                                       atol=1e-6)
    assert seen == ["xla", "cudnn"]
    model = tiny_nat(dense_attention="xla")
    model.eval()
    assert model.levels[1].blocks[1].attn.dense_attention == "xla"
    y = apply(model, images())
    assert y.shape == (2, 5) and np.all(np.isfinite(np.asarray(y)))
    ref = tiny_nat()
    ref.eval()
    assert not np.allclose(y, apply(ref, images()))  # same weights, other attention


def test_stochastic_depth_and_eval_mode():
    layer = NATLayer(16, 2, kernel_size=3, drop_path=1.0, rpb=False, backend="reference",
                     rngs=nnx.Rngs(0))
    x = images((2, 5, 5, 16))
    np.testing.assert_array_equal(layer(x), x)  # both residual branches dropped
    layer.eval()
    assert not np.allclose(layer(x), x)
    model = tiny_nat(drop_path_rate=0.5)
    x = images()
    model.eval()
    np.testing.assert_array_equal(apply(model, x), apply(model, x))
    model.train()
    outs = [np.asarray(apply(model, x)) for _ in range(3)]  # the dropout rng state advances
    assert any(not np.allclose(outs[0], o) for o in outs[1:])


def test_backend_config_reaches_every_layer(monkeypatch):
    """NAT(backend_config=...) hands the config (and the backend) to natten_jax.na2d in every
    layer; None stays None (na2d's default)."""
    seen = []
    real = natten_jax.na2d

    def spy(*args, **kwargs):
        seen.append((kwargs["backend"], kwargs["backend_config"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(natten_jax, "na2d", spy)
    config = natten_jax.FusedConfig(backward="reference", q_tile=64)
    x = images()
    for given in (config, None):
        model = nnx.eval_shape(lambda: tiny_nat(backend_config=given))
        graphdef, state = nnx.split(model)
        seen.clear()
        out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, deterministic=True),
                             state, x)
        assert out.shape == (2, 5)
        assert seen == [("reference", given)] * 3  # depths (1, 2)
        assert all(layer.attn.backend_config is given
                   for level in model.levels for layer in level.blocks)


def test_padding_small_feature_maps():
    layer = NATAttention(8, 2, 3, dilation=2, rpb=False, backend="reference", rngs=nnx.Rngs(0))
    x = images((1, 4, 5, 8))  # window 3 * 2 = 6 > 4, 5: pad bottom / right with zeros
    padded = jnp.pad(x, ((0, 0), (0, 2), (0, 1), (0, 0)))
    ref = layer(padded)[:, :4, :5]
    np.testing.assert_allclose(layer(x), ref, rtol=1e-6, atol=1e-6)
    strict = NATAttention(8, 2, 3, dilation=2, rpb=False, pad_to_window=False,
                          backend="reference", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError):
        strict(x)


def test_attention_arg_checks():
    with pytest.raises(NotImplementedError):
        NATAttention(8, 2, 3, is_causal=True, rpb=True, rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError):
        NATAttention(8, 2, 3, stride=2, rpb=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError):
        NATAttention(8, 2, 4, rpb=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError):
        tiny_nat(num_heads=(2,))
    with pytest.raises(ValueError):
        tiny_nat(dilations=((1, 2), (1, 1)))
    with pytest.raises(ValueError):
        models.create_model("nat_huge", rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------------------
# Checkpoint conversion.


def to_official_state_dict(model):
    """Inverse of the converter, written separately: our params under the PyTorch names."""
    sd = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        keys = [str(p) for p in path]
        value = np.asarray(var.get_value())
        leaf = keys[-1]
        if leaf == "kernel" and value.ndim == 4:      # HWIO -> OIHW
            value, leaf = value.transpose(3, 2, 0, 1), "weight"
        elif leaf == "kernel" and value.ndim == 2:    # (in, out) -> (out, in)
            value, leaf = value.T, "weight"
        elif leaf == "scale":                        # LayerNorm
            leaf = "weight"
        sd[".".join(keys[:-1] + [leaf])] = np.array(value)
    return sd


class FakeTensor:
    """Stands in for a torch tensor: only ``.numpy()``."""

    def __init__(self, a):
        self._a = a

    def numpy(self):
        return self._a


def test_converter_round_trip_outputs_equal():
    src = tiny_nat(rngs=nnx.Rngs(1))
    sd = to_official_state_dict(src)
    assert sd["patch_embed.proj.0.weight"].shape == (8, 3, 3, 3)
    assert sd["levels.0.downsample.reduction.weight"].shape == (32, 16, 3, 3)
    assert sd["levels.1.blocks.0.attn.qkv.weight"].shape == (96, 32)
    assert sd["head.weight"].shape == (5, 32)
    dst = tiny_nat(rngs=nnx.Rngs(2))
    x = images()
    src.eval(), dst.eval()
    assert not np.allclose(apply(src, x), apply(dst, x))
    sd = {k: (FakeTensor(v) if i % 2 else v) for i, (k, v) in enumerate(sd.items())}
    out = convert_torch_state_dict(sd, dst)
    assert out is dst
    np.testing.assert_array_equal(apply(src, x), apply(dst, x))
    a, b = flat_params(src), flat_params(dst)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_converter_round_trip_with_rpb():
    src = tiny_nat(rngs=nnx.Rngs(3), rpb=True)
    sd = to_official_state_dict(src)
    assert sd["levels.1.blocks.1.attn.rpb"].shape == (4, 5, 5)
    dst = convert_torch_state_dict(sd, tiny_nat(rngs=nnx.Rngs(4), rpb=True))
    a, b = flat_params(src), flat_params(dst)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_converter_errors():
    src = tiny_nat(rngs=nnx.Rngs(1))
    sd = to_official_state_dict(src)
    dst = tiny_nat(rngs=nnx.Rngs(2))
    before = flat_params(dst)

    missing = dict(sd)
    del missing["levels.1.blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match="missing.*levels.1.blocks.1.mlp.fc2.bias"):
        convert_torch_state_dict(missing, dst)
    extra = dict(sd, **{"levels.0.blocks.0.attn.rpb": np.zeros((2, 5, 5), np.float32)})
    with pytest.raises(ValueError, match="unexpected.*levels.0.blocks.0.attn.rpb"):
        convert_torch_state_dict(extra, dst)
    bad = dict(sd, **{"head.weight": np.zeros((7, 32), np.float32)})
    with pytest.raises(ValueError, match="head.weight"):
        convert_torch_state_dict(bad, dst)
    after = flat_params(dst)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # untouched on failure

    # strict=False skips both; exclude keeps a fresh head (fine-tuning).
    convert_torch_state_dict(extra, dst, strict=False)
    other_head = tiny_nat(rngs=nnx.Rngs(5), num_classes=3)
    convert_torch_state_dict(sd, other_head, exclude=("head.",))
    got = flat_params(other_head)
    assert np.array_equal(got["norm.weight"], sd["norm.weight"])
    assert got["head.weight"].shape == (32, 3)


@pytest.mark.skipif(HAS_TORCH, reason="torch is installed")
def test_load_torch_checkpoint_needs_torch(tmp_path):
    with pytest.raises(ImportError, match="PyTorch"):
        models.load_torch_checkpoint(str(tmp_path / "x.pth"), tiny_nat())


# ------------------------------------------------------------------------------------------
# Relative positional biases (natten_jax.unfused).


def brute_force_rpb_attention(layer, x):
    """Dense NA with NATTEN's RPB: bias rpb[h, (ky-qy)//d0 + k0-1, (kx-qx)//d1 + k1-1]."""
    B, Hs, Ws, C = x.shape
    H, D = layer.num_heads, layer.head_dim
    (k0, k1), (d0, d1) = layer.kernel_size, layer.dilation
    qkv = np.asarray(layer.qkv(x), np.float64).reshape(B, Hs * Ws, 3, H, D)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    rpb = np.asarray(layer.rpb[...], np.float64)
    ys, xs = np.divmod(np.arange(Hs * Ws), Ws)
    qi, ki = np.meshgrid(np.arange(Hs * Ws), np.arange(Hs * Ws), indexing="ij")
    mask = (is_neighbor_1d(ys[qi], ys[ki], k0, 1, d0, Hs, False)
            & is_neighbor_1d(xs[qi], xs[ki], k1, 1, d1, Ws, False))
    r0 = np.clip((ys[ki] - ys[qi]) // d0 + k0 - 1, 0, 2 * k0 - 2)
    r1 = np.clip((xs[ki] - xs[qi]) // d1 + k1 - 1, 0, 2 * k1 - 2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * D ** -0.5 + rpb[:, r0, r1][None]
    logits = np.where(mask[None, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(B, Hs, Ws, C)
    return np.asarray(layer.proj(jnp.asarray(out, jnp.float32)))


@needs_unfused
@pytest.mark.parametrize("kernel_size,dilation", [(3, 1), (3, (2, 1)), ((5, 3), (1, 2))])
def test_rpb_attention_matches_brute_force(kernel_size, dilation):
    layer = NATAttention(16, 2, kernel_size, dilation=dilation, rpb=True, rngs=nnx.Rngs(0))
    layer.rpb[...] = jnp.asarray(np.random.default_rng(0).normal(size=layer.rpb.shape),
                                 jnp.float32)
    x = images((2, 7, 6, 16))
    np.testing.assert_allclose(layer(x), brute_force_rpb_attention(layer, x),
                               rtol=2e-4, atol=2e-5)


@needs_unfused
def test_rpb_zero_equals_fused_path():
    with_rpb = NATAttention(16, 2, 3, dilation=(2, 1), rpb=True, rngs=nnx.Rngs(0))
    without = NATAttention(16, 2, 3, dilation=(2, 1), rpb=False, backend="reference",
                           rngs=nnx.Rngs(0))
    with_rpb.rpb[...] = jnp.zeros(with_rpb.rpb.shape, jnp.float32)
    x = images((2, 7, 6, 16))
    np.testing.assert_allclose(with_rpb(x), without(x), rtol=1e-5, atol=1e-6)


@needs_unfused
def test_rpb_model_forward_and_grad():
    model = tiny_nat(rpb=True, num_classes=3)
    model.eval()
    x = images()
    grad_fn = nnx.jit(nnx.value_and_grad(lambda m, x: jnp.sum(m(x) ** 2)))
    loss, grads = grad_fn(model, x)
    assert np.isfinite(float(loss))
    g = grads.levels[1].blocks[0].attn.rpb[...]
    assert g.shape == (4, 5, 5) and np.all(np.isfinite(g)) and np.any(g != 0)
    bf16 = tiny_nat(rpb=True, num_classes=3, dtype=jnp.bfloat16)
    bf16.eval()
    assert apply(bf16, x).dtype == jnp.bfloat16
