"""Built-in random-initialised networks: the demo's subject until a trained model ships, and the
models behind the checkpoint-size and speed checks.

* ``toy-unet``    — a small diffusers ``UNet2DModel`` (ResNet blocks, self-attention, skip
                    concatenation), 16×16×1; exercises every quantized layer type.
* ``convnet-10m`` — ≈10M parameters of plain Conv2d and Linear layers, for the packed-size check
                    (a UNet keeps its time embedding and conv_in/conv_out in float by default,
                    which would blur what the packing itself achieves).
Weights are seeded, so every run builds the same model.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import PlanError

TOY_UNET_CONFIG = dict(
    sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8, attention_head_dim=16,
)


class ConvNet10M(nn.Module):
    """A VGG-style classifier of ≈9.6M parameters (Conv2d + Linear only)."""

    def __init__(self) -> None:
        super().__init__()
        chans = [3, 128, 256, 512, 512, 512, 512]
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, stride=2 if i in (1, 2) else 1, padding=1) for i, (a, b) in enumerate(zip(chans, chans[1:]))
        )
        self.fc1 = nn.Linear(512, 2048)
        self.fc2 = nn.Linear(2048, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


BUILTIN = ("toy-unet", "convnet-10m")


def build(name: str, seed: int = 0) -> nn.Module:
    """A built-in model by name, deterministically initialised from ``seed``, in eval mode."""
    torch.manual_seed(seed)
    if name == "toy-unet":
        from diffusers import UNet2DModel

        return UNet2DModel(**TOY_UNET_CONFIG).eval()
    if name == "convnet-10m":
        return ConvNet10M().eval()
    raise PlanError(f"unknown built-in model {name!r}: use one of {', '.join(BUILTIN)}")


def example_inputs(name: str, batches: int, batch_size: int = 8, seed: int = 1) -> list[tuple]:
    """Seeded random inputs for a built-in model: (x_t, t) pairs for the UNet (t spread over the
    1000 training timesteps, as a sampler visits them), image batches for the ConvNet."""
    g = torch.Generator().manual_seed(seed)
    if name == "toy-unet":
        return [(torch.randn(batch_size, 1, 16, 16, generator=g), torch.randint(0, 1000, (batch_size,), generator=g))
                for _ in range(batches)]
    if name == "convnet-10m":
        return [(torch.randn(batch_size, 3, 32, 32, generator=g),) for _ in range(batches)]
    raise PlanError(f"unknown built-in model {name!r}: use one of {', '.join(BUILTIN)}")


def run(model: nn.Module, inputs: tuple) -> torch.Tensor:
    """Run a built-in model on one input tuple and return a plain tensor."""
    out = model(*inputs)
    return out.sample if hasattr(out, "sample") else out
