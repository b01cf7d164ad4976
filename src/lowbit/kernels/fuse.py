"""One int8 GEMM for an attention block's Q, K and V projections.

In self-attention ``to_q``, ``to_k`` and ``to_v`` read the same hidden states. Their input
quantizers are calibrated on that same tensor, so they come out identical (checked here, not
assumed) and the three layers quantize the same codes. Running them as one ``[M, K] × [K, 3N]``
oneDNN matmul quantizes the input once instead of three times and makes one call instead of three.
Each output column comes from the same int32 accumulators, scale and bias as before: the result
is bit-identical on the Zen 4 CPU and within one float32 ulp on an AMX Xeon, where oneDNN's
epilogue rounds differently for the wider matrix (tested). This is
diffusers' own ``Attention.fuse_projections`` idea, applied to the quantized kernels.

:func:`fuse_attention_projections` installs the fused kernel on each :class:`QuantAttnProcessor`
whose three projections run oneDNN Linear kernels with the same input quantizer. The layers keep a
:class:`SliceKernel` (the fused GEMM, then their columns), so a direct call of ``attn.to_q(x)``
still gives its own output; the weights are held once, in the fused kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from .._platform import trim_heap
from .onednn import Int8LinearKernel

__all__ = ["SliceKernel", "fuse_attention_projections", "unfuse_attention_projections"]


class SliceKernel:
    """Columns ``[start, stop)`` of a fused kernel's output: what one of its layers computes."""

    def __init__(self, fused: Int8LinearKernel, start: int, stop: int) -> None:
        self.fused, self.start, self.stop = fused, start, stop
        self.path = fused.path

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)[..., self.start:self.stop]


def _kernel(layer) -> Int8LinearKernel | None:
    k = getattr(layer, "kernel", None)
    return k if type(k) is Int8LinearKernel else None


def fuse_attention_projections(model: nn.Module) -> int:
    """Give every quantized self-attention block of ``model`` one fused Q/K/V kernel where its
    three projections allow it (see the module docstring); returns how many were fused. Blocks
    that do not qualify (cross-attention, emulated or bf16 projections, different quantizers)
    are left as they are. Call it after the kernels are installed (``set_compute`` does)."""
    from ..nn import QuantAttnProcessor

    fused = 0
    for attn in model.modules():
        proc = getattr(attn, "processor", None)
        if not isinstance(proc, QuantAttnProcessor) or getattr(attn, "is_cross_attention", True):
            continue
        kernels = [_kernel(getattr(attn, n, None)) for n in ("to_q", "to_k", "to_v")]
        if any(k is None for k in kernels):
            continue
        if not Int8LinearKernel.can_concat(kernels):
            continue
        qkv = Int8LinearKernel.concat(kernels)
        start = 0
        for name, k in zip(("to_q", "to_k", "to_v"), kernels):
            getattr(attn, name).kernel = SliceKernel(qkv, start, start + k.out_features)
            start += k.out_features
        proc.fused_qkv = qkv
        proc.qkv_sizes = [k.out_features for k in kernels]
        fused += 1
        del kernels, qkv
    if fused:
        trim_heap()  # the three kernels' weights are freed: give their pages back
    return fused


def unfuse_attention_projections(model: nn.Module) -> None:
    """Drop every processor's fused kernel (the layers' own kernels are reinstalled by
    ``set_compute``)."""
    from ..nn import QuantAttnProcessor

    for m in model.modules():
        if isinstance(m, QuantAttnProcessor):
            m.fused_qkv, m.qkv_sizes = None, None
