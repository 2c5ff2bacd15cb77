"""The float32 input cases of issue 23 ("fp32 that is fp32") and their error measure.

``na2d(q, k, v, kernel_size=7)`` on float32 ``[1, 24, 24, 2, 64]`` inputs, standard normal and
scaled: by 1e5; q by 1e5 and k by 1e-5 (the logits unchanged); by 1e-6; q and k by 30 (logits
~1e4). The error of a result is its largest absolute difference from the float64 answer relative
to the float64 answer's largest magnitude; "highest" must stay within :func:`highest_bound`:
1e-5, or twice what float32's own rounding of the logits allows where they are large
(``2 * 2^-24 * max |logit|``, case ``qk_x30``).
"""

from __future__ import annotations

import jax
import numpy as np

SHAPE = (1, 24, 24, 2, 64)
KERNEL = 7
# name -> (scale of q, of k, of v)
CASES = {
    "normal": (1.0, 1.0, 1.0),
    "x1e5": (1e5, 1e5, 1e5),
    "q_x1e5_k_x1e-5": (1e5, 1e-5, 1.0),
    "x1e-6": (1e-6, 1e-6, 1e-6),
    "qk_x30": (30.0, 30.0, 1.0),
}
HIGHEST_REL = 1e-5  # the bound for "highest" where logits are moderate
DEFAULT_REL = 2e-3  # the bound for "default" (TF32 products)


def inputs(name: str, seed: int = 0, shape=SHAPE):
    """float32 NumPy (q, k, v) of case ``name``: standard normal times the case's scales."""
    sq, sk, sv = CASES[name]
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    return ((q * np.float32(sq)).astype(np.float32), (k * np.float32(sk)).astype(np.float32),
            (v * np.float32(sv)).astype(np.float32))


def relative_error(x, ref64) -> float:
    """max |x - ref64| / max |ref64| (inf if x has a non-finite element)."""
    x = np.asarray(x, np.float64)
    ref64 = np.asarray(ref64, np.float64)
    if not np.all(np.isfinite(x)):
        return float("inf")
    return float(np.max(np.abs(x - ref64)) / np.max(np.abs(ref64)))


def max_logit(q, k, kernel_size=KERNEL, scale=None) -> float:
    """max |scale * q . k| over the neighborhood pairs, in float64 (the reference operators)."""
    from natten_jax import unfused

    cpu = jax.devices("cpu")[0]
    rank = np.ndim(q) - 3
    scale = np.shape(q)[-1] ** -0.5 if scale is None else scale
    with jax.default_device(cpu):
        q64, k64 = (jax.numpy.asarray(np.asarray(x, np.float64)) for x in (q, k))
        qk = getattr(unfused, f"na{rank}d_qk")
        logits = qk(q64 * scale, k64, kernel_size, backend="reference")
    return float(np.max(np.abs(np.asarray(logits))))


# The case whose large logits (~1e4, spread ~1e3 over a window) let float32's rounding of them
# move the probabilities by more than 1e-5: the large-logit clause applies there. (Values
# x 1e5 have logits ~1e10 too, but their softmax is saturated: gaps between a window's largest
# logits, ~1e9, dwarf a rounding of ~1e3, so the output is one value, exact.)
LARGE_LOGIT_CASES = ("qk_x30",)


def highest_bound(name: str, q, k, kernel_size=KERNEL, scale=None) -> float:
    """The issue's bound on the relative error of case ``name`` at "highest": 1e-5, or for
    :data:`LARGE_LOGIT_CASES` ``2 * 2^-24 * max |logit|`` where that is larger."""
    if name not in LARGE_LOGIT_CASES:
        return HIGHEST_REL
    return max(HIGHEST_REL, 2.0 * 2.0 ** -24 * max_logit(q, k, kernel_size, scale))
