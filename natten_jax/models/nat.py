"""NAT and DiNAT image classifiers in Flax NNX.

Neighborhood Attention Transformer (Hassani et al., CVPR 2023, arXiv:2204.07143) and Dilated
Neighborhood Attention Transformer (Hassani & Shi, arXiv:2209.15001), with the architecture and
variant configurations of the official implementation
(``SHI-Labs/Neighborhood-Attention-Transformer``, ``classification/nat.py`` and ``dinat.py``):

* overlapping tokenizer: two 3x3 stride-2 convolutions (``in -> C/2 -> C``), then LayerNorm;
* four levels of pre-norm transformer layers (neighborhood attention + MLP, residuals with
  stochastic depth and optional layer scale); a 3x3 stride-2 convolution (no bias) + LayerNorm
  doubles the channels and halves the resolution between levels;
* final LayerNorm, global average pool, linear classifier.

DiNAT is NAT with per-layer dilations (alternating dilated / non-dilated layers); the dilations of
the 224x224 configurations make the dilated windows span the whole feature map of levels 1-3.

Inputs are NHWC: ``[batch, height, width, in_chans]``. The parameter tree mirrors the official
PyTorch module names (``patch_embed.proj.0``, ``levels.0.blocks.0.attn.qkv``, ``attn.rpb``,
``norm1``, ``mlp.fc1``, ``gamma1``, ``levels.0.downsample.reduction``, ``norm``, ``head``), so
:mod:`natten_jax.models.convert` maps official checkpoints one-to-one.

Stochastic depth and dropout follow ``nnx.Dropout`` conventions: active by default (training
mode, as a freshly built PyTorch module); call ``model.eval()`` for inference and
``model.train()`` to turn them back on, or pass ``deterministic=`` to the call.

Ragged batches (images of different sizes padded into one batch): ``model(x,
valid_extent=E)`` with ``E [B, 2]`` the height and width of each image in the padded ``x``.
Every convolution sees zeros outside the image (as the image alone would see its zero
padding), each level's attention runs with the level's token extents (``ceil(e / 2)`` per 3x3
stride-2 convolution), and the global pool averages the image's tokens only; so each sample's
logits equal those of its image run alone (``rpb=False``, no ``dense_attention``; every level's
token extent at least ``kernel_size * dilation``, see :func:`natten_jax.na2d`).
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import natten_jax
from natten_jax.checks import check_image_extent, check_layer_input
from natten_jax.nnx import NeighborhoodAttention2D
from natten_jax.window import valid_tokens

__all__ = [
    "DENSE_IMPLEMENTATIONS",
    "NATAttention",
    "Mlp",
    "NATLayer",
    "ConvTokenizer",
    "ConvDownsampler",
    "NATLevel",
    "NAT",
    "CONFIGS",
    "CHECKPOINT_URLS",
    "create_model",
    "count_params",
    "nat_mini",
    "nat_tiny",
    "nat_small",
    "nat_base",
    "dinat_mini",
    "dinat_tiny",
    "dinat_small",
    "dinat_base",
    "dinat_large",
    "dinat_large_384",
]

# Implementations of ``jax.nn.dot_product_attention`` for NATAttention(dense_attention=...);
# "cudnn_or_xla": cuDNN on feature maps with an even number of tokens, XLA on odd ones (cuDNN's
# training path rejects odd sequence lengths, e.g. the last level's 7 x 7 = 49 tokens at 224 px).
DENSE_IMPLEMENTATIONS = ("auto", "cudnn", "xla", "cudnn_or_xla")

# PyTorch's nn.LayerNorm default (the official models use it); Flax's default is 1e-6.
LN_EPS = 1e-5

_trunc_normal_02 = nnx.initializers.truncated_normal(stddev=0.02)
_zeros = nnx.initializers.zeros_init()


def _layer_norm(dim, dtype, param_dtype, rngs):
    return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def conv_extent(extent):
    """Output extent of a 3x3, stride-2, padding-1 convolution (the tokenizer's and the
    downsamplers'): ``ceil(extent / 2)``. Ints, NumPy or JAX arrays (traced too)."""
    return (extent + 1) // 2


def mask_outside(x, valid_extent):
    """``x [B, H, W, C]`` with zeros outside each sample's extent ``valid_extent [B, 2]``
    (None: ``x`` unchanged). A select, so NaN or garbage there goes nowhere."""
    if valid_extent is None:
        return x
    inside = valid_tokens(x.shape[1:3], valid_extent)
    return jnp.where(inside[..., None], x, jnp.zeros((), x.dtype))


def _unfused():
    """``natten_jax.unfused`` (imported at call time; needed only for ``rpb=True``)."""
    try:
        return importlib.import_module("natten_jax.unfused")
    except ImportError as e:  # pragma: no cover - depends on the installed package
        raise ImportError(
            "Relative positional biases (rpb=True) need natten_jax.unfused (na2d_qk / na2d_av), "
            "which could not be imported. Build the model with rpb=False to use natten_jax.na2d "
            f"(fused kernels) instead. Original error: {e}") from e


class NATAttention(NeighborhoodAttention2D):
    """2-D neighborhood attention with optional relative positional biases (NNX).

    :class:`natten_jax.nnx.NeighborhoodAttention2D` (parameters ``qkv`` or ``q``/``kv``, and
    ``proj``) plus:

    Args:
      rpb: add a learned relative positional bias ``rpb`` of shape
        ``[num_heads, 2*k0 - 1, 2*k1 - 1]`` to the logits (NAT/DiNAT). The logits come from
        ``natten_jax.unfused.na2d_qk``, softmax is taken in float32, and
        ``natten_jax.unfused.na2d_av`` applies it. With ``rpb=False`` the layer calls
        :func:`natten_jax.na2d` (fused kernels when available, see ``backend``). ``rpb=True``
        requires ``stride=1`` and no causal masking (as NATTEN).
      pad_to_window: if the feature map is smaller than ``kernel_size * dilation`` on an axis,
        zero-pad it at the bottom / right before the qkv projection and crop the output (as
        NATTEN <= 0.14, which the official checkpoints were trained with, did). Without it
        such inputs raise ``ValueError``.
      rpb_init: initialiser of ``rpb`` (truncated normal, std 0.02).
      dense_attention: ``None`` (default): neighborhood attention. Else a baseline for
        benchmarks: dense self-attention over every token of the feature map through
        ``jax.nn.dot_product_attention`` with this ``implementation`` (``"cudnn"``, ``"xla"``,
        ``"auto"`` for JAX's choice, or ``"cudnn_or_xla"``: cuDNN where the map has an even
        number of tokens, XLA where odd); the window arguments (``kernel_size``, ``dilation``,
        ``stride``, ``is_causal``), ``backend`` and ``backend_config`` are then ignored (same
        parameters, so one set of weights serves both). Needs ``rpb=False``.

    Other arguments as :class:`natten_jax.nnx.NeighborhoodAttention` (``backend`` and
    ``backend_config`` reach :func:`natten_jax.na2d`, i.e. ``rpb=False``). The NAT models use
    ``kernel_init`` = truncated normal (std 0.02) as the official initialisation.
    """

    def __init__(self, embed_dim: int, num_heads: int, kernel_size, *, rpb: bool = True,
                 pad_to_window: bool = True, rpb_init: Any = _trunc_normal_02,
                 dense_attention: Optional[str] = None, rngs: nnx.Rngs, **kwargs):
        super().__init__(embed_dim, num_heads, kernel_size, rngs=rngs, **kwargs)
        if not isinstance(rpb, bool):
            raise TypeError(f"`rpb` must be a bool, got {rpb!r}.")
        if dense_attention is not None:
            if dense_attention not in DENSE_IMPLEMENTATIONS:
                raise ValueError(f"`dense_attention` must be None or one of "
                                 f"{DENSE_IMPLEMENTATIONS}, got {dense_attention!r}.")
            if rpb:
                raise ValueError("dense_attention has no relative positional biases; build "
                                 "the layer with rpb=False.")
        self.dense_attention = dense_attention
        self.pad_to_window = bool(pad_to_window)
        if rpb:
            if any(self.is_causal):
                raise NotImplementedError(
                    "Causal neighborhood attention is undefined with relative positional "
                    "biases (rpb=True); use rpb=False.")
            if any(s != 1 for s in self.stride):
                raise NotImplementedError(
                    f"rpb=True supports only stride=1, got stride={self.stride}; use rpb=False.")
            if any(k % 2 == 0 for k in self.kernel_size):
                raise ValueError(
                    f"rpb=True needs an odd kernel_size on every axis (as NATTEN), got "
                    f"kernel_size={self.kernel_size}.")
            shape = (num_heads,) + tuple(2 * k - 1 for k in self.kernel_size)
            param_dtype = kwargs.get("param_dtype", jnp.float32)
            self.rpb = nnx.Param(rpb_init(rngs.params(), shape, param_dtype))
        else:
            self.rpb = None

    @property
    def window(self):
        """Smallest extent per axis the attention accepts: ``kernel_size * dilation``."""
        return tuple(k * d for k, d in zip(self.kernel_size, self.dilation))

    def __call__(self, x: jax.Array, *, valid_extent=None, deterministic: Optional[bool] = None,
                 rngs: Optional[nnx.Rngs] = None) -> jax.Array:
        check_layer_input(type(self).__name__, 2, self.embed_dim, x)
        if valid_extent is not None and (self.rpb is not None or
                                         self.dense_attention is not None):
            raise NotImplementedError(
                "`valid_extent` (ragged batches) needs natten_jax.na2d: build the layer with "
                "rpb=False and dense_attention=None (relative positional biases run on the "
                "unfused operators, which have no ragged support).")
        batch, height, width, _ = x.shape
        if self.pad_to_window and self.dense_attention is None:
            pad_h = max(0, self.window[0] - height)
            pad_w = max(0, self.window[1] - width)
            if pad_h or pad_w:
                x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        lead = x.shape[:-1]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if Hkv == H:
            qkv = self.qkv(x).reshape(lead + (3, H, D))
            q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        else:
            q = self.q(x).reshape(lead + (H, D))
            kv = self.kv(x).reshape(lead + (2, Hkv, D))
            k, v = kv[..., 0, :, :], kv[..., 1, :, :]
        if self.dense_attention is not None:
            out = self._attend_dense(q, k, v)
        elif self.rpb is None:
            out = natten_jax.na2d(
                q, k, v, self.kernel_size, stride=self.stride, dilation=self.dilation,
                is_causal=self.is_causal, scale=self.qk_scale, valid_extent=valid_extent,
                backend=self.backend, backend_config=self.backend_config,
                precision=self.precision)
        else:
            out = self._attend_with_rpb(q, k, v)
        out = out[:, :height, :width]
        out = self.proj(out.reshape((batch, height, width, self.embed_dim)))
        return self.proj_drop(out, deterministic=deterministic, rngs=rngs)

    def _attend_dense(self, q, k, v):
        """Every query attends to every token: ``jax.nn.dot_product_attention`` on
        ``[B, H*W, heads, head_dim]`` (key/value heads as given: GQA needs no repeat)."""
        flat = lambda t: t.reshape((t.shape[0], -1) + t.shape[-2:])  # noqa: E731
        impl = {"auto": None}.get(self.dense_attention, self.dense_attention)
        if impl == "cudnn_or_xla":
            impl = "xla" if math.prod(q.shape[1:-2]) % 2 else "cudnn"
        out = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), scale=self.qk_scale,
                                           implementation=impl)
        return out.reshape(q.shape)

    def _attend_with_rpb(self, q, k, v):
        """NATTEN's unfused path: ``softmax(scale * q.k + rpb) @ v`` (softmax in float32)."""
        unfused = _unfused()
        scale = self.qk_scale if self.qk_scale is not None else self.head_dim ** -0.5
        q = q * jnp.asarray(scale, q.dtype)  # NATTEN scales q before q.k
        logits = unfused.na2d_qk(q, k, self.kernel_size, dilation=self.dilation,
                                 rpb=self.rpb[...],  # GQA: k/v keep num_kv_heads heads
                                 precision=self.precision)
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        return unfused.na2d_av(attn, v, self.kernel_size, dilation=self.dilation,
                               precision=self.precision)


