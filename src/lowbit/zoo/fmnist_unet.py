"""The bundled Fashion-MNIST model: a small ε-prediction pixel-space DDPM UNet.

Architecture (``diffusers.UNet2DModel``, DDPM-style UNet of Ho et al. 2020): ResNet blocks with
GroupNorm + SiLU and a sinusoidal timestep embedding, resolutions 28→14→7, self-attention at the
lowest resolution (7×7) and in the mid block, skip connections concatenated in the decoder.
1,540,681 parameters.

Why this config (measured on one CPU thread, batch 64, AdamW step incl. backward, bf16 autocast):

=====================  ==========  ======  ==========================================
block_out_channels     per block   params  ms/step
=====================  ==========  ======  ==========================================
(32, 64, 64) + attn14  2 resnets   1.62M   ~760  (attention at 14×14 too; fp32: ~1670)
(32, 64, 96)           1 resnet    1.81M   ~605
(16, 32, 128)          1 resnet    2.22M   ~510  (80% of weights at 7×7, 16 ch at full res)
**(24, 48, 96)**       1 resnet    1.54M   ~530  ← chosen
=====================  ==========  ======  ==========================================

Convolution backward at 28×28 and 14×14 dominates the step time, so the cheap way to stay in the
1–2.5M parameter range is narrow high-resolution levels, one ResNet per down level (the decoder
gets two, as diffusers always adds one) and no attention at 14×14 (196 tokens). (24, 48, 96) is
as fast as the lopsided (16, 32, 128) while keeping a sensible width at full resolution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

#: ``UNet2DModel(**FMNIST_UNET_CONFIG)`` rebuilds the bundled model.
FMNIST_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 28,
    "in_channels": 1,
    "out_channels": 1,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),  # 28, 14, 7
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),  # 7, 14, 28
    "block_out_channels": (24, 48, 96),
    "layers_per_block": 1,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "attention_head_dim": 32,  # 3 heads at 96 channels
    "norm_num_groups": 8,  # divides 24, 48 and 96
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,  # attention in the mid block
    "dropout": 0.0,
}

#: Noise schedule of Ho et al. 2020 (linear betas 1e-4..0.02 over 1000 steps, ε-prediction).
#: Valid for both ``DDPMScheduler`` and ``DDIMScheduler``.
FMNIST_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
}

#: Number of parameters of the model built from :data:`FMNIST_UNET_CONFIG`.
FMNIST_UNET_NUM_PARAMS = 1_540_681


def build_fmnist_unet() -> UNet2DModel:
    """Build the bundled UNet with random initialisation (load weights separately)."""
    return UNet2DModel(**FMNIST_UNET_CONFIG)


def build_fmnist_scheduler(kind: str = "ddpm") -> DDPMScheduler | DDIMScheduler:
    """Build the training/sampling scheduler: ``"ddpm"`` (ancestral) or ``"ddim"``."""
    if kind == "ddpm":
        return DDPMScheduler(**FMNIST_SCHEDULER_CONFIG)
    if kind == "ddim":
        return DDIMScheduler(**FMNIST_SCHEDULER_CONFIG)
    from lowbit.errors import PlanError

    raise PlanError(f"unknown scheduler kind {kind!r}; use 'ddpm' or 'ddim'")


#: The shipped EMA weights (fp16 safetensors with the configs in the metadata).
WEIGHTS_PATH = Path(__file__).with_name("fmnist_unet.safetensors")


def load_fmnist_unet(path: "str | Path | None" = None) -> UNet2DModel:
    """The bundled, trained Fashion-MNIST UNet in fp32 eval mode (built on the meta device, then
    the weights are assigned, so nothing is initialised twice)."""
    import json

    from lowbit.errors import CheckpointError
    from lowbit.io import read_safetensors

    path = Path(path) if path is not None else WEIGHTS_PATH
    fix = "reinstall lowbit, or train and export the weights with `lowbit train` and `python -m lowbit.zoo.ship`"
    meta, tensors = read_safetensors(path, "bundled model weights", fix)
    state = {k: v.float() for k, v in tensors.items()}
    try:
        config = json.loads(meta["config"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path} has no model config in its metadata (not a lowbit EMA export); {fix}") from None
    if config != json.loads(json.dumps(FMNIST_UNET_CONFIG)):
        raise CheckpointError(f"{path} holds a model with another configuration than the bundled UNet;"
                              " load it with UNet2DModel(**config) instead")
    with torch.device("meta"):
        model = build_fmnist_unet()
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit the bundled UNet ({str(e).splitlines()[0][:120]})") from None
    model.lowbit_train_step = int(meta.get("step", -1))
    return model.eval()


if __name__ == "__main__":
    model = build_fmnist_unet()
    print(f"FMNIST UNet: {sum(p.numel() for p in model.parameters()):,} parameters")
