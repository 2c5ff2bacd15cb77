"""natten_jax: neighborhood attention for JAX (NATTEN's semantics, heads-last layout)."""

from natten_jax.functional import na1d, na2d, na3d

__version__ = "0.1.0"
__all__ = ["na1d", "na2d", "na3d", "__version__"]
