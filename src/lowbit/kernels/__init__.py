"""Real low-bit execution of quantized layers (instead of dequantize-then-float emulation).

* :mod:`.select` — :func:`set_compute` picks and installs each layer's path (native int8 /
  native fp8 / bf16 / emulated), automatically per device and shape or as requested;
* :mod:`.onednn` — W8A8 Conv2d and Linear on CPU via oneDNN's integer primitives;
* :mod:`.int_mm` — W8A8 Linear via ``torch._int_mm`` (CUDA), with the exact integer reference;
* :mod:`.scaled_mm` — FP8 E4M3 Linear via ``torch._scaled_mm`` (CUDA with FP8 tensor cores);
* :mod:`.bf16` — minifloat (FP8/FP6/FP4) and weight-only layers computed in bf16 on exact values;
* :mod:`.int8_attention` — the attention matmuls (Q·Kᵀ, P·V) on int8 codes via ``torch._int_mm``
  (CPU), where they pay.
"""

from .int_mm import (
    IntMMLinearKernel,
    PreparedLinearWeight,
    linear_w8a8,
    linear_w8a8_acc,
    linear_w8a8_reference,
    linear_w8a8_reference_acc,
    prepare_linear_weight,
    quantize_activation,
)
from .select import PATHS, choose_path, set_compute

__all__ = [
    "PATHS",
    "IntMMLinearKernel",
    "PreparedLinearWeight",
    "choose_path",
    "linear_w8a8",
    "linear_w8a8_acc",
    "linear_w8a8_reference",
    "linear_w8a8_reference_acc",
    "prepare_linear_weight",
    "quantize_activation",
    "set_compute",
]
