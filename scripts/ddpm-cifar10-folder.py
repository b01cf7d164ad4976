"""Write a diffusers DDPM pipeline folder with the architecture of the DDPM CIFAR-10 UNet (Ho et
al. 2020; the config of diffusers' ``google/ddpm-cifar10-32``: 35.7M parameters, 3×32×32,
channels 128/256/256/256, self-attention at 16×16), random weights, seed 0.

A stand-in for a user's own pixel-space DDPM, for ``lowbit bench --models`` and ``lowbit
quantize --model`` (no weights can be downloaded here; speed does not depend on them, quality
does: SQNRs measured on random weights say nothing about a trained model's images). Usage:
``.venv/bin/python scripts/ddpm-cifar10-folder.py [OUT]`` (default ``runs/ddpm-cifar10-arch``).
"""
import sys

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

out = sys.argv[1] if len(sys.argv) > 1 else "runs/ddpm-cifar10-arch"
torch.manual_seed(0)
unet = UNet2DModel(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=32, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
    attention_head_dim=None, dropout=0.0)
scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out)
print(f"wrote {out} ({sum(p.numel() for p in unet.parameters()):,} parameters)")
