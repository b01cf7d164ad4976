"""FP8 Linear on ``torch._scaled_mm``: FP8 E4M3 weights × FP8 E4M3 activations, fp32 accumulation.

On GPUs with FP8 tensor cores (CUDA compute capability 8.9 and up: Ada, Hopper, Blackwell)
``torch._scaled_mm`` multiplies two float8 matrices and applies one scale per row of the left
operand and one per column of the right, which is exactly lowbit's FP8 layer:

    y[m, n] = s_x · s_w[n] · Σ_k v_x[m, k] · v_w[n, k]  +  bias[n]

where ``v_x = round_fp8(x / s_x)`` are the activation quantizer's unscaled values and ``v_w``
the weight's unscaled values (``decode(codes)``) — both are float8_e4m3fn numbers exactly, because
lowbit's ``fp8_e4m3`` *is* OCP E4M3FN (checked on the value table, not the name). The output is
bf16 (the layout ``_scaled_mm`` supports with per-row/column scales on CUDA), rounded once: the
same rounding as the bf16 kernel (:mod:`.bf16`), relative error ≤ 2⁻⁸.

``set_compute`` picks this path automatically only for Linear layers on such GPUs. The operator
also runs on CPU (slower than fp32 there, ``DESIGN.md``), so ``set_compute(model, "fp8")`` forces
it anywhere: that is how the numerics are tested on machines without a GPU. Convolutions have no
FP8 kernel in PyTorch and run bf16.

CUDA wants K and N multiples of 16: the weight is zero-padded once here and the activation's
columns per call (zeros add nothing); ``pad=True`` forces that layout on CPU too (tests).

Where a build's ``_scaled_mm`` takes only per-tensor scales (the CPU operator before torch 2.13:
"only supports per-tensor scaling for CPU backend"), the kernel calls it with unit scales and a
float32 output and applies the row/column scales and the bias itself: the same fp32 accumulator,
one more float32 rounding before the bf16 one. Which form a device takes is probed once with a
16×16 product (:func:`rowwise_scales_supported`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..errors import FormatError
from .bf16 import _ActValues

__all__ = ["Fp8LinearKernel", "fp8_available", "is_e4m3fn", "rowwise_scales_supported"]

_ALIGN = 16


@functools.lru_cache(maxsize=None)
def _e4m3fn_values() -> torch.Tensor:
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return torch.unique(v[torch.isfinite(v)])


def is_e4m3fn(fmt) -> bool:
    """True if ``fmt``'s finite values are exactly torch.float8_e4m3fn's."""
    if fmt is None or fmt.kind != "fp" or fmt.bits != 8 or not hasattr(torch, "float8_e4m3fn"):
        return False
    return bool(torch.equal(torch.unique(fmt.values().float()), _e4m3fn_values()))


def fp8_available(device: torch.device) -> bool:
    """FP8 tensor-core GEMM: CUDA compute capability 8.9 or newer."""
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


@functools.lru_cache(maxsize=None)
def _rowwise_probe(device_type: str, index: int | None) -> bool:
    dev = torch.device(device_type, index) if index is not None else torch.device(device_type)
    a = torch.ones(16, 16, device=dev).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1, device=dev), scale_b=torch.ones(1, 16, device=dev),
                         out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


def rowwise_scales_supported(device: torch.device) -> bool:
    """True if ``torch._scaled_mm`` on ``device`` takes per-row/per-column scales (probed once)."""
    return _rowwise_probe(device.type, device.index)


def _pad_cols(t: torch.Tensor, to: int) -> torch.Tensor:
    return t if t.shape[-1] == to else F.pad(t, (0, to - t.shape[-1]))


class Fp8LinearKernel:
    """``linear`` as one ``torch._scaled_mm``: ``w_values`` ``[N, K]`` are the unscaled E4M3
    weight values, ``w_scale`` ``[N]``, ``act`` ``(fmt, scale, zero)`` the E4M3 activation
    quantizer; call it with the float input, get the output in the input's dtype."""

    path = "native fp8 (_scaled_mm)"

    def __init__(self, w_values: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, act: tuple,
                 pad: bool | None = None) -> None:
        fmt, scale, _ = act
        if not is_e4m3fn(fmt):
            raise FormatError(f"the fp8 path needs E4M3FN activations, got {fmt.name}; use the bf16 path")
        n, k = w_values.shape
        device = w_values.device
        pad = device.type == "cuda" if pad is None else pad
        self.n, self.k = n, k
        self.kp, self.np = (-(-k // _ALIGN) * _ALIGN, -(-n // _ALIGN) * _ALIGN) if pad else (k, n)
        w = torch.zeros(self.np, self.kp, dtype=torch.float32, device=device)
        w[:n, :k] = w_values.float()
        if not torch.equal(w.to(torch.float8_e4m3fn).float(), w):
            raise FormatError("fp8 weight values are not E4M3FN numbers; use the bf16 path")
        self.w_t = w.to(torch.float8_e4m3fn).t()  # [Kp, Np], column-major as _scaled_mm wants
        s_w = torch.ones(self.np, dtype=torch.float32, device=device)
        s_w[:n] = w_scale.reshape(-1).float()
        self.s_w = s_w.reshape(1, -1)
        self.s_x = float(scale)
        # decided here, not per call: a compiled model must not trace the (cached) probe
        self.rowwise = rowwise_scales_supported(device)
        self.s_epilogue = self.s_w * self.s_x  # the fallback's scales (see the module docstring)
        self.act = _ActValues(*act, device=device)
        self.bias = None
        if bias is not None:
            b = torch.zeros(self.np, dtype=torch.bfloat16, device=device)
            b[:n] = bias.detach().to(torch.bfloat16)
            self.bias = b

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        v = self.act(x.reshape(-1, self.k))  # exact E4M3 values (as bf16)
        a = _pad_cols(v, self.kp).to(torch.float8_e4m3fn)
        if self.rowwise:
            s_x = torch.full((a.shape[0], 1), self.s_x, dtype=torch.float32, device=x.device)
            y = torch._scaled_mm(a, self.w_t, scale_a=s_x, scale_b=self.s_w, bias=self.bias,
                                 out_dtype=torch.bfloat16)
        else:  # per-tensor-only builds: unit scales, the epilogue here (see the module docstring)
            one = torch.ones((), dtype=torch.float32, device=x.device)
            acc = torch._scaled_mm(a, self.w_t, scale_a=one, scale_b=one, out_dtype=torch.float32)
            y = acc.mul_(self.s_epilogue)
            if self.bias is not None:
                y.add_(self.bias.float())
            y = y.to(torch.bfloat16)
        return y[:, : self.n].reshape(*lead, self.n).to(x.dtype)
