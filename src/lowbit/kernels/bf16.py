"""bf16 compute for formats without an integer kernel: FP8/FP6/FP4 minifloats and weight-only INT.

There is no fast FP8 arithmetic on CPU (``torch._scaled_mm`` runs but is slower than fp32, and
there is no fp8 convolution; ``DESIGN.md``), while bf16 convolution and matmul run 2–3× faster
than fp32 on AVX-512 BF16 hardware. So minifloat layers keep their 1-byte codes on disk and
compute in bf16 with the *unscaled* format values:

    y[c] = s_x · s_w[c] · Σ (x/s_x)_q · w_q[c]  +  bias[c]

Every value of an ExMy format with at most 7 mantissa bits, and every integer of at most 8 bits,
is exactly representable in bf16, so the activations are exact and oneDNN accumulates in float32. The
per-channel weight scale and the activation scale are folded into the bf16 weight, so each layer
is a single bf16 convolution/GEMM with its bias; that rounds each scaled weight and each output to
bf16 (relative error ≤ 2⁻⁸, far below any 8-bit format's step). Folding needs one scale per
output channel, so group-wise weights stay emulated.

Weight-only layers (``w4a16``: no activation quantizer) run the same way with the input cast to
bf16 — the "16-bit activations" the recipe names.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..errors import FormatError
from ..quantizer import FP8_CASTS
from .onednn import disable_compiled_helpers, input_key, use_compiled_helpers

__all__ = ["Bf16Kernel", "exact_in_bf16"]


def exact_in_bf16(fmt) -> bool:
    """True if every value of ``fmt`` (unscaled) is a bf16 number (checked on the value table:
    mantissa width alone is not enough — a large exponent bias can push values below bf16's range)."""
    if fmt.kind == "int":
        return fmt.bits <= 8  # |v| <= 255 needs 8 significant bits; bf16 has 8
    v = fmt.values().float()
    return bool(torch.equal(v.to(torch.bfloat16).float(), v))


def _values_eager(x: torch.Tensor, params: torch.Tensor, fmt) -> torch.Tensor:
    # params = [s, lo, hi, zero] (float32). INT: (code − zero) = round(clamp(x·(1/s), lo, hi));
    # FP: clamp(x/s, lo, hi) rounded onto the minifloat grid — the Quantizer's own arithmetic.
    s, lo, hi = params[0], params[1], params[2]
    if fmt.kind == "int":
        v = torch.clamp(x.float() * (1.0 / s), lo, hi).round_()
    else:
        v = torch.clamp(x.float() / s, lo, hi)
        cast = FP8_CASTS.get(fmt.name)  # a hardware cast rounds exactly like fmt.round (tested)
        v = v.to(cast) if cast is not None else fmt.round(v)
    return v.to(torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _values_compiled(fmt, key):
    # one compiled function per format and input kind (dtype, rank, layout): each has its own
    # small cache, so no mix of inputs can exhaust dynamo's recompile limit
    return torch.compile(functools.partial(_values_eager, fmt=fmt), dynamic=True)


class _ActValues:
    """Unscaled format values of an activation quantizer, as bf16."""

    def __init__(self, fmt, scale: float, zero: float) -> None:
        if not exact_in_bf16(fmt):
            raise FormatError(f"{fmt.name} activations are not exact in bf16; use the emulated path")
        self.fmt = fmt
        # bounds read once here: computing them inside a compiled graph would break it
        lo, hi = (fmt.min_value - zero, fmt.max_value - zero) if fmt.kind == "int" else (fmt.min_value, fmt.max_value)
        self.params = torch.tensor([float(scale), lo, hi, float(zero)], dtype=torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if use_compiled_helpers():
            try:
                return _values_compiled(self.fmt, input_key(x))(x, self.params)
            except Exception:  # no C++ compiler: the eager path computes the same values
                disable_compiled_helpers()
        return _values_eager(x, self.params, self.fmt)


class Bf16Kernel:
    """``linear`` or ``conv2d`` in bf16: activations as exact unscaled format values, weights as
    ``bf16(w_q · s_w[c] · s_x)`` — the scales folded into the weight so that the whole layer is
    one bf16 GEMM/convolution with its bias (one rounding of each weight to bf16, relative error
    ≤ 2⁻⁸, beside the output's; both far below an 8-bit format's step).

    ``w_values`` are the unscaled weight values ``[O, ...]`` (``decode(codes) − zero``),
    ``w_scale`` ``[O]``; ``act`` is ``(fmt, scale, zero)`` or ``None`` for weight-only layers;
    ``conv`` the ``(stride, padding, dilation, groups)`` of a convolution or ``None`` for linear."""

    path = "bf16"

    def __init__(self, w_values: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 act: tuple | None, conv: tuple | None = None) -> None:
        self.act = _ActValues(*act) if act is not None else None
        s_x = float(act[1]) if act is not None else 1.0
        scale = w_scale.reshape(-1).double() * s_x
        w = w_values.double() * scale.reshape((-1,) + (1,) * (w_values.dim() - 1))
        self.w = w.to(torch.bfloat16)
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)
        self.conv = conv
        if conv is not None:
            self.w = self.w.contiguous(memory_format=torch.channels_last)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        v = self.act(x) if self.act is not None else x.to(torch.bfloat16)
        if self.conv is None:
            y = F.linear(v, self.w, self.bias)
        else:
            y = F.conv2d(v, self.w, self.bias, *self.conv)
        return y.to(x.dtype)  # bf16 in a bf16 model, float32 otherwise
