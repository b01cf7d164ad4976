"""What oneDNN's u8×s8 integer kernels compute exactly on this CPU, and the weight split that
keeps them exact where they would not be.

On CPUs with VNNI (AVX-512 VNNI, AVX-VNNI) or AMX, oneDNN multiplies uint8 activations by int8
weights and accumulates in int32: exact. Without VNNI (e.g. AMD Zen 3, Intel before Cascade
Lake) its AVX2/AVX-512 kernels use ``vpmaddubsw``, which adds each *pair* of adjacent
u8·s8 products in saturating int16: a pair of 255·127 products (64 770) clips at 32 767, and a
W8A8 convolution comes out wrong by thousands of output steps (measured on a Zen 3 EPYC:
SQNR 13.6 dB against the integer reference). oneDNN's documentation ("Nuances of int8
computations") calls this the saturation problem and leaves it to the user.

A pair cannot saturate when ``2 · max code · max |w| ≤ 32767``: 4-bit weights (|w| ≤ 8) never
do. For 8-bit weights we split each weight into halves ``floor(w/2) + ceil(w/2)`` (both
|·| ≤ 64, so a pair is at most 2·255·64 = 32 640) and feed the layer's codes twice: one call
with a doubled reduction ``[x, x] · [⌊w/2⌋, ⌈w/2⌉]ᵀ``, the same int32 sums as ``x · wᵀ``, and the
same fused epilogue — exact, at twice the integer work (still faster than fp32 there:
1.1–1.4× at SD-like shapes, measured). Which case this CPU is in is *probed*, not guessed
from CPU flags: one worst-case product through the very operators the kernels call.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["duplicate_channels", "duplicate_columns", "needs_split", "pair_limit", "split_weight",
           "unsplit_weight"]

_INT16_MAX = 32767


def _linear(a: int, w: int, k: int) -> tuple[float, float]:
    x = torch.full((16, k), a, dtype=torch.uint8)
    packed = torch.ops.onednn.qlinear_prepack(torch.full((16, k), w, dtype=torch.int8), [16, k])
    y = torch.ops.onednn.qlinear_pointwise(x, 1.0, 0, packed, torch.ones(16), torch.zeros(16, dtype=torch.int64),
                                           None, 1.0, 0, torch.float32, "none", [], "")
    return float(y.max()), float(y.min())


def _conv(a: int, w: int, c: int) -> tuple[float, float]:
    x = torch.full((1, c, 8, 8), a, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    args = ([1, 1], [0, 0], [1, 1], 1)
    packed = torch.ops.onednn.qconv_prepack(torch.full((16, c, 3, 3), w, dtype=torch.int8), torch.ones(16), 1.0, 0,
                                            *args, [1, c, 8, 8])
    y = torch.ops.onednn.qconv2d_pointwise(x, 1.0, 0, packed, torch.ones(16), torch.zeros(16, dtype=torch.int64),
                                           None, *args, 1.0, 0, torch.float32, "none", [], "")
    return float(y.max()), float(y.min())


def _exact(a: int, w: int) -> bool:
    # sums below 2^24, so the float32 outputs hold them exactly; saturation would be far off
    k, c = 256, 32
    return (_linear(a, w, k) == (a * w * k,) * 2) and (_conv(a, w, c) == (a * w * c * 9,) * 2)


@functools.lru_cache(maxsize=1)
def pair_limit() -> int | None:
    """``None`` where oneDNN's u8×s8 kernels are exact for all codes (VNNI, AMX); ``32767`` where
    adjacent products are summed in saturating int16 (the int8 kernels then split 8-bit
    weights); ``0`` where even split weights come out wrong (the int8 path is then unusable).
    Probed once per process on the oneDNN operators themselves (a few ms)."""
    try:
        if _exact(255, 127) and _exact(255, -128):
            return None
        return _INT16_MAX if _exact(255, 64) and _exact(255, -64) else 0
    except (RuntimeError, AttributeError):
        return 0


def needs_split(w_int8: torch.Tensor, max_code: int) -> bool:
    """True if a layer with these int8 weight values and activation codes up to ``max_code``
    could saturate a pair on this CPU, so its kernel must run the split weight."""
    limit = pair_limit()
    if limit is None or w_int8.numel() == 0:
        return False
    return 2 * int(max_code) * int(w_int8.abs().max()) > limit


def split_weight(w_int8: torch.Tensor) -> torch.Tensor:
    """``[⌊w/2⌋, ⌈w/2⌉]`` side by side along dim 1 (the input channels). Row by row, so a grouped
    convolution's weight ``[O, C/G, ...]`` splits the same way: group g then reads input channels
    ``[x_g, x_g]`` (see :func:`duplicate_channels`)."""
    lo = torch.div(w_int8, 2, rounding_mode="floor")
    return torch.cat([lo, w_int8 - lo], 1)  # ceil(w/2) in [-63, 64]: fits int8


def unsplit_weight(w_split: torch.Tensor) -> torch.Tensor:
    """The int8 values a split weight ``[O, 2K, ...]`` stands for."""
    k = w_split.shape[1] // 2
    return (w_split[:, :k].to(torch.int16) + w_split[:, k:]).to(torch.int8)


def duplicate_channels(codes: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """NHWC uint8 codes ``[N, C, H, W]`` -> ``[N, 2C, H, W]`` (channels-last) with each group's
    channels written twice in a row, the input layout of a :func:`split_weight` convolution."""
    n, c, h, w = codes.shape
    nhwc = codes.permute(0, 2, 3, 1).reshape(n, h, w, groups, 1, c // groups)
    out = nhwc.expand(n, h, w, groups, 2, c // groups).reshape(n, h, w, 2 * c)
    return out.permute(0, 3, 1, 2)


def duplicate_columns(codes: torch.Tensor) -> torch.Tensor:
    """``[M, K]`` codes -> ``[M, 2K]`` = ``[x, x]``, the input of a split Linear."""
    return torch.cat([codes, codes], 1)
