"""Neighborhood attention layers for Flax Linen.

Import explicitly (``import natten_jax`` does not import Flax)::

    from natten_jax import linen as na_linen
    layer = na_linen.NeighborhoodAttention2D(64, 4, kernel_size=7)
    params = layer.init(jax.random.key(0), x)
    y = layer.apply(params, x)  # x: [batch, height, width, 64]

Submodules ``qkv`` (or ``q`` and ``kv`` when ``num_kv_heads < num_heads``) and ``proj`` are
``nn.Dense`` layers laid out exactly as the parameters of :mod:`natten_jax.nnx`'s layers
(see that module's docstring), so the two parameter trees convert one-to-one.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from natten_jax.nnx import check_layer_input, na_function, validate_layer_args

__all__ = [
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
]

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]


class _NeighborhoodAttention(nn.Module):
    """Multi-head neighborhood attention over ``rank`` spatial axes (Linen).

    Input ``[batch, *spatial, embed_dim]`` with ``len(spatial) == rank``; output of the same
    shape.

    Attributes:
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
      deterministic: dropout off when True. With ``proj_drop > 0`` give it here or as the call
        argument (exactly one of the two, as ``flax.linen.merge_param`` requires); a
        ``'dropout'`` rng is needed when False.

    Call: ``layer.apply(variables, x, deterministic=None)``.
    """

    rank: ClassVar[int] = 0

    embed_dim: int
    num_heads: int
    kernel_size: IntOrTuple
    dilation: IntOrTuple = 1
    stride: IntOrTuple = 1
    is_causal: BoolOrTuple = False
    num_kv_heads: Optional[int] = None
    qkv_bias: bool = True
    qk_scale: Optional[float] = None
    proj_drop: float = 0.0
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    backend: Optional[str] = None
    deterministic: Optional[bool] = None

    def __post_init__(self):
        # Validate at construction (ValueError / TypeError naming the argument).
        validate_layer_args(self.rank, self.embed_dim, self.num_heads, self.kernel_size,
                            self.dilation, self.stride, self.is_causal, self.num_kv_heads,
                            self.qk_scale, self.proj_drop, self.backend)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: Optional[bool] = None) -> jax.Array:
        num_kv_heads, kernel_size, dilation, stride, is_causal = validate_layer_args(
            self.rank, self.embed_dim, self.num_heads, self.kernel_size, self.dilation,
            self.stride, self.is_causal, self.num_kv_heads, self.qk_scale, self.proj_drop,
            self.backend)
        check_layer_input(type(self).__name__, self.rank, self.embed_dim, x)
        H, Hkv = self.num_heads, num_kv_heads
        D = self.embed_dim // H
        lead = x.shape[:-1]
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=self.kernel_init, bias_init=self.bias_init)
        if Hkv == H:
            qkv = nn.Dense(3 * self.embed_dim, use_bias=self.qkv_bias, name="qkv", **dense)(x)
            qkv = qkv.reshape(lead + (3, H, D))
            q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        else:
            q = nn.Dense(self.embed_dim, use_bias=self.qkv_bias, name="q", **dense)(x)
            q = q.reshape(lead + (H, D))
            kv = nn.Dense(2 * Hkv * D, use_bias=self.qkv_bias, name="kv", **dense)(x)
            kv = kv.reshape(lead + (2, Hkv, D))
            k, v = kv[..., 0, :, :], kv[..., 1, :, :]
        scale = None if self.qk_scale is None else float(self.qk_scale)
        out = na_function(self.rank)(
            q, k, v, kernel_size, stride=stride, dilation=dilation, is_causal=is_causal,
            scale=scale, backend=self.backend)
        out = nn.Dense(self.embed_dim, use_bias=True, name="proj", **dense)(
            out.reshape(lead + (self.embed_dim,)))
        if self.proj_drop > 0.0:
            det = nn.merge_param("deterministic", self.deterministic, deterministic)
            out = nn.Dropout(rate=self.proj_drop)(out, deterministic=det)
        return out


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """1-D neighborhood attention (Linen): ``[batch, length, embed_dim]`` -> same shape.

    Attributes as documented on the shared base class (``_NeighborhoodAttention``).
    """

    rank: ClassVar[int] = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """2-D neighborhood attention (Linen): ``[batch, height, width, embed_dim]`` -> same shape.

    Attributes as documented on the shared base class (``_NeighborhoodAttention``).
    """

    rank: ClassVar[int] = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """3-D neighborhood attention (Linen): ``[batch, depth, height, width, embed_dim]`` -> same.

    Attributes as documented on the shared base class (``_NeighborhoodAttention``).
    """

    rank: ClassVar[int] = 3
