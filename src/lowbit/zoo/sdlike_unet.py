"""A larger, randomly initialised UNet with Stable-Diffusion-like widths, for speed benchmarks.

Stable Diffusion's UNet runs on 4-channel 64×64 latents with block widths 320/640/1280; this
``diffusers.UNet2DModel`` keeps the shape of that workload — 4 latent channels, widths
128/256/512, two ResNets per level, self-attention at 16×16 and 8×8 and in the mid block — at a
size one CPU core can sample in seconds (32×32 latents). Its weights are random (seeded): it
measures speed and numerical agreement, never image quality, so it needs no training or download.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

__all__ = ["SDLIKE_UNET_CONFIG", "SDLIKE_SCHEDULER_CONFIG", "build_sdlike_unet"]

SDLIKE_UNET_CONFIG = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),  # 32, 16, 8
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (128, 256, 512),
    "layers_per_block": 2,
    "attention_head_dim": 64,
    "norm_num_groups": 32,
}

# SD's scaled-linear β schedule (used only to drive DDIM in the benchmark)
SDLIKE_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "clip_sample": False,
}


def build_sdlike_unet(seed: int = 0) -> UNet2DModel:
    """The benchmark UNet with seeded random weights (any device context, including meta)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(**SDLIKE_UNET_CONFIG).eval()
