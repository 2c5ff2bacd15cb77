"""natten_jax: neighborhood attention for JAX (NATTEN's semantics, heads-last layout)."""

from natten_jax.config import FusedConfig
from natten_jax.context_parallel import na_context_parallel
from natten_jax.functional import na1d, na2d, na3d
from natten_jax.merge import merge_attentions
from natten_jax.unfused import na1d_av, na1d_qk, na2d_av, na2d_qk, na3d_av, na3d_qk

__version__ = "0.1.0"
__all__ = ["na1d", "na2d", "na3d", "na1d_qk", "na2d_qk", "na3d_qk", "na1d_av", "na2d_av",
           "na3d_av", "na_context_parallel", "merge_attentions", "FusedConfig", "__version__"]

# Flax layers and models, imported on first access (PEP 562) so that Flax stays optional:
# `import natten_jax` imports no Flax; `natten_jax.nnx.NeighborhoodAttention2D` works once it is
# installed. `pip install 'natten_jax[flax]'` installs what they need (flax, and optax).
_LAZY_SUBMODULES = ("nnx", "linen", "models")
_OPTIONAL_DEPENDENCIES = ("flax", "optax")


def __getattr__(name):
    if name not in _LAZY_SUBMODULES:
        raise AttributeError(f"module 'natten_jax' has no attribute {name!r}")
    import importlib

    try:
        return importlib.import_module(f"natten_jax.{name}")
    except ModuleNotFoundError as e:
        missing = (e.name or "").partition(".")[0]
        if missing not in _OPTIONAL_DEPENDENCIES:
            raise
        raise ImportError(
            f"natten_jax.{name} needs Flax, and {missing!r} cannot be imported ({e}): "
            f"pip install flax optax (or pip install 'natten_jax[flax]').") from e


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
