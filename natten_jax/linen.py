"""Neighborhood attention layers for Flax Linen.

``natten_jax.linen`` is imported on first access (``import natten_jax`` alone does not import
Flax). ``embed_dim`` is inferred from the input's last axis when not given (as
``nn.MultiHeadDotProductAttention`` infers ``qkv_features``)::

    import natten_jax
    layer = natten_jax.linen.NeighborhoodAttention2D(num_heads=4, kernel_size=7)
    params = layer.init(jax.random.key(0), x)
    y = layer.apply(params, x)  # x: [batch, height, width, channels]; y: the same shape

Submodules ``qkv`` (or ``q`` and ``kv`` when ``num_kv_heads < num_heads``) and ``proj`` are
``nn.Dense`` layers laid out exactly as the parameters of :mod:`natten_jax.nnx`'s layers
(see that module's docstring), so the two parameter trees convert one-to-one.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from natten_jax.checks import check_layer_args, check_layer_input
from natten_jax.nnx import na_function

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
      embed_dim: channels of input and output; divisible by ``num_heads``. ``None`` (default):
        the input's last axis; the other attributes are then checked against it at the first
        call rather than at construction. (``num_heads`` and ``kernel_size`` have ``None``
        defaults only so that ``embed_dim`` can stay the first positional field; they are
        required.)
      num_heads: query heads (required); ``head_dim = embed_dim // num_heads``.
      kernel_size, dilation, stride: int or per-axis tuple (``kernel_size`` required; NATTEN
        semantics; ``stride`` does not change the output shape). Extent-dependent limits are
        checked at call.
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
        environment variables).
      precision: as JAX's ``precision=`` (``flax.linen.MultiHeadDotProductAttention`` takes it
        as an attribute too), for the projections (``nn.Dense``) and the attention
        (:func:`natten_jax.na2d` etc., :mod:`natten_jax.precision`): ``None`` (default:
        ``jax.default_matmul_precision``), ``"default"`` (TF32 products in the fused kernels on
        float32), ``"high"`` / ``"highest"`` (float32-accurate), or a ``jax.lax.Precision``.
        Changes nothing on 16-bit computation. A bad value: ``ValueError``.
      deterministic: dropout off when True. With ``proj_drop > 0`` give it here or as the call
        argument (exactly one of the two, as ``flax.linen.merge_param`` requires); a
        ``'dropout'`` rng is needed when False.

    Call: ``layer.apply(variables, x, deterministic=None, *, valid_extent=None)``.
    ``valid_extent``: optional integer ``[batch, rank]``, a ragged batch (passed to
    :func:`natten_jax.na2d` etc.: each sample attends within the leading ``valid_extent[b]``
    positions, as if cropped). The output at padded positions carries no information (the
    output projection of the zero attention output there: its bias).
    """

    rank: ClassVar[int] = 0

    embed_dim: Optional[int] = None
    num_heads: Optional[int] = None
    kernel_size: Optional[IntOrTuple] = None
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
    backend_config: Optional[Any] = None
    deterministic: Optional[bool] = None
    precision: Any = None

    def __post_init__(self):
        # Validate at construction (ValueError / TypeError naming the argument); with
        # embed_dim=None the arguments are checked with the inferred value at the first call.
        for required in ("num_heads", "kernel_size"):
            if getattr(self, required) is None:
                raise ValueError(f"`{required}` is required.")
        if self.embed_dim is not None:
            self._check_args(self.embed_dim)
        super().__post_init__()

    def _check_args(self, embed_dim):
        return check_layer_args(
            self.rank, embed_dim, self.num_heads, self.kernel_size, self.dilation,
            self.stride, self.is_causal, self.num_kv_heads, self.qk_scale, self.proj_drop,
            self.backend, self.backend_config, self.precision)

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: Optional[bool] = None, *,
                 valid_extent=None) -> jax.Array:
        name = type(self).__name__
        embed_dim = self.embed_dim
        if embed_dim is None and getattr(x, "shape", ()):
            embed_dim = x.shape[-1]  # inferred from the input
        check_layer_input(name, self.rank, embed_dim, x)
        try:
            num_kv_heads, kernel_size, dilation, stride, is_causal = self._check_args(embed_dim)
        except ValueError as e:
            if self.embed_dim is not None or "`embed_dim`" not in str(e):
                raise
            raise ValueError(f"{name}: `embed_dim` is inferred from the input's last axis "
                             f"(input shape {tuple(x.shape)}): {e}") from None
        H, Hkv = self.num_heads, num_kv_heads
        D = embed_dim // H
        lead = x.shape[:-1]
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=self.kernel_init, bias_init=self.bias_init,
                     precision=self.precision)
        if Hkv == H:
            qkv = nn.Dense(3 * embed_dim, use_bias=self.qkv_bias, name="qkv", **dense)(x)
            qkv = qkv.reshape(lead + (3, H, D))
            q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        else:
            q = nn.Dense(embed_dim, use_bias=self.qkv_bias, name="q", **dense)(x)
            q = q.reshape(lead + (H, D))
            kv = nn.Dense(2 * Hkv * D, use_bias=self.qkv_bias, name="kv", **dense)(x)
            kv = kv.reshape(lead + (2, Hkv, D))
            k, v = kv[..., 0, :, :], kv[..., 1, :, :]
        scale = None if self.qk_scale is None else float(self.qk_scale)
        out = na_function(self.rank)(
            q, k, v, kernel_size, stride=stride, dilation=dilation, is_causal=is_causal,
            scale=scale, valid_extent=valid_extent, backend=self.backend,
            backend_config=self.backend_config, precision=self.precision)
        out = nn.Dense(embed_dim, use_bias=True, name="proj", **dense)(
            out.reshape(lead + (embed_dim,)))
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
