"""A transformer feed-forward block as two int8 GEMMs, GELU and requantization fused into the first.

diffusers' ``FeedForward`` (DiT, PixArt, the transformer blocks of SD's UNet use it with GELU)
is ``Linear → GELU → Linear``. Run layer by layer, the first GEMM writes its float output, then a
separate pass computes GELU and quantizes it for the second GEMM. On the Zen 4 CPU that pass costs
more than the GEMM before it: in a compiled DiT-S step, inductor's tanh-GELU + quantization loop
ran at 2.2–2.9 ns per element, 41 ms of a 246 ms step (torch.profiler), because it evaluates tanh
element by element. oneDNN's matmul can apply GELU (``erf`` or ``tanh``) and quantize its output in
its epilogue, vectorised, while the tile is still in registers: ``qlinear_pointwise`` with post-op
``gelu`` and the second layer's input scale and zero-point as its output scale, uint8 output.
Measured at the DiT-S shape (1024×384 → 1536, one thread): 3.4 ms for the plain GEMM with bf16
output, 4.2 ms for GEMM + GELU + uint8 codes, against 3.4 + 5.1 ms as two passes.

The codes it writes are the second layer's input codes, computed from the float32 epilogue value
instead of the bf16-rounded layer output (so, if anything, closer to the exact value); against the
layer-by-layer codes they differ by at most one code, where a value lies at a rounding boundary
(tested). This is the same "linear + unary post-op + quantized output" fusion PyTorch's PT2E
lowering asks oneDNN for (``torch/_inductor/fx_passes/quantization.py``).

:func:`fuse_gelu_feed_forwards` replaces each qualifying ``FeedForward`` with a
:class:`GeluFeedForward` that holds the same ``net`` (so parameter names and the per-layer report
are unchanged); :func:`unfuse_gelu_feed_forwards` puts the originals back.
"""

from __future__ import annotations

import torch
from torch import nn

from . import vnni
from .onednn import Int8LinearKernel, register, run_op

__all__ = ["GeluCodesKernel", "GeluFeedForward", "fuse_gelu_feed_forwards", "unfuse_gelu_feed_forwards"]

_GELU_ALGORITHMS = {"none": "none", "tanh": "tanh"}  # diffusers' GELU.approximate -> oneDNN's gelu algorithm


class GeluCodesKernel:
    """``fc1``'s oneDNN GEMM with GELU and the next layer's input quantization in its epilogue:
    ``[M, K]`` uint8 codes in, ``[M, N]`` uint8 codes (for the quantizer ``next_act``) out. It shares
    ``fc1``'s packed weight, so the layer itself still computes its own output when called alone."""

    path = Int8LinearKernel.path

    def __init__(self, fc1: Int8LinearKernel, next_act, approximate: str) -> None:
        self.fc1, self.next_act = fc1, next_act
        self.algorithm = _GELU_ALGORITHMS[approximate]
        self.kid = register(self)

    def run(self, codes: torch.Tensor, nhwc: bool = False) -> torch.Tensor:
        k = self.fc1
        k.repack_for(tuple(codes.shape))
        q = vnni.duplicate_columns(codes) if k.split else codes.contiguous()
        # output_scale/zero-point: oneDNN writes round(gelu(y) / scale) + zero, saturated to
        # uint8, which is the next quantizer's arithmetic when its codes span all of 0..255
        return torch.ops.onednn.qlinear_pointwise(q, k.act.scale, k.act.zero, k.packed, k.w_scale, k.w_zero, k.bias,
                                                   self.next_act.scale, self.next_act.zero, None, "gelu", [],
                                                   self.algorithm)

    def fake(self, codes: torch.Tensor, nhwc: bool = False) -> torch.Tensor:
        return codes.new_empty((codes.shape[0], self.fc1.out_features), dtype=torch.uint8)


class GeluFeedForward(nn.Module):
    """A diffusers ``FeedForward`` (``GELU(proj) → Dropout → Linear [→ Dropout]``) whose two
    Linears run as :class:`GeluCodesKernel` then the second layer's kernel. It registers the
    original's ``net`` under the same name, so parameter names are unchanged; in training mode it
    runs ``net`` layer by layer, as the original does."""

    def __init__(self, original: nn.Module, gelu_codes: GeluCodesKernel, fc2: Int8LinearKernel) -> None:
        super().__init__()
        self.net = original.net
        # plain attributes, not submodules: the original shares ``net`` and must not be a second owner
        self.__dict__.update(_original=original, gelu_codes=gelu_codes, fc2=fc2)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.training:  # dropout active: the layers one by one
            for m in self.net:
                hidden_states = m(hidden_states)
            return hidden_states
        k1 = self.gelu_codes.fc1
        lead = hidden_states.shape[:-1]
        codes = run_op(k1.act(hidden_states.reshape(-1, k1.in_features)), self.gelu_codes.kid, False)
        y = run_op(codes, self.fc2.kid, False).reshape(*lead, self.fc2.out_features)
        return y if y.dtype == hidden_states.dtype else y.to(hidden_states.dtype)


def _int8_kernel(layer) -> Int8LinearKernel | None:
    k = getattr(layer, "kernel", None)
    return k if type(k) is Int8LinearKernel else None


def _fusable(ff: nn.Module) -> tuple[Int8LinearKernel, Int8LinearKernel, str] | None:
    net = list(getattr(ff, "net", []))
    if type(ff).__name__ != "FeedForward" or len(net) not in (3, 4):
        return None
    gelu, fc2 = net[0], net[2]
    if type(gelu).__name__ != "GELU" or getattr(gelu, "approximate", None) not in _GELU_ALGORITHMS:
        return None
    if not all(isinstance(d, nn.Dropout) for d in [net[1], *net[3:]]):
        return None
    k1, k2 = _int8_kernel(getattr(gelu, "proj", None)), _int8_kernel(fc2)
    if k1 is None or k2 is None or k1.out_features != k2.in_features:
        return None
    # oneDNN saturates its output to 0..255: the next quantizer's clamp only if its codes span that
    if k2.act.lo + k2.act.zero != 0 or k2.act.max_code != 255:
        return None
    return k1, k2, gelu.approximate


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    (model.get_submodule(parent) if parent else model)._modules[attr] = new


def fuse_gelu_feed_forwards(model: nn.Module) -> int:
    """Replace every ``FeedForward`` of ``model`` whose two Linears run oneDNN int8 kernels (the
    second with a full-range 8-bit input quantizer) by a :class:`GeluFeedForward`; returns how
    many. Call it after the kernels are installed (``set_compute`` does)."""
    fused = 0
    for name, ff in list(model.named_modules()):
        found = _fusable(ff) if name else None
        if found is not None:
            k1, k2, approximate = found
            _replace(model, name, GeluFeedForward(ff, GeluCodesKernel(k1, k2.act, approximate), k2))
            fused += 1
    return fused


def unfuse_gelu_feed_forwards(model: nn.Module) -> None:
    """Put back every original ``FeedForward`` that :func:`fuse_gelu_feed_forwards` replaced."""
    for name, m in list(model.named_modules()):
        if isinstance(m, GeluFeedForward):
            _replace(model, name, m._original)
