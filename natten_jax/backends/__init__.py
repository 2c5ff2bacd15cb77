"""Backend selection. Each backend module offers ``can_run(p) -> (bool, reason)`` and
``run(p, q, k, v, extra_k, extra_v) -> (out, lse)``."""

from __future__ import annotations

from natten_jax.backends import fused, reference


def select(p, backend):
    """The run function for ``backend`` (None: the fastest that can run ``p``)."""
    if backend is None:
        return fused.run if fused.can_run(p)[0] else reference.run
    if backend == "reference":
        return reference.run
    ok, why = fused.can_run(p)
    if not ok:
        raise NotImplementedError(f"backend='fused' cannot run this call: {why}")
    return fused.run
