"""Merging attentions over disjoint key sets through their logsumexps.

Attention of one set of queries over keys ``K1 ∪ K2`` (disjoint) is a convex combination of the
attentions over ``K1`` and over ``K2``, weighted by each part's share of the softmax mass:

    lse = log(exp(lse1) + exp(lse2)),   out = exp(lse1 - lse) out1 + exp(lse2 - lse) out2

so a neighborhood attention (``return_lse=True``) can be combined with attention over other
tokens (text, register tokens, another window) computed separately, exactly. This is NATTEN's
``merge_attentions``; natten_jax's fused backend merges its additional key/value tokens this way.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import jax.numpy as jnp


def merge_attentions(outputs: Sequence, lses: Sequence) -> Tuple[object, object]:
    """Combine attentions of the same queries over disjoint key sets.

    Args:
      outputs: two or more attention outputs ``[B, *S, H, Dv]`` (same shape).
      lses: their natural-log logsumexps ``[B, *S, H]`` (as ``return_lse=True`` gives), one per
        output; ``-inf`` where a query saw no key of that set.

    Returns:
      ``(output, lse)``: the attention over the union of the key sets, ``output`` in the dtype
      of ``outputs[0]`` (computed in float32, or float64 for float64 inputs) and ``lse`` in
      float32 (float64 likewise). A query that saw no key in any set gets output 0 and lse
      ``-inf``; gradients stay finite there. Differentiable in every output and lse.
    """
    outputs, lses = list(outputs), list(lses)
    if len(outputs) < 2:
        raise ValueError(f"outputs: need at least two attentions to merge, got {len(outputs)}")
    if len(lses) != len(outputs):
        raise ValueError(f"lses: need one logsumexp per output ({len(outputs)}), got {len(lses)}")
    shape = tuple(outputs[0].shape)
    for i, (o, l) in enumerate(zip(outputs, lses)):
        if tuple(o.shape) != shape:
            raise ValueError(f"outputs[{i}] has shape {tuple(o.shape)}, outputs[0] {shape}")
        if tuple(l.shape) != shape[:-1]:
            raise ValueError(f"lses[{i}] has shape {tuple(l.shape)}, expected {shape[:-1]} "
                             f"(the output's shape without its last axis)")
    wide = jnp.float64 if any(x.dtype == jnp.float64 for x in outputs + lses) else jnp.float32
    lse = jnp.stack([l.astype(wide) for l in lses])
    m = jnp.max(lse, axis=0)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # every part empty: any finite shift will do
    w = jnp.exp(lse - m)  # exp(-inf) = 0 for an empty part, with gradient 0
    total = jnp.sum(w, axis=0)
    seen = total > 0
    total = jnp.where(seen, total, 1.0)
    out = sum(o.astype(wide) * (wi / total)[..., None] for o, wi in zip(outputs, w))
    lse_all = jnp.where(seen, m + jnp.log(total), -jnp.inf)
    return out.astype(outputs[0].dtype), lse_all
