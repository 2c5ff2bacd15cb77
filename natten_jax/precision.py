"""The ``precision`` argument: how accurately float32 inputs are computed.

JAX users choose the accuracy of float32 matrix products with ``jax.default_matmul_precision``
and the ``precision=`` argument of ``jnp.matmul`` / ``jnp.einsum`` / ``jax.lax.dot_general``.
natten_jax's ``na1d`` / ``na2d`` / ``na3d``, the unfused operators and the Flax layers take the
same ``precision`` and resolve it here, once, to one of two modes (:data:`MODES`):

* ``"default"``: ``None`` under JAX's default, ``"default"``, ``"fastest"``, ``"bfloat16"``,
  ``"tensorfloat32"``, :attr:`jax.lax.Precision.DEFAULT`, and the algorithm presets with
  fewer than float32's product bits (``"TF32_TF32_F32"``, ``"BF16_BF16_F32"``, ``"F16_F16_F32"``,
  ...). The fused kernels compute the logits ``Q K^T`` float32-accurately (3xTF32: ``exp``
  amplifies their absolute error) and every other product with one TF32 pass (10 mantissa
  bits), float32 accumulation and softmax: float32's range at any magnitude, errors of about
  1e-3 relative to the output's largest element. The reference backend's products run at XLA's
  default on the device (TF32 on NVIDIA GPUs from Ampere on, float32 on the CPU).
* ``"highest"``: ``"high"``, ``"highest"``, ``"float32"``, ``"bfloat16_3x"``,
  :attr:`jax.lax.Precision.HIGH`, :attr:`jax.lax.Precision.HIGHEST`, and the presets
  ``"BF16_BF16_F32_X3"`` / ``_X6`` / ``_X9``, ``"TF32_TF32_F32_X3"``, ``"F32_F32_F32"``,
  ``"F64_F64_F64"``. Float32-accurate: the fused kernels run every product as 3xTF32 (``"high"``
  runs like ``"highest"`` there: there is no cheaper kernel between the two), the reference
  backend's einsums run at :attr:`jax.lax.Precision.HIGHEST`.

``precision=None`` follows ``jax.config.jax_default_matmul_precision`` when the call is traced,
so ``with jax.default_matmul_precision("highest"): ...`` selects ``"highest"``. The mode is part
of the static problem (:class:`natten_jax.checks.NAProblem`): a jitted function traced at one
precision is traced again at another.

On float16 / bfloat16 (and float64) inputs the precision changes nothing: the 16-bit kernels
multiply 16-bit operands exactly in float32 accumulators, and float64 is computed in float64.
The unfused CUDA kernels (``backend="gemm"`` / ``"naive"`` of the unfused operators) compute
float32 inputs with FFMA (float32-accurate) at every precision.
"""

from __future__ import annotations

from typing import Optional

import jax

MODES = ("default", "highest")

# Names -> mode, lower case. jax.default_matmul_precision's names and the presets of
# jax.lax.DotAlgorithmPreset (their product precision decides).
_NAMES = {
    "default": "default", "fastest": "default", "bfloat16": "default",
    "tensorfloat32": "default",
    "high": "highest", "highest": "highest", "float32": "highest", "bfloat16_3x": "highest",
    # algorithm presets: fewer bits than float32 per product -> "default"
    "any_f8_any_f8_f32": "default", "any_f8_any_f8_f32_fast_accum": "default",
    "any_f8_any_f8_any": "default", "any_f8_any_f8_any_fast_accum": "default",
    "f16_f16_f16": "default", "f16_f16_f32": "default", "bf16_bf16_bf16": "default",
    "bf16_bf16_f32": "default", "tf32_tf32_f32": "default",
    # float32-accurate (or better) products -> "highest"
    "bf16_bf16_f32_x3": "highest", "bf16_bf16_f32_x6": "highest",
    "bf16_bf16_f32_x9": "highest", "tf32_tf32_f32_x3": "highest", "f32_f32_f32": "highest",
    "f64_f64_f64": "highest",
}
_LAX = {"default": jax.lax.Precision.DEFAULT, "highest": jax.lax.Precision.HIGHEST}
# The FFI attribute ``precision`` of the fused custom calls.
_CODES = {"default": 0, "highest": 1}

