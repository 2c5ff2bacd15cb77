"""Public neighborhood-attention functions: na1d, na2d, na3d.

Shapes (heads-last, as NATTEN >= 0.20 and ``jax.nn.dot_product_attention``):

* ``B`` batch, ``S...`` the 1, 2 or 3 spatial extents, ``H`` query heads, ``Hkv`` key/value heads
  (``Hkv`` divides ``H``; query head ``h`` uses key/value head ``h // (H // Hkv)``), ``D`` the
  query/key head dim, ``Dv`` the value head dim, ``N`` additional key/value tokens.
* query ``[B, S..., H, D]``, key ``[B, S..., Hkv, D]``, value ``[B, S..., Hkv, Dv]``
  -> output ``[B, S..., H, Dv]`` and, with ``return_lse``, the logsumexp ``[B, S..., H]`` float32.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax.numpy as jnp

from natten_jax import backends
from natten_jax.checks import check_backend, check_na_call
from natten_jax.config import FusedConfig

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]


def na_generic(rank: int, query, key, value, kernel_size, stride=1, dilation=1, is_causal=False,
               scale=None, additional_keys=None, additional_values=None, backend=None,
               return_lse=False, backend_config=None, valid_extent=None,
               additional_lengths=None, precision=None):
    """Rank-generic entry: checks once, picks a backend, runs it."""
    check_backend(backend)
    p = check_na_call(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale,
                      additional_keys, additional_values, backend_config, valid_extent,
                      additional_lengths, precision)
    # Runtime int32 operands (the values never enter the static problem, so a new extent never
    # recompiles); each backend clamps them (natten_jax.window.sample_extent).
    if valid_extent is not None:
        valid_extent = jnp.asarray(valid_extent).astype(jnp.int32)
    if additional_lengths is not None:
        additional_lengths = jnp.asarray(additional_lengths).astype(jnp.int32)
    run = backends.select(p, backend)
    out, lse = run(p, query, key, value, additional_keys, additional_values, valid_extent,
                   additional_lengths)
    return (out, lse) if return_lse else out


def _doc(rank: int) -> str:
    return f"""{rank}-D neighborhood attention.

    Args:
      query: ``[B, {', '.join(f'S{i}' for i in range(rank))}, H, D]``.
      key: ``[B, {', '.join(f'S{i}' for i in range(rank))}, Hkv, D]``; ``Hkv`` divides ``H``.
      value: ``[B, {', '.join(f'S{i}' for i in range(rank))}, Hkv, Dv]``.
      kernel_size: window size, an int or one per axis (odd or even; ``kernel_size * dilation``
        must not exceed the extent).
      stride: queries of one stride group share their window (1 <= stride <= kernel_size).
      dilation: dilation per axis; tokens attend only inside their dilation group.
      is_causal: causal masking, a bool or one per axis.
      scale: logit scale, default ``D ** -0.5``.
      additional_keys: optional ``[B, N, Hkv, D]`` tokens every query also attends to.
      additional_values: optional ``[B, N, Hkv, Dv]``, given together with ``additional_keys``.
      valid_extent: optional integer ``[B, {rank}]``: a ragged batch. Sample ``b`` occupies the
        leading ``valid_extent[b, a]`` positions of spatial axis ``a`` (the rest is padding);
        see "Ragged batches" below.
      additional_lengths: optional integer ``[B]`` (needs ``additional_keys``): sample ``b``
        attends to the first ``additional_lengths[b]`` of the ``N`` additional tokens only; the
        others are padding, never attended (``0`` is allowed).
      backend: ``None`` (fastest available), ``"fused"`` (CUDA kernels), ``"reference"``, or
        ``"gemm"`` / ``"naive"`` (softmax over the unfused CUDA operators of
        :mod:`natten_jax.unfused`; stride 1, no additional keys, no ragged batches).
      backend_config: a :class:`natten_jax.FusedConfig` naming the fused backend's kernels
        (implementation per direction, Q tile, auto-tuning, backward kind, occupancy); ``None``:
        :func:`natten_jax.config.default_config` (the documented environment variables, read
        once). Part of the static problem: a jitted function runs the kernels of the config it
        was traced with. Other backends ignore it.
      precision: how accurately float32 inputs are computed, as JAX's ``precision=``:
        ``None`` (default: follows ``jax.default_matmul_precision`` when traced), ``"default"``,
        ``"high"``, ``"highest"``, the other names ``jax.default_matmul_precision`` takes
        (``"bfloat16"``, ``"tensorfloat32"``, ``"float32"``, ...) or a ``jax.lax.Precision``;
        see :mod:`natten_jax.precision`. ``"default"``: the fused kernels use TF32 tensor cores
        (float32 logits by 3xTF32, one TF32 pass for the other products, float32 accumulation
        and softmax; errors about 1e-3 of the output's largest element, float32's whole range);
        ``"high"`` / ``"highest"``: float32-accurate (3xTF32 for every product; ``"high"`` runs
        like ``"highest"``). The reference backend runs its products at that precision. On
        float16 / bfloat16 / float64 inputs it changes nothing. Part of the static problem: a
        jitted function is traced again at another precision. A bad value: ``ValueError``.
      return_lse: also return the logsumexp of the logits, ``[B, S..., H]`` float32.

    Returns:
      ``[B, S..., H, Dv]`` in query's dtype, or ``(output, lse)`` with ``return_lse``.

    The window rules are NATTEN's: see :mod:`natten_jax.window`.

    Ragged batches: with ``valid_extent``, each sample's result is neighborhood attention on
    the sample cropped to its extent (its own windows, stride groups and dilation groups, as
    if the array ended there), with its first ``additional_lengths[b]`` additional tokens when
    both are given. Outside the extent the output is exactly zero and the logsumexp is ``0.0``;
    the gradients of padded queries, keys and values (and of additional tokens beyond a
    sample's length) are exactly zero; padded inputs are never read, so NaN or garbage in the
    padding cannot reach any output or gradient. Both arrays are converted to int32 and are
    runtime operands: a new extent never recompiles a jitted function. Concrete values must
    satisfy ``kernel_size * dilation <= valid_extent[b, a] <= S_a`` and ``0 <=
    additional_lengths[b] <= N`` (``ValueError`` naming the argument otherwise); traced values
    (under ``jit`` / ``vmap``) are not checked but clamped into those ranges
    (:func:`natten_jax.window.sample_extent`).
    """


def na1d(query, key, value, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
         dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, scale: Optional[float] = None,
         *, additional_keys=None, additional_values=None, valid_extent=None,
         additional_lengths=None, backend: Optional[str] = None,
         backend_config: Optional[FusedConfig] = None, precision=None,
         return_lse: bool = False):
    return na_generic(1, query, key, value, kernel_size, stride, dilation, is_causal, scale,
                      additional_keys, additional_values, backend, return_lse, backend_config,
                      valid_extent, additional_lengths, precision)


def na2d(query, key, value, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
         dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, scale: Optional[float] = None,
         *, additional_keys=None, additional_values=None, valid_extent=None,
         additional_lengths=None, backend: Optional[str] = None,
         backend_config: Optional[FusedConfig] = None, precision=None,
         return_lse: bool = False):
    return na_generic(2, query, key, value, kernel_size, stride, dilation, is_causal, scale,
                      additional_keys, additional_values, backend, return_lse, backend_config,
                      valid_extent, additional_lengths, precision)


def na3d(query, key, value, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
         dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, scale: Optional[float] = None,
         *, additional_keys=None, additional_values=None, valid_extent=None,
         additional_lengths=None, backend: Optional[str] = None,
         backend_config: Optional[FusedConfig] = None, precision=None,
         return_lse: bool = False):
    return na_generic(3, query, key, value, kernel_size, stride, dilation, is_causal, scale,
                      additional_keys, additional_values, backend, return_lse, backend_config,
                      valid_extent, additional_lengths, precision)


na1d.__doc__, na2d.__doc__, na3d.__doc__ = _doc(1), _doc(2), _doc(3)
