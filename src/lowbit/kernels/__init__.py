"""Integer kernels for quantized layers (real low-bit arithmetic instead of emulation).

:mod:`lowbit.kernels.int8_cpu` — W8A8 linear (uint8 activations with zero-point, int8
per-channel weights) on ``torch._int_mm``, with an exact reference implementation.
"""

from .int8_cpu import (
    PreparedLinearWeight,
    linear_w8a8,
    linear_w8a8_acc,
    linear_w8a8_reference,
    linear_w8a8_reference_acc,
    prepare_linear_weight,
    quantize_activation,
)

__all__ = [
    "PreparedLinearWeight",
    "linear_w8a8",
    "linear_w8a8_acc",
    "linear_w8a8_reference",
    "linear_w8a8_reference_acc",
    "prepare_linear_weight",
    "quantize_activation",
]