ACCEPTED = ("None", "'default'", "'high'", "'highest'", "'fastest'", "'bfloat16'",
            "'tensorfloat32'", "'float32'", "'bfloat16_3x'", "a jax.lax.Precision",
            "a jax.lax.DotAlgorithmPreset name")


def _from_name(name: str, what: str) -> str:
    mode = _NAMES.get(name.strip().lower())
    if mode is None:
        raise ValueError(f"`precision` must be one of {', '.join(ACCEPTED)}; got {what}.")
    return mode


def resolve(precision=None) -> str:
    """The mode (``"default"`` or ``"highest"``) of ``precision`` (module docstring).

    ``None``: ``jax.config.jax_default_matmul_precision`` now (at trace time). A
    ``jax.lax.Precision``, a string, a ``jax.lax.DotAlgorithmPreset``, or a pair of them (as
    ``jnp.einsum`` takes; both must name the same mode). Anything else: ``ValueError`` naming
    ``precision``."""
    if precision is None:
        default = jax.config.jax_default_matmul_precision
        if default is None:
            return "default"
        return _from_name(str(getattr(default, "name", default)),
                          f"jax_default_matmul_precision={default!r}")
    if isinstance(precision, jax.lax.Precision):
        return "default" if precision == jax.lax.Precision.DEFAULT else "highest"
    if isinstance(precision, str):
        return _from_name(precision, repr(precision))
    preset = getattr(jax.lax, "DotAlgorithmPreset", None)
    if preset is not None and isinstance(precision, preset):
        return _from_name(precision.name, repr(precision))
    if isinstance(precision, (tuple, list)) and len(precision) == 2:
        modes = {resolve(p) for p in precision}
        if len(modes) == 1:
            return modes.pop()
        raise ValueError(f"`precision` pairs must name one mode for both operands "
                         f"({MODES}), got {precision!r}.")
    raise ValueError(f"`precision` must be one of {', '.join(ACCEPTED)}; got "
                     f"{type(precision).__name__} {precision!r}.")


def lax_precision(mode: str) -> jax.lax.Precision:
    """The ``jax.lax.Precision`` the reference backend's einsums run at in ``mode``."""
    return _LAX[check_mode(mode)]


def einsum_precision(mode: str, dtype) -> jax.lax.Precision:
    """The ``precision=`` of a JAX product on inputs of ``dtype`` in ``mode``: ``mode``'s for
    float32 inputs, ``DEFAULT`` for the others (whose precision does not change; their
    float32 probabilities are rounded by 16-bit kernels anyway)."""
    return lax_precision(mode if matters(dtype) else "default")


def scores_precision(mode: str, dtype) -> jax.lax.Precision:
    """The ``precision=`` of a product of logits (``Q K^T``) on inputs of ``dtype`` in ``mode``,
    as the fused kernels compute them: float32-accurate (``HIGHEST``) for float32 inputs at
    every mode (``exp`` amplifies the logits' absolute error; the kernels use 3xTF32 there),
    ``DEFAULT`` for the others."""
    return lax_precision("highest" if matters(dtype) else "default")


def ffi_code(mode: str) -> int:
    """The fused custom calls' ``precision`` attribute of ``mode`` (0 default, 1 highest)."""
    return _CODES[check_mode(mode)]


def check_mode(mode: Optional[str]) -> str:
    """``mode`` if it is one of :data:`MODES` (a resolved mode), else ``ValueError``."""
    if mode not in MODES:
        raise ValueError(f"precision mode must be one of {MODES}, got {mode!r}.")
    return mode


def matters(dtype) -> bool:
    """Whether the precision changes anything for inputs of ``dtype`` (float32 only)."""
    return str(jax.numpy.dtype(dtype)) == "float32"
