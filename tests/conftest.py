"""Shared fixtures: a tiny diffusers UNet (every quantizable layer type) and seeded inputs."""

import pytest
import torch
from diffusers import UNet2DModel

TINY_UNET = dict(
    sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=4, attention_head_dim=8,
)


# fp and weight-only recipes run bf16 layers on CPUs whose oneDNN has bf16 kernels; on AVX2-only
# CPUs those layers stay emulated (test_select.py::test_without_cpu_bf16_...), so tests of the
# bf16 path itself skip there
BF16_RECIPES = ("w4a16", "fp8", "w4a8-fp")


def _cpu_bf16() -> bool:
    from lowbit.kernels.bf16 import cpu_bf16_available

    return cpu_bf16_available()


needs_cpu_bf16 = pytest.mark.skipif(not _cpu_bf16(), reason="this CPU's oneDNN has no bf16 kernels (AVX2 only)")


def bf16_params(recipes) -> list:
    """``recipes`` for ``parametrize``, those that need CPU bf16 kernels marked to skip without them."""
    return [pytest.param(*r, marks=needs_cpu_bf16) if isinstance(r, tuple) and r[0] in BF16_RECIPES else
            pytest.param(r, marks=needs_cpu_bf16) if r in BF16_RECIPES else r for r in recipes]


def make_unet(seed: int = 0, device: str | None = None) -> UNet2DModel:
    if device == "meta":
        with torch.device("meta"):
            return UNet2DModel(**TINY_UNET)
    torch.manual_seed(seed)
    return UNet2DModel(**TINY_UNET).eval()


def unet_inputs(n: int, batch: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 1000, (batch,), generator=g)) for _ in range(n)]


@pytest.fixture
def unet() -> UNet2DModel:
    return make_unet()


@pytest.fixture
def calib() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return unet_inputs(3, seed=1)


# a tiny text-conditioned UNet2DConditionModel (cross-attention to 5 context tokens of width 24,
# GEGLU feed-forward) wrapped as lowbit.zoo.sd_text's model(x, t)
TINY_TEXT_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                      attention_head_dim=2, norm_num_groups=4)


def make_text_unet(seed: int = 0, device: str | None = None):
    from diffusers import UNet2DConditionModel

    from lowbit.zoo.sd_text import TextConditioned

    with torch.device(device or "cpu"), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TextConditioned(UNet2DConditionModel(**TINY_TEXT_UNET), torch.randn(5, 24)).eval()


def text_unet_inputs(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, 4, 8, 8, generator=g), torch.randint(0, 1000, (3,), generator=g)) for _ in range(n)]