class Mlp(nnx.Module):
    """``fc1 -> GELU (exact, as torch.nn.GELU) -> dropout -> fc2 -> dropout``."""

    def __init__(self, in_features: int, hidden_features: int, *, drop: float = 0.0,
                 dtype=None, param_dtype=jnp.float32, precision=None, rngs: nnx.Rngs):
        linear = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=_trunc_normal_02,
                      bias_init=_zeros, precision=precision, rngs=rngs)
        self.fc1 = nnx.Linear(in_features, hidden_features, **linear)
        self.fc2 = nnx.Linear(hidden_features, in_features, **linear)
        self.drop = nnx.Dropout(float(drop), rngs=rngs)

    def __call__(self, x, *, deterministic: Optional[bool] = None):
        x = jax.nn.gelu(self.fc1(x), approximate=False)
        x = self.drop(x, deterministic=deterministic)
        return self.drop(self.fc2(x), deterministic=deterministic)


class NATLayer(nnx.Module):
    """One NAT/DiNAT layer: ``x + DropPath(g1 * NA(LN(x)))``, then ``x + DropPath(g2 * MLP(LN(x)))``.

    ``g1``/``g2`` (parameters ``gamma1``/``gamma2``, initialised to ``layer_scale``) exist only
    when ``layer_scale`` is a number. Stochastic depth drops the whole residual branch per sample
    (an ``nnx.Dropout`` broadcast over the spatial and channel axes).
    """

    def __init__(self, dim: int, num_heads: int, *, kernel_size=7, dilation=1,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 drop: float = 0.0, drop_path: float = 0.0, layer_scale: Optional[float] = None,
                 rpb: bool = True, pad_to_window: bool = True, backend: Optional[str] = None,
                 backend_config: Optional[Any] = None, dense_attention: Optional[str] = None,
                 dtype=None, param_dtype=jnp.float32, precision=None, rngs: nnx.Rngs):
        self.norm1 = _layer_norm(dim, dtype, param_dtype, rngs)
        self.attn = NATAttention(
            dim, num_heads, kernel_size, dilation=dilation, rpb=rpb,
            pad_to_window=pad_to_window, dense_attention=dense_attention, qkv_bias=qkv_bias,
            qk_scale=qk_scale, proj_drop=drop, dtype=dtype, param_dtype=param_dtype,
            kernel_init=_trunc_normal_02, bias_init=_zeros, backend=backend,
            backend_config=backend_config, precision=precision, rngs=rngs)
        self.drop_path = nnx.Dropout(float(drop_path), broadcast_dims=(1, 2, 3), rngs=rngs)
        self.norm2 = _layer_norm(dim, dtype, param_dtype, rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop, dtype=dtype,
                       param_dtype=param_dtype, precision=precision, rngs=rngs)
        if layer_scale is not None and not isinstance(layer_scale, bool):
            self.gamma1 = nnx.Param(jnp.full((dim,), layer_scale, param_dtype))
            self.gamma2 = nnx.Param(jnp.full((dim,), layer_scale, param_dtype))
        else:
            self.gamma1 = self.gamma2 = None

    def __call__(self, x, *, valid_extent=None, deterministic: Optional[bool] = None):
        y = self.attn(self.norm1(x), valid_extent=valid_extent, deterministic=deterministic)
        if self.gamma1 is not None:
            y = y * self.gamma1[...].astype(y.dtype)
        x = x + self.drop_path(y, deterministic=deterministic)
        y = self.mlp(self.norm2(x), deterministic=deterministic)
        if self.gamma2 is not None:
            y = y * self.gamma2[...].astype(y.dtype)
        return x + self.drop_path(y, deterministic=deterministic)


