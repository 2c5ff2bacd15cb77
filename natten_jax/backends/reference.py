"""The reference backend (pure jax.numpy): always available."""

from natten_jax.reference import na_reference


def can_run(p):
    return True, ""


def run(p, q, k, v, extra_k=None, extra_v=None, valid_extent=None, additional_lengths=None):
    return na_reference(p, q, k, v, extra_k, extra_v, valid_extent, additional_lengths)
