"""Paired image metrics, PSNR and SSIM (Wang et al. 2004): the quantized model's image against the
full-precision model's image from the same seed. Images are ``[N, C, H, W]`` floats, nominally in
[-1, 1] (``data_range=2``); every function returns one value per image, in float64.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import EvaluationError
from ._validate import _check_finite, _to_tensor

__all__ = ["psnr", "ssim"]


def _images(x: Any, name: str) -> torch.Tensor:
    t = _to_tensor(x, name)
    if t.ndim != 4:
        raise EvaluationError(f"{name} must be an image batch [N, C, H, W], got shape {tuple(t.shape)}: add a batch dimension with x.unsqueeze(0)")
    if t.numel() == 0:
        raise EvaluationError(f"{name} is empty (shape {tuple(t.shape)}): pass at least one non-empty image")
    t = t.to(torch.float64)
    _check_finite(t, name)
    return t


def _image_pair(a: Any, b: Any, data_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    ta, tb = _images(a, "a"), _images(b, "b")
    if ta.shape != tb.shape:
        raise EvaluationError(
            f"image batches differ in shape: a is {tuple(ta.shape)}, b is {tuple(tb.shape)}; compare images of the same seeds and size"
        )
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)) or not math.isfinite(data_range) or data_range <= 0:
        raise EvaluationError(f"data_range must be a positive finite number, got {data_range!r} (use 2.0 for images in [-1, 1])")
    return ta, tb.to(ta.device)



def psnr(a: Any, b: Any, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image: ``10 log10(L² / MSE)``, MSE over C·H·W.

    ``L = data_range`` (2 for images in [-1, 1]). Identical images give ``+inf``.
    Returns float64 [N] on the device of ``a``.
    """
    ta, tb = _image_pair(a, b, data_range)
    mse = (ta - tb).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(float(data_range) ** 2 / mse)  # mse = 0 -> L²/0 = inf -> inf


def _gaussian_1d(win_size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(win_size, dtype=dtype, device=device) - (win_size - 1) / 2
    g = torch.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def ssim(a: Any, b: Any, data_range: float = 2.0, *, win_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image, Gaussian-window version.

    With local statistics from a normalised ``win_size`` x ``win_size`` Gaussian window w
    (σ = 1.5, 11 x 11 by default): ``mu_a = w * a``, ``s_a² = w * a² - mu_a²``,
    ``s_ab = w * (ab) - mu_a mu_b`` (window-weighted, not (n-1)-corrected, as in the paper), and

        SSIM = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a² + mu_b² + C1)(s_a² + s_b² + C2)),
        C1 = (0.01 L)², C2 = (0.03 L)², L = data_range.

    Padding: **valid** (no padding) — the map is only evaluated where the window fits, as in the
    authors' MATLAB ``ssim_index`` (``filter2(..., 'valid')``) and equivalently scikit-image /
    torchmetrics, which pad and then crop (win_size-1)/2 pixels. The map is averaged per
    channel, then over channels. The filter is a separable depthwise ``conv2d`` in float64.

    Images must be at least ``win_size`` pixels in H and W; for smaller images pass a smaller
    odd ``win_size``. SSIM(x, x) is exactly 1, and SSIM is exactly symmetric.
    Returns float64 [N] on the device of ``a``.
    """
    ta, tb = _image_pair(a, b, data_range)
    if isinstance(win_size, bool) or not isinstance(win_size, (int, np.integer)) or win_size < 1 or win_size % 2 == 0:
        raise EvaluationError(f"win_size must be a positive odd integer, got {win_size!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise EvaluationError(f"sigma must be a positive finite number, got {sigma!r}")
    _, c, h, w = ta.shape
    if h < win_size or w < win_size:
        fit = min(h, w) - (1 - min(h, w) % 2)  # largest odd size that fits
        raise EvaluationError(
            f"images are {h}x{w} but the SSIM window is {win_size}x{win_size}: pass a smaller odd win_size, e.g. win_size={fit}"
        )
    g = _gaussian_1d(int(win_size), float(sigma), ta.dtype, ta.device)
    gh = g.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    gv = g.view(1, 1, -1, 1).expand(c, 1, -1, 1)

    def filt(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, gh, groups=c), gv, groups=c)

    L = float(data_range)
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    mu_a, mu_b = filt(ta), filt(tb)
    mu_aa, mu_bb, mu_ab = mu_a * mu_a, mu_b * mu_b, mu_a * mu_b
    s_aa = filt(ta * ta) - mu_aa
    s_bb = filt(tb * tb) - mu_bb
    s_ab = filt(ta * tb) - mu_ab
    smap = ((2.0 * mu_ab + c1) * (2.0 * s_ab + c2)) / ((mu_aa + mu_bb + c1) * (s_aa + s_bb + c2))
    return smap.mean(dim=(2, 3)).mean(dim=1)
