"""Backend selection. Each backend module offers ``can_run(p) -> (bool, reason)`` and
``run(p, q, k, v, extra_k=None, extra_v=None, valid_extent=None, additional_lengths=None) ->
(out, lse)``; ``valid_extent`` ``[B, rank]`` / ``additional_lengths`` ``[B]`` arrive as int32
JAX arrays, unclamped (each backend applies :func:`natten_jax.window.sample_extent` /
:func:`natten_jax.window.sample_num_extra`, or its kernels do). "gemm" and "naive" run softmax
over the unfused CUDA operators (:func:`natten_jax.unfused.na_unfused`) and refuse ragged
batches."""

from __future__ import annotations

import functools

from natten_jax.backends import fused, reference, unfused_cuda
from natten_jax.checks import unfused_attention_unsupported


def _unfused_run(p, q, k, v, extra_k=None, extra_v=None, valid_extent=None,
                 additional_lengths=None, *, impl):
    from natten_jax.unfused import na_unfused

    for name, x in (("additional_keys", extra_k), ("valid_extent", valid_extent),
                    ("additional_lengths", additional_lengths)):
        if x is not None:  # select() refuses these problems first; this guards direct calls
            raise NotImplementedError(
                f"backend={impl!r} (unfused operators) does not support `{name}`; use "
                f"backend='fused' or 'reference'")
    return na_unfused(p, q, k, v, impl)


def select(p, backend):
    """The run function for ``backend`` (None: the fastest that can run ``p``)."""
    if backend is None:
        return fused.run if fused.can_run(p)[0] else reference.run
    if backend == "reference":
        return reference.run
    if backend in ("gemm", "naive"):
        why = unfused_attention_unsupported(p, backend)
        if not why:
            why = unfused_cuda.can_run(p.dtype, p.platform, batch=p.batch, tokens=p.num_tokens,
                                       heads=p.heads, dim=max(p.head_dim, p.head_dim_v),
                                       window=p.window)[1]
        if why:
            raise NotImplementedError(f"backend={backend!r} cannot run this call: {why}")
        return functools.partial(_unfused_run, impl=backend)
    ok, why = fused.can_run(p)
    if not ok:
        raise NotImplementedError(f"backend='fused' cannot run this call: {why}")
    return fused.run
