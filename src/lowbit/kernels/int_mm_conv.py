"""W8A8 Conv2d on ``torch._int_mm``: the int8 convolution of the CUDA path, as one im2col GEMM.

PyTorch exposes no int8 convolution on CUDA for plain tensors, so until this kernel the CUDA
path ran every convolution in bf16. In a UNet the convolutions carry almost all of the work
(SD-like UNet: 32.5 of 35.5 GMAC per step), so W8A8 could not beat bf16 there however fast its
Linears were. This kernel lowers a ``groups=1`` convolution to a single int8 GEMM, the classic
im2col lowering (Chellapilla et al., 2006; what cuDNN's ``IMPLICIT_GEMM`` computes without
materialising the matrix):

1. the input is quantized once, in NHWC, to ``a = q_x − 128`` (int8; the same arithmetic as
   :func:`lowbit.kernels.int_mm.linear_w8a8_acc`);
2. it is padded spatially with ``z_x − 128``, the code of 0.0, so a padded tap contributes
   exactly nothing once the zero-point correction is applied;
3. the ``kh·kw`` shifted (strided, dilated) windows are written side by side along the
   channels into the GEMM operand ``[N·Ho·Wo, kh·kw·C]`` — one pass, already zero-padded to the
   alignment ``_int_mm`` needs on CUDA (M > 16, K a multiple of 8);
4. ``torch._int_mm`` against the weight laid out ``[(i, j, c), O]``, the zero-point correction
   ``(128 − z_x)·Σ w`` and the float epilogue ``acc · s_x · s_w[o] + bias[o]``, back to NCHW.

The int32 accumulator equals the exact convolution of ``q_x − z_x`` with the weight codes
(tested against a float64 convolution, which is exact at these magnitudes), so the output agrees
with the oneDNN kernel and the emulated layer up to float32 rounding of the epilogue. The
operand costs ``kh·kw`` bytes per input code (9× for 3×3: at SD's 64×64 latents, batch 2, 320
channels, 24 MB) — the price of using the GEMM library rather than writing a convolution
kernel. On the CPU oneDNN's direct int8 convolution is faster and is what ``auto`` picks; the
CPU runs this kernel only in the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import FormatError
from .int_mm import _MIN_M, _check_zero, _inv_scale, codes_minus_128, prepare_linear_weight

__all__ = ["IntMMConv2dKernel"]


class IntMMConv2dKernel:
    """A QuantConv2d's W8A8 compute on ``torch._int_mm`` (uint8 activations, ``groups=1``).

    ``w_int8`` holds the integer weight values ``[O, C, kh, kw]``, ``w_scale`` ``[O]``; ``x_scale``
    and ``x_zero`` are the input quantizer's (uint8, per tensor); ``stride``, ``padding`` (symmetric,
    zeros), ``dilation`` as in ``nn.Conv2d``. ``pad=None`` pads the GEMM operands only where
    ``_int_mm`` needs it (non-CPU devices); ``True`` forces that layout on the CPU (tests)."""

    path = "native int8 (_int_mm)"

    def __init__(self, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, x_scale: float,
                 x_zero: int, stride=(1, 1), padding=(0, 0), dilation=(1, 1), pad: bool | None = None) -> None:
        if w_int8.dtype != torch.int8 or w_int8.dim() != 4:
            raise FormatError(f"conv weight codes must be int8 [O, C, kh, kw], got {w_int8.dtype} {tuple(w_int8.shape)}")
        self.out_channels, self.in_channels, kh, kw = w_int8.shape
        self.kernel_size = (kh, kw)
        self.stride, self.padding, self.dilation = (tuple(int(v) for v in a) for a in (stride, padding, dilation))
        # K ordered (i, j, c): tap-major, channels contiguous, the order the windows are written in
        self.weight = prepare_linear_weight(w_int8.permute(0, 2, 3, 1).reshape(self.out_channels, -1), pad)
        self.w_scale = w_scale.reshape(-1).float().contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.x_zero = _check_zero(x_zero)
        self.inv_scale = _inv_scale(x_scale, w_int8.device)
        self.x_scale = torch.as_tensor(float(x_scale), dtype=torch.float32, device=w_int8.device)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """Spatial size of the output for an ``h × w`` input (as ``nn.Conv2d`` computes it)."""
        return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                     zip((h, w), self.padding, self.dilation, self.kernel_size, self.stride))

    def _operand(self, x: torch.Tensor) -> tuple[torch.Tensor, int, tuple[int, int, int]]:
        """The GEMM's int8 left operand ``[M (padded), K (padded)]``, the real M, and (N, Ho, Wo)."""
        n, c, h, w = x.shape
        if c != self.in_channels:
            raise FormatError(f"input has {c} channels, the convolution expects {self.in_channels}")
        z = self.x_zero
        a = codes_minus_128(x.permute(0, 2, 3, 1), self.inv_scale, z)  # NHWC
        (ph, pw), (sh, sw), (dh, dw), (kh, kw) = self.padding, self.stride, self.dilation, self.kernel_size
        if ph or pw:
            a = F.pad(a, (0, 0, pw, pw, ph, ph), value=z - 128)  # the code of 0.0
        ho, wo = self.output_size(h, w)
        m = n * ho * wo
        kp = self.weight.w_t.shape[0]
        k = kh * kw * c
        mp = max(m, _MIN_M) if self.weight.padded else m
        if (kh, kw, sh, sw) == (1, 1, 1, 1) and mp == m and kp == k:
            return a.reshape(m, k), m, (n, ho, wo)  # a 1×1 convolution is the GEMM already
        buf = torch.zeros(mp, kp, dtype=torch.int8, device=x.device) if (mp != m or kp != k) else \
            torch.empty(m, k, dtype=torch.int8, device=x.device)
        cols = buf[:m].view(n, ho, wo, kp)
        for i in range(kh):
            for j in range(kw):
                t = i * kw + j
                cols[..., t * c:(t + 1) * c] = a[:, i * dh: i * dh + sh * (ho - 1) + 1: sh,
                                                 j * dw: j * dw + sw * (wo - 1) + 1: sw, :]
        return buf, m, (n, ho, wo)

    def acc(self, x: torch.Tensor) -> torch.Tensor:
        """The int32 accumulator ``Σ (q_x − z_x) · w`` as ``[N, Ho, Wo, O]``."""
        buf, m, (n, ho, wo) = self._operand(x)
        acc = torch._int_mm(buf, self.weight.w_t)[:m, :self.out_channels]
        if self.x_zero != 128:
            acc = acc + (128 - self.x_zero) * self.weight.colsum
        return acc.reshape(n, ho, wo, self.out_channels)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.acc(x).float().mul_(self.x_scale * self.w_scale)
        if self.bias is not None:
            out.add_(self.bias)
        # NCHW and contiguous, like every other kernel's eager output (diffusers views its tensors)
        return out.permute(0, 3, 1, 2).to(x.dtype, memory_format=torch.contiguous_format)