def _conv(cin, cout, *, use_bias, dtype, param_dtype, rngs, precision=None):
    return nnx.Conv(cin, cout, kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                    use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    precision=precision, rngs=rngs)


class ConvTokenizer(nnx.Module):
    """Overlapping tokenizer: ``proj`` = [3x3/2 conv ``in -> C/2``, 3x3/2 conv ``C/2 -> C``], then
    ``norm`` (LayerNorm). ``[B, H, W, in] -> [B, ceil(H/4), ceil(W/4), C]``."""

    def __init__(self, in_chans: int, embed_dim: int, *, dtype=None, param_dtype=jnp.float32,
                 precision=None, rngs: nnx.Rngs):
        conv = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, precision=precision,
                    rngs=rngs)
        self.proj = nnx.List([_conv(in_chans, embed_dim // 2, **conv),
                              _conv(embed_dim // 2, embed_dim, **conv)])
        self.norm = _layer_norm(embed_dim, dtype, param_dtype, rngs)

    def __call__(self, x, valid_extent=None):
        """``valid_extent``: pixel extents ``[B, 2]`` of a ragged batch (None: all full); each
        convolution sees zeros outside the sample (its output extent: :func:`conv_extent`)."""
        for conv in self.proj:  # no activation between the convolutions (as the official code)
            x = conv(mask_outside(x, valid_extent))
            valid_extent = None if valid_extent is None else conv_extent(valid_extent)
        return self.norm(x)


class ConvDownsampler(nnx.Module):
    """``reduction`` (3x3/2 conv ``C -> 2C``, no bias) then ``norm`` (LayerNorm)."""

    def __init__(self, dim: int, *, dtype=None, param_dtype=jnp.float32, precision=None,
                 rngs: nnx.Rngs):
        self.reduction = _conv(dim, 2 * dim, use_bias=False, dtype=dtype,
                               param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.norm = _layer_norm(2 * dim, dtype, param_dtype, rngs)

    def __call__(self, x, valid_extent=None):
        """``valid_extent``: token extents ``[B, 2]`` of a ragged batch (None: all full); the
        convolution sees zeros outside them."""
        return self.norm(self.reduction(mask_outside(x, valid_extent)))


class NATLevel(nnx.Module):
    """One level (the official ``NATBlock``): ``blocks`` (NATLayers) then optional
    ``downsample``."""

    def __init__(self, dim: int, depth: int, num_heads: int, *, kernel_size, dilations,
                 downsample: bool, drop_path: Sequence[float], rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32, precision=None, **layer_kwargs):
        self.blocks = nnx.List([
            NATLayer(dim, num_heads, kernel_size=kernel_size, dilation=dilations[i],
                     drop_path=float(drop_path[i]), dtype=dtype, param_dtype=param_dtype,
                     precision=precision, rngs=rngs, **layer_kwargs)
            for i in range(depth)])
        self.downsample = (ConvDownsampler(dim, dtype=dtype, param_dtype=param_dtype,
                                           precision=precision, rngs=rngs)
                           if downsample else None)

    def __call__(self, x, *, valid_extent=None, deterministic: Optional[bool] = None):
        """``valid_extent``: the level's token extents ``[B, 2]`` (ragged batch) or None; the
        downsampler's output extents are ``conv_extent(valid_extent)``."""
        for blk in self.blocks:
            x = blk(x, valid_extent=valid_extent, deterministic=deterministic)
        return x if self.downsample is None else self.downsample(x, valid_extent)


def _as_tuple(name, value, n=None):
    try:
        t = tuple(value)
    except TypeError:
        raise TypeError(f"`{name}` must be a sequence, got {value!r}.") from None
    if n is not None and len(t) != n:
        raise ValueError(f"`{name}` must have {n} entries (one per level), got {value!r}.")
    return t


class NAT(nnx.Module):
    """Neighborhood Attention Transformer (and DiNAT, with ``dilations``).

    Args:
      embed_dim: channels of level 0 (doubled at every level).
      mlp_ratio: MLP hidden size / channels.
      depths: layers per level.
      num_heads: attention heads per level.
      drop_path_rate: stochastic depth rate of the last layer; layer ``i`` of ``n`` (counted over
        all levels) uses ``drop_path_rate * i / (n - 1)``.
      in_chans: input channels.
      kernel_size: neighborhood size (int or (kh, kw)) of every layer.
      dilations: ``None`` (NAT: all 1) or, per level, one dilation (int or (dh, dw)) per layer.
      num_classes: classifier outputs; 0 for no head (``__call__`` returns pooled features).
      qkv_bias, qk_scale: as the attention layer.
      drop_rate: dropout after the tokenizer, in the MLPs and after the attention projection.
      layer_scale: initial value of the per-channel residual scales ``gamma1/gamma2``
        (``None``: no layer scale).
      rpb: relative positional biases in every attention layer (the official models have them;
        ``rpb=False`` uses the fused kernels of :func:`natten_jax.na2d` and cannot load the
        official checkpoints' ``rpb`` tensors).
      pad_to_window: zero-pad feature maps smaller than ``kernel_size * dilation`` (see
        :class:`NATAttention`).
      backend: :func:`natten_jax.na2d` backend for ``rpb=False`` (``None``: fastest).
      backend_config: :func:`natten_jax.na2d`'s ``backend_config`` for ``rpb=False`` (a
        :class:`natten_jax.FusedConfig`: kernels, tiles, autotuning of the fused backend;
        ``None``: its default, from the environment variables).
      dense_attention: ``None``, or dense self-attention in every layer in place of
        neighborhood attention, through ``jax.nn.dot_product_attention(implementation=...)``
        (``"cudnn"``, ``"xla"``, ``"auto"``; needs ``rpb=False``): the baseline of the
        throughput benchmark (:class:`NATAttention`).
      dtype: computation dtype (e.g. ``jnp.bfloat16``); ``None`` infers it.
      param_dtype: parameter dtype.
      precision: as JAX's ``precision=``, for every product of the model (convolutions,
        projections, MLPs, the classifier and the attention: :mod:`natten_jax.precision`):
        ``None`` (``jax.default_matmul_precision``), ``"default"``, ``"high"``, ``"highest"``
        or a ``jax.lax.Precision``. In float32, ``"highest"`` is float32-accurate; in 16-bit
        computation it changes nothing.
      rngs: ``nnx.Rngs`` (``params`` for initialisation, ``dropout`` for stochastic depth and
        dropout; a single seed serves both).

    Call: ``model(x, *, valid_extent=None, deterministic=None)`` with ``x [B, H, W,
    in_chans]`` -> logits ``[B, num_classes]`` (in the computation dtype). ``forward_features``
    returns the pooled ``[B, num_features]``. ``valid_extent``: optional integer ``[B, 2]``, the
    height and width of each image in a padded batch (image ``b`` is ``x[b, :h_b, :w_b]``);
    each sample's result then equals that of its image alone (see the module docstring; needs
    ``rpb=False``). Concrete values must lie in ``[1, H]`` / ``[1, W]`` and give every level a
    token extent of at least ``kernel_size * dilation`` (``ValueError``); traced ones are
    clamped into ``[1, H]`` / ``[1, W]``, and each level's attention clamps its token extents
    (:func:`natten_jax.window.sample_extent`).
    """

    def __init__(self, embed_dim: int, mlp_ratio: float, depths: Sequence[int],
                 num_heads: Sequence[int], *, drop_path_rate: float = 0.2, in_chans: int = 3,
                 kernel_size=7, dilations=None, num_classes: int = 1000, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop_rate: float = 0.0,
                 layer_scale: Optional[float] = None, rpb: bool = True,
                 pad_to_window: bool = True, backend: Optional[str] = None,
                 backend_config: Optional[Any] = None, dense_attention: Optional[str] = None,
                 dtype=None, param_dtype=jnp.float32, precision=None, rngs: nnx.Rngs):
        depths = tuple(int(d) for d in _as_tuple("depths", depths))
        num_levels = len(depths)
        if num_levels < 1 or any(d < 1 for d in depths):
            raise ValueError(f"`depths` must be a non-empty sequence of ints >= 1, got {depths}.")
        num_heads = tuple(int(h) for h in _as_tuple("num_heads", num_heads, num_levels))
        if dilations is None:
            dilations = tuple((1,) * d for d in depths)
        else:
            dilations = _as_tuple("dilations", dilations, num_levels)
            dilations = tuple(
                tuple(x if isinstance(x, int) else tuple(x)
                      for x in _as_tuple(f"dilations[{i}]", dl, depths[i]))
                for i, dl in enumerate(dilations))
        if not 0.0 <= drop_path_rate <= 1.0:
            raise ValueError(f"`drop_path_rate` must be in [0, 1], got {drop_path_rate!r}.")
        self.num_classes = int(num_classes)
        self.num_levels = num_levels
        self.embed_dim = int(embed_dim)
        self.num_features = int(embed_dim * 2 ** (num_levels - 1))
        self.depths, self.num_heads, self.dilations = depths, num_heads, dilations
        self.mlp_ratio = float(mlp_ratio)
        self.kernel_size = kernel_size if isinstance(kernel_size, int) else tuple(kernel_size)
        self.layer_scale = layer_scale
        self.rpb = bool(rpb)

        self.patch_embed = ConvTokenizer(in_chans, embed_dim, dtype=dtype,
                                         param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.pos_drop = nnx.Dropout(float(drop_rate), rngs=rngs)
        dpr = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
        self.levels = nnx.List([
            NATLevel(int(embed_dim * 2 ** i), depths[i], num_heads[i], kernel_size=kernel_size,
                     dilations=dilations[i], downsample=i < num_levels - 1,
                     drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], mlp_ratio=mlp_ratio,
                     qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                     layer_scale=layer_scale, rpb=rpb, pad_to_window=pad_to_window,
                     backend=backend, backend_config=backend_config,
                     dense_attention=dense_attention, dtype=dtype,
                     param_dtype=param_dtype, precision=precision, rngs=rngs)
            for i in range(num_levels)])
        self.norm = _layer_norm(self.num_features, dtype, param_dtype, rngs)
        self.head = (nnx.Linear(self.num_features, num_classes, dtype=dtype,
                                param_dtype=param_dtype, kernel_init=_trunc_normal_02,
                                bias_init=_zeros, precision=precision, rngs=rngs)
                     if num_classes > 0 else None)

    def forward_features(self, x, *, valid_extent=None,
                         deterministic: Optional[bool] = None):
        """``[B, H, W, in_chans]`` -> pooled features ``[B, num_features]`` (``valid_extent``:
        see the class docstring; the pool then averages each image's tokens only)."""
        if x.ndim != 4:
            raise ValueError(f"NAT expects NHWC input [batch, height, width, channels], got "
                             f"shape {x.shape}.")
        ext = None
        if valid_extent is not None:
            ext = check_image_extent(type(self).__name__, x, valid_extent)
        x = self.pos_drop(self.patch_embed(x, ext), deterministic=deterministic)
        if ext is not None:
            ext = conv_extent(conv_extent(ext))  # the tokenizer's two convolutions
        for level in self.levels:
            x = level(x, valid_extent=ext, deterministic=deterministic)
            if ext is not None and level.downsample is not None:
                ext = conv_extent(ext)
        x = self.norm(x)
        if ext is None:
            return jnp.mean(x, axis=(1, 2))
        inside = valid_tokens(x.shape[1:3], ext)[..., None]  # [B, h, w, 1]
        total = jnp.sum(jnp.where(inside, x, jnp.zeros((), x.dtype)), axis=(1, 2))
        return total / jnp.sum(inside, axis=(1, 2)).astype(x.dtype)

    def __call__(self, x, *, valid_extent=None, deterministic: Optional[bool] = None):
        x = self.forward_features(x, valid_extent=valid_extent, deterministic=deterministic)
        return x if self.head is None else self.head(x)


# ---------------------------------------------------------------------------------------------
# Official configurations (classification/nat.py and classification/dinat.py of
# SHI-Labs/Neighborhood-Attention-Transformer). Parameter counts (ImageNet-1k head, rpb=True):
# NAT-Mini 19.98M, Tiny 27.90M, Small 50.74M, Base 89.77M; DiNAT-Mini/Tiny/Base as NAT,
# DiNAT-Small 50.72M (no layer scale), DiNAT-Large 200.94M (READMEs: 20M, 28M, 51M, 90M, 200M).

_NAT_MINI = dict(embed_dim=64, mlp_ratio=3.0, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16),
                 drop_path_rate=0.2, kernel_size=7)
_NAT_TINY = dict(_NAT_MINI, depths=(3, 4, 18, 5))
_NAT_SMALL = dict(embed_dim=96, mlp_ratio=2.0, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24),
                  drop_path_rate=0.3, kernel_size=7, layer_scale=1e-5)
_NAT_BASE = dict(embed_dim=128, mlp_ratio=2.0, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32),
                 drop_path_rate=0.5, kernel_size=7, layer_scale=1e-5)


def _dinat_dilations(depths, first_dilations):
    """Alternate 1 and the level's dilation (``[1, d, 1, d, ...]``), as the official configs."""
    return tuple(tuple(1 if j % 2 == 0 else d for j in range(n))
                 for n, d in zip(depths, first_dilations))


# 224x224 input: level feature maps 56, 28, 14, 7 -> dilations 8, 4, 2, 1 (7 * d = extent).
_DIL_224 = (8, 4, 2, 1)
_DIL_384 = (13, 6, 3, 1)

CONFIGS = {
    "nat_mini": _NAT_MINI,
    "nat_tiny": _NAT_TINY,
    "nat_small": _NAT_SMALL,
    "nat_base": _NAT_BASE,
    "dinat_mini": dict(_NAT_MINI, dilations=_dinat_dilations(_NAT_MINI["depths"], _DIL_224)),
    "dinat_tiny": dict(_NAT_TINY, dilations=_dinat_dilations(_NAT_TINY["depths"], _DIL_224)),
    # The official DiNAT-Small has no layer scale (NAT-Small has); DiNAT-Base has it.
    "dinat_small": dict({k: v for k, v in _NAT_SMALL.items() if k != "layer_scale"},
                        dilations=_dinat_dilations(_NAT_SMALL["depths"], _DIL_224)),
    "dinat_base": dict(_NAT_BASE, dilations=_dinat_dilations(_NAT_BASE["depths"], _DIL_224)),
    "dinat_large": dict(embed_dim=192, mlp_ratio=2.0, depths=(3, 4, 18, 5),
                        num_heads=(6, 12, 24, 48), drop_path_rate=0.35, kernel_size=7,
                        dilations=_dinat_dilations((3, 4, 18, 5), _DIL_224)),
    "dinat_large_384": dict(embed_dim=192, mlp_ratio=2.0, depths=(3, 4, 18, 5),
                            num_heads=(6, 12, 24, 48), drop_path_rate=0.35, kernel_size=7,
                            dilations=_dinat_dilations((3, 4, 18, 5), _DIL_384)),
}

# Official PyTorch checkpoints (download them yourself; load with
# natten_jax.models.convert.load_torch_checkpoint). ImageNet-1k heads.
CHECKPOINT_URLS = {
    "nat_mini": "https://shi-labs.com/projects/nat/checkpoints/CLS/nat_mini.pth",
    "nat_tiny": "https://shi-labs.com/projects/nat/checkpoints/CLS/nat_tiny.pth",
    "nat_small": "https://shi-labs.com/projects/nat/checkpoints/CLS/nat_small.pth",
    "nat_base": "https://shi-labs.com/projects/nat/checkpoints/CLS/nat_base.pth",
    "dinat_mini": "https://shilab.cs.uoregon.edu/projects/dinat/checkpoints/imagenet1k/"
                  "dinat_mini_in1k_224.pth",
    "dinat_tiny": "https://shilab.cs.uoregon.edu/projects/dinat/checkpoints/imagenet1k/"
                  "dinat_tiny_in1k_224.pth",
    "dinat_small": "https://shilab.cs.uoregon.edu/projects/dinat/checkpoints/imagenet1k/"
                   "dinat_small_in1k_224.pth",
    "dinat_base": "https://shilab.cs.uoregon.edu/projects/dinat/checkpoints/imagenet1k/"
                  "dinat_base_in1k_224.pth",
    "dinat_large": "https://shilab.cs.uoregon.edu/projects/dinat/checkpoints/imagenet1k/"
                   "dinat_large_in22k_in1k_224.pth",
    "dinat_large_384": "https://shilab.cs.uoregon.edu/projects/dinat/checkpoints/imagenet1k/"
                       "dinat_large_in22k_in1k_384.pth",
}


def create_model(name: str, *, rngs: nnx.Rngs, **overrides) -> NAT:
    """Build the official configuration ``name`` (a key of :data:`CONFIGS`); keyword arguments
    override it (e.g. ``num_classes=10, rpb=False, dtype=jnp.bfloat16``)."""
    if name not in CONFIGS:
        raise ValueError(f"Unknown model {name!r}; choose one of {sorted(CONFIGS)}.")
    return NAT(**{**CONFIGS[name], **overrides}, rngs=rngs)


def count_params(model: nnx.Module) -> int:
    """Number of parameter scalars (works on ``nnx.eval_shape`` models too)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def _factory(name):
    def make(*, rngs: nnx.Rngs, **overrides) -> NAT:
        return create_model(name, rngs=rngs, **overrides)
    make.__name__ = make.__qualname__ = name
    make.__doc__ = (f"The official ``{name}`` configuration (:data:`CONFIGS`), ImageNet-1k head "
                    f"by default; keyword arguments override it.")
    return make


nat_mini = _factory("nat_mini")
nat_tiny = _factory("nat_tiny")
nat_small = _factory("nat_small")
nat_base = _factory("nat_base")
dinat_mini = _factory("dinat_mini")
dinat_tiny = _factory("dinat_tiny")
dinat_small = _factory("dinat_small")
dinat_base = _factory("dinat_base")
dinat_large = _factory("dinat_large")
dinat_large_384 = _factory("dinat_large_384")
