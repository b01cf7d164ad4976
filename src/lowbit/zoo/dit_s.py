"""A randomly initialised DiT-S-like diffusion transformer, for speed benchmarks.

DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers") denoises latents as a
sequence of patches through transformer blocks conditioned by AdaLN-Zero on the timestep and a
class label. This is diffusers' ``DiTTransformer2DModel`` at DiT-S widths (12 blocks, hidden 384,
6 heads of 64) on 4×32×32 latents with patch 2, so 256 tokens: a Linear-dominated workload next to
the convolution-dominated UNets of ``lowbit bench``. Its weights are random (seeded): it measures
speed and numerical agreement, never image quality, so it needs no training or download.

A DiT with *all* its weights random is not a denoiser: its noise prediction is unrelated to
``x_t``, so DDIM's ``x_0`` estimate ``(x_t − √(1−ᾱ)·ε)/√ᾱ`` runs away (latent std 1 → 30 in five
steps, 97 % of the final values clipped at ±1), and the benchmark's image SQNRs would compare
clipped saturation, amplified first-step errors and nothing else. So one layer is fitted: the
output projection ``proj_out_2`` is solved by ridge least squares to predict the noise ε of
``x_t = √ᾱ·x_0 + √(1−ᾱ)·ε`` for Gaussian "data" ``x_0 ~ N(0, 0.5²)`` at uniform random t, from the
features the random network computes (the last layer of a trained DiT does this on its own
features; here R² ≈ 0.85 on held-out draws). The trajectory then stays near std 1–1.6 and most
final values unclipped (``tests/zoo/test_dit_s.py``). Every other weight keeps its random init.

The samplers and the benchmark call a denoiser as ``model(x, t)``. :class:`ClassConditioned`
supplies the class labels: sample ``i`` of a batch gets label ``i mod 1000``, fixed, so every
variant sees the same conditioning and the calibration inputs need no labels of their own.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel
from torch import nn

__all__ = ["DIT_S_CONFIG", "DIT_SCHEDULER_CONFIG", "ClassConditioned", "build_dit_s", "fit_readout"]

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


def _patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    # (n, c, H, W) -> (n, tokens, p·p·c) in the order DiT's unpatchify reads proj_out_2's outputs
    n, c, h, w = x.shape
    return x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(n, -1, p * p * c)


@torch.no_grad()
def fit_readout(model: ClassConditioned, *, n: int = 32, data_std: float = 0.5, ridge: float = 1e-3,
                seed: int = 1, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias for ``model.transformer.proj_out_2`` that predict the noise of Gaussian
    data from the network's own final features: ridge least squares over ``n`` noised draws
    ``x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε`` (``x_0 ~ N(0, data_std²)``, t uniform on DiT's schedule). Solved
    in float64 with ``torch.linalg.solve``; the ridge term is ``ridge`` × the row count."""
    tr = model.transformer
    c, size, p = tr.config.in_channels, tr.config.sample_size, tr.config.patch_size
    abar = DDIMScheduler(**DIT_SCHEDULER_CONFIG).alphas_cumprod
    g = torch.Generator().manual_seed(seed)
    x0 = data_std * torch.randn(n, c, size, size, generator=g)
    eps = torch.randn(n, c, size, size, generator=g)
    t = torch.randint(0, len(abar), (n,), generator=g)
    a = abar[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    feats: list[torch.Tensor] = []
    hook = tr.proj_out_2.register_forward_hook(lambda mod, args, out: feats.append(args[0].double()))
    try:
        for k in range(0, n, batch_size):
            model(xt[k:k + batch_size], t[k:k + batch_size])
    finally:
        hook.remove()
    f = torch.cat(feats).reshape(-1, tr.proj_out_2.in_features)
    a1 = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1)
    y = _patchify(eps, p).reshape(len(f), -1).double()
    sol = torch.linalg.solve(a1.T @ a1 + ridge * len(a1) * torch.eye(a1.shape[1], dtype=a1.dtype), a1.T @ y)
    return sol[:-1].T.float().contiguous(), sol[-1].float().contiguous()


@lru_cache(maxsize=4)
def _fitted_readout(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # the benchmark builds the model once per variant: fit once per process (about 5 s on 2 cores)
    with torch.device("cpu"):
        return fit_readout(_random_dit_s(seed))


def _random_dit_s(seed: int) -> ClassConditioned:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ClassConditioned(DiTTransformer2DModel(**DIT_S_CONFIG)).eval()


def build_dit_s(seed: int = 0) -> ClassConditioned:
    """The benchmark DiT: seeded random weights with the fitted noise readout (:func:`fit_readout`).
    Under a meta device context it builds the architecture only (for loading checkpoints)."""
    model = _random_dit_s(seed)
    proj = model.transformer.proj_out_2
    if proj.weight.device.type != "meta":
        w, b = _fitted_readout(seed)
        with torch.no_grad():
            proj.weight.copy_(w)
            proj.bias.copy_(b)
    return model
