"""natten_jax: neighborhood attention for JAX (NATTEN's semantics, heads-last layout)."""

from natten_jax.context_parallel import na_context_parallel
from natten_jax.functional import na1d, na2d, na3d
from natten_jax.unfused import na1d_av, na1d_qk, na2d_av, na2d_qk, na3d_av, na3d_qk

__version__ = "0.1.0"
__all__ = ["na1d", "na2d", "na3d", "na1d_qk", "na2d_qk", "na3d_qk", "na1d_av", "na2d_av",
           "na3d_av", "na_context_parallel", "__version__"]
