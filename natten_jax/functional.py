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

from natten_jax import backends
from natten_jax.checks import check_backend, check_na_call
from natten_jax.config import FusedConfig

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]


def na_generic(rank: int, query, key, value, kernel_size, stride=1, dilation=1, is_causal=False,
               scale=None, additional_keys=None, additional_values=None, backend=None,
               return_lse=False, backend_config=None):
    """Rank-generic entry: checks once, picks a backend, runs it."""
    check_backend(backend)
    p = check_na_call(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale,
                      additional_keys, additional_values, backend_config)
    run = backends.select(p, backend)
    out, lse = run(p, query, key, value, additional_keys, additional_values)
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
      backend: ``None`` (fastest available), ``"fused"`` (CUDA kernels), ``"reference"``, or
        ``"gemm"`` / ``"naive"`` (softmax over the unfused CUDA operators of
        :mod:`natten_jax.unfused`; stride 1, no additional keys).
      backend_config: a :class:`natten_jax.FusedConfig` naming the fused backend's kernels
        (implementation per direction, Q tile, auto-tuning, backward kind, occupancy); ``None``:
        :func:`natten_jax.config.default_config` (the documented environment variables, read
        once). Part of the static problem: a jitted function runs the kernels of the config it
        was traced with. Other backends ignore it.
      return_lse: also return the logsumexp of the logits, ``[B, S..., H]`` float32.

    Returns:
      ``[B, S..., H, Dv]`` in query's dtype, or ``(output, lse)`` with ``return_lse``.

    The window rules are NATTEN's: see :mod:`natten_jax.window`.
    """


def na1d(query, key, value, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
         dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, scale: Optional[float] = None,
         *, additional_keys=None, additional_values=None, backend: Optional[str] = None,
         backend_config: Optional[FusedConfig] = None, return_lse: bool = False):
    return na_generic(1, query, key, value, kernel_size, stride, dilation, is_causal, scale,
                      additional_keys, additional_values, backend, return_lse, backend_config)


def na2d(query, key, value, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
         dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, scale: Optional[float] = None,
         *, additional_keys=None, additional_values=None, backend: Optional[str] = None,
         backend_config: Optional[FusedConfig] = None, return_lse: bool = False):
    return na_generic(2, query, key, value, kernel_size, stride, dilation, is_causal, scale,
                      additional_keys, additional_values, backend, return_lse, backend_config)


def na3d(query, key, value, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
         dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, scale: Optional[float] = None,
         *, additional_keys=None, additional_values=None, backend: Optional[str] = None,
         backend_config: Optional[FusedConfig] = None, return_lse: bool = False):
    return na_generic(3, query, key, value, kernel_size, stride, dilation, is_causal, scale,
                      additional_keys, additional_values, backend, return_lse, backend_config)


na1d.__doc__, na2d.__doc__, na3d.__doc__ = _doc(1), _doc(2), _doc(3)
