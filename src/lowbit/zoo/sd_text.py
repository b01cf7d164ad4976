"""A text-conditioned UNet with Stable Diffusion 1.x's structure at reduced widths, for benchmarks.

Stable Diffusion's denoiser is diffusers' ``UNet2DConditionModel``: four levels of two ResNets,
a ``Transformer2DModel`` after each ResNet of the first three levels (self-attention,
cross-attention to the prompt's text-encoder states, a GEGLU feed-forward), none at the last
level, and a cross-attention mid block. This is that architecture with widths 128/256/512/512
instead of 320/640/1280/1280, 64-wide attention heads, on 4×32×32 latents (142M parameters),
so one CPU core samples it in seconds. Unlike ``zoo.sdlike_unet`` (a ``UNet2DModel``: no
cross-attention, no feed-forward) it exercises the layers a text-to-image UNet adds: the
cross-attention K/V projections that read 77 text tokens of width 768 and GEGLU's ``Linear``
to twice the inner width.

Its weights are random (seeded) and so is the "prompt": one fixed ``[77, 768]`` table of N(0, 1)
values standing in for CLIP ViT-L's text states, shared by every sample. It measures speed and
numerical agreement, never image or prompt fidelity, and needs no download. Its noise
prediction has std ≈ 0.35 instead of 1, so DDIM's latents grow (std 1 → 5.4 in five steps,
seed 0); nothing is clipped, so the benchmark's SQNRs still compare every value. (Real CLIP states
have a start token whose values are far larger than the rest, which MixDQ quantizes apart; a
Gaussian table does not model that.)

:class:`TextConditioned` turns ``unet(x, t, encoder_hidden_states)`` into the ``model(x, t)``
the samplers and the benchmark call.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import nn

__all__ = ["SD_TEXT_CONFIG", "SD_TEXT_SCHEDULER_CONFIG", "TextConditioned", "build_sd_text"]

SD_TEXT_CONFIG = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),  # 32, 16, 8, 4
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,  # CLIP ViT-L/14's width, as in SD 1.x
    # diffusers' legacy name: for UNet2DConditionModel this is the number of heads per level
    "attention_head_dim": (2, 4, 8, 8),  # 64-wide heads
    "norm_num_groups": 32,
}
TEXT_TOKENS, TEXT_WIDTH = 77, 768

# SD's scaled-linear β schedule (used only to drive DDIM in the benchmark)
SD_TEXT_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "clip_sample": False,
}


class TextConditioned(nn.Module):
    """``unet(x, t, encoder_hidden_states=context)`` as ``model(x, t)``, with one fixed
    ``[tokens, width]`` context (a buffer, saved with the model) broadcast over the batch.
    Returns the UNet's output (its ``.sample`` is the noise prediction)."""

    def __init__(self, unet: nn.Module, context: torch.Tensor) -> None:
        super().__init__()
        self.unet = unet
        self.register_buffer("context", context)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor):
        ctx = self.context.to(sample.dtype).expand(sample.shape[0], *self.context.shape)
        return self.unet(sample, timestep, encoder_hidden_states=ctx)


def build_sd_text(seed: int = 0) -> TextConditioned:
    """The benchmark text-conditioned UNet with seeded random weights and prompt table (any
    device context, including meta)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD_TEXT_CONFIG).eval()
        context = torch.randn(TEXT_TOKENS, TEXT_WIDTH)
        return TextConditioned(unet, context).eval()
