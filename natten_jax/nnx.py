"""Neighborhood attention layers for Flax NNX.

``natten_jax.nnx`` is imported on first access (``import natten_jax`` alone does not import
Flax)::

    import natten_jax
    layer = natten_jax.nnx.NeighborhoodAttention2D(64, 4, kernel_size=7, rngs=nnx.Rngs(0))
    y = layer(x)  # x: [batch, height, width, 64]

Parameters (attribute names shared with :mod:`natten_jax.linen`, so parameter trees convert
one-to-one):

- ``num_kv_heads == num_heads``: ``qkv`` (``embed_dim -> 3 * embed_dim``; output channels laid
  out as ``[3, heads, head_dim]``, i.e. q, k, v).
- ``num_kv_heads < num_heads`` (grouped-query / multi-query attention): ``q``
  (``embed_dim -> embed_dim``) and ``kv`` (``embed_dim -> 2 * num_kv_heads * head_dim``, laid
  out as ``[2, num_kv_heads, head_dim]``). Key/value heads are never repeated: they are passed
  to :func:`natten_jax.na2d` (etc.) with ``num_kv_heads`` heads.
- ``proj`` (``embed_dim -> embed_dim``), followed by dropout of rate ``proj_drop``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from flax import nnx

import natten_jax
from natten_jax.checks import check_layer_args, check_layer_input

__all__ = [
    "NeighborhoodAttention",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
]

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]


def na_function(rank: int):
    """``natten_jax.na{rank}d`` (looked up at call time)."""
    return getattr(natten_jax, f"na{rank}d")


class NeighborhoodAttention(nnx.Module):
    """Multi-head neighborhood attention over ``rank`` spatial axes (NNX).

    Input ``[batch, *spatial, embed_dim]`` with ``len(spatial) == rank``; output of the same
    shape. Prefer the rank-specific :class:`NeighborhoodAttention1D` / ``2D`` / ``3D``.

    Args:
      rank: number of spatial axes (1, 2 or 3).
      embed_dim: channels of input and output; divisible by ``num_heads``.
      num_heads: query heads; ``head_dim = embed_dim // num_heads``.
      kernel_size, dilation, stride: int or per-axis tuple (NATTEN semantics; ``stride`` does
        not change the output shape). Extent-dependent limits are checked at call.
      is_causal: bool or per-axis tuple of bools.
      num_kv_heads: key/value heads (grouped-query attention); must divide ``num_heads``.
        Defaults to ``num_heads``.
      qkv_bias: whether the q/k/v projections have a bias.
      qk_scale: attention logit scale; default ``head_dim ** -0.5``.
      proj_drop: dropout rate after the output projection.
      dtype: computation dtype (``None``: inferred from inputs and params).
      param_dtype: parameter dtype.
      kernel_init, bias_init: initialisers of all projection kernels / biases.
      backend: passed to :func:`natten_jax.na1d` etc. (``None``, ``"reference"``, ``"fused"``).
      backend_config: a :class:`natten_jax.FusedConfig` (kernels, tiles, autotuning of the
        fused backend) passed to :func:`natten_jax.na1d` etc.; ``None``: its default (from the
        environment variables). Part of the module's static structure: ``nnx.jit`` re-traces
        when it changes.
      precision: as JAX's ``precision=`` (``flax.nnx.MultiHeadAttention`` takes it here too),
        for the projections (``nnx.Linear``) and the attention (:func:`natten_jax.na2d` etc.,
        :mod:`natten_jax.precision`): ``None`` (default: ``jax.default_matmul_precision``),
        ``"default"`` (TF32 products in the fused kernels on float32), ``"high"`` /
        ``"highest"`` (float32-accurate), or a ``jax.lax.Precision``. Changes nothing on
        16-bit computation. A bad value: ``ValueError``.
      rngs: ``nnx.Rngs`` for parameter initialisation (and dropout).

    Call: ``layer(x, *, valid_extent=None, deterministic=None, rngs=None)``;
    ``deterministic`` / ``rngs`` are forwarded to the output ``nnx.Dropout`` (``layer.eval()`` /
    ``layer.train()`` also work). ``valid_extent``: optional integer ``[batch, rank]``, a ragged
    batch (passed to :func:`natten_jax.na2d` etc.: each sample attends within the leading
    ``valid_extent[b]`` positions, as if cropped; padding never reaches the valid positions).
    The layer's output at padded positions carries no information (the output projection of
    the zero attention output there: its bias).
    """

    def __init__(
        self,
        rank: int,
        embed_dim: int,
        num_heads: int,
        kernel_size: IntOrTuple,
        *,
        dilation: IntOrTuple = 1,
        stride: IntOrTuple = 1,
        is_causal: BoolOrTuple = False,
        num_kv_heads: Optional[int] = None,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        proj_drop: float = 0.0,
        dtype: Optional[Any] = None,
        param_dtype: Any = jnp.float32,
        kernel_init: Any = nnx.initializers.lecun_normal(),
        bias_init: Any = nnx.initializers.zeros_init(),
        backend: Optional[str] = None,
        backend_config: Optional[Any] = None,
        precision: Any = None,
        rngs: nnx.Rngs,
    ):
        num_kv_heads, kernel_size, dilation, stride, is_causal = check_layer_args(
            rank, embed_dim, num_heads, kernel_size, dilation, stride, is_causal, num_kv_heads,
            qk_scale, proj_drop, backend, backend_config, precision)
        self.rank = rank
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kernel_size: Tuple[int, ...] = kernel_size
        self.dilation: Tuple[int, ...] = dilation
        self.stride: Tuple[int, ...] = stride
        self.is_causal: Tuple[bool, ...] = is_causal
        self.qk_scale = None if qk_scale is None else float(qk_scale)
        self.backend = backend
        self.backend_config = backend_config
        self.precision = precision
        self.dtype = dtype

        linear = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
                      bias_init=bias_init, precision=precision, rngs=rngs)
        kv_dim = num_kv_heads * self.head_dim
        if num_kv_heads == num_heads:
            self.qkv = nnx.Linear(embed_dim, 3 * embed_dim, use_bias=qkv_bias, **linear)
        else:
            self.q = nnx.Linear(embed_dim, embed_dim, use_bias=qkv_bias, **linear)
            self.kv = nnx.Linear(embed_dim, 2 * kv_dim, use_bias=qkv_bias, **linear)
        self.proj = nnx.Linear(embed_dim, embed_dim, use_bias=True, **linear)
        self.proj_drop = nnx.Dropout(float(proj_drop), rngs=rngs)

    def __call__(self, x: jax.Array, *, valid_extent=None, deterministic: Optional[bool] = None,
                 rngs: Optional[nnx.Rngs] = None) -> jax.Array:
        check_layer_input(type(self).__name__, self.rank, self.embed_dim, x)
        lead = x.shape[:-1]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if Hkv == H:
            qkv = self.qkv(x).reshape(lead + (3, H, D))
            q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        else:
            q = self.q(x).reshape(lead + (H, D))
            kv = self.kv(x).reshape(lead + (2, Hkv, D))
            k, v = kv[..., 0, :, :], kv[..., 1, :, :]
        out = na_function(self.rank)(
            q, k, v, self.kernel_size, stride=self.stride, dilation=self.dilation,
            is_causal=self.is_causal, scale=self.qk_scale, valid_extent=valid_extent,
            backend=self.backend, backend_config=self.backend_config, precision=self.precision)
        out = self.proj(out.reshape(lead + (self.embed_dim,)))
        return self.proj_drop(out, deterministic=deterministic, rngs=rngs)


class NeighborhoodAttention1D(NeighborhoodAttention):
    """1-D neighborhood attention (NNX): ``[batch, length, embed_dim]`` -> same shape.

    Arguments as :class:`NeighborhoodAttention` without ``rank``.
    """

    def __init__(self, embed_dim: int, num_heads: int, kernel_size: IntOrTuple, **kwargs):
        super().__init__(1, embed_dim, num_heads, kernel_size, **kwargs)


class NeighborhoodAttention2D(NeighborhoodAttention):
    """2-D neighborhood attention (NNX): ``[batch, height, width, embed_dim]`` -> same shape.

    Arguments as :class:`NeighborhoodAttention` without ``rank``.
    """

    def __init__(self, embed_dim: int, num_heads: int, kernel_size: IntOrTuple, **kwargs):
        super().__init__(2, embed_dim, num_heads, kernel_size, **kwargs)


class NeighborhoodAttention3D(NeighborhoodAttention):
    """3-D neighborhood attention (NNX): ``[batch, depth, height, width, embed_dim]`` -> same.

    Arguments as :class:`NeighborhoodAttention` without ``rank``.
    """

    def __init__(self, embed_dim: int, num_heads: int, kernel_size: IntOrTuple, **kwargs):
        super().__init__(3, embed_dim, num_heads, kernel_size, **kwargs)
