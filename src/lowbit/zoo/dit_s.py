"""A randomly initialised DiT-S-like diffusion transformer, for speed benchmarks.

DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers") denoises latents as a
sequence of patches through transformer blocks conditioned by AdaLN-Zero on the timestep and a
class label. This is diffusers' ``DiTTransformer2DModel`` at DiT-S widths (12 blocks, hidden 384,
6 heads of 64) on 4×32×32 latents with patch 2, so 256 tokens: a Linear-dominated workload next to
the convolution-dominated UNets of ``lowbit bench``. Its weights are random (seeded): it measures
speed and numerical agreement, never image quality, so it needs no training or download.

The samplers and the benchmark call a denoiser as ``model(x, t)``. :class:`ClassConditioned`
supplies the class labels: sample ``i`` of a batch gets label ``i mod 1000``, fixed, so every
variant sees the same conditioning and the calibration inputs need no labels of their own.
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel
from torch import nn

__all__ = ["DIT_S_CONFIG", "DIT_SCHEDULER_CONFIG", "ClassConditioned", "build_dit_s"]

DIT_S_CONFIG = {
    "num_attention_heads": 6,
    "attention_head_dim": 64,
    "in_channels": 4,
    "num_layers": 12,
    "sample_size": 32,
    "patch_size": 2,
    "num_embeds_ada_norm": 1000,  # class labels 0..999 (the table has one more row: the "null" class)
}

# DiT's training schedule (ADM's linear β from 1e-4 to 0.02); used only to drive DDIM in the benchmark
DIT_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "prediction_type": "epsilon", "clip_sample": False,
}


class ClassConditioned(nn.Module):
    """``transformer(x, t, class_labels)`` as the ``model(x, t)`` the samplers call, with label
    ``i mod num_classes`` for sample ``i`` of each batch. Returns the transformer's output (its
    ``.sample`` is the noise prediction), as a diffusers UNet does."""

    def __init__(self, transformer: nn.Module, num_classes: int = 1000) -> None:
        super().__init__()
        self.transformer = transformer
        self.num_classes = num_classes

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor):
        labels = torch.arange(sample.shape[0], device=sample.device) % self.num_classes
        return self.transformer(sample, timestep, class_labels=labels)


def build_dit_s(seed: int = 0) -> ClassConditioned:
    """The benchmark DiT with seeded random weights (any device context, including meta)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ClassConditioned(DiTTransformer2DModel(**DIT_S_CONFIG)).eval()
