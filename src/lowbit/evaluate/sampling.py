"""Sampling with fixed seeds, and calibration inputs recorded along the sampler's trajectory.

Samplers are diffusers schedulers: DDIM with η = 0 (Song et al. 2021) and the DPM-Solver++
multistep solver (Lu et al. 2022). Both are deterministic given the initial noise, and the initial
noise of sample i depends only on (seed, i) — it is drawn for all samples at once from one seeded
generator — so the same seed gives the same starting point for every model and any batch size.
That is what makes FID-to-FP, PSNR and SSIM against the FP model's same-seed images meaningful.

``trajectory_inputs`` runs the FP model through the sampler and records the UNet's inputs
(x_t, t) at every step: the timestep-aware calibration set of Q-Diffusion / PTQ4DM.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from torch import nn
from tqdm.auto import tqdm

from ..errors import EvaluationError

SAMPLERS = ("ddim", "dpm")


def make_scheduler(kind: str, config: dict):
    """A fresh diffusers scheduler of ``kind`` (``ddim`` or ``dpm``) for a training config."""
    if kind == "ddim":
        return DDIMScheduler(**config)
    if kind == "dpm":
        cfg = {k: v for k, v in config.items() if k not in ("clip_sample", "clip_sample_range")}
        return DPMSolverMultistepScheduler(**cfg, algorithm_type="dpmsolver++", solver_order=2)
    raise EvaluationError(f"unknown sampler {kind!r}: use one of {', '.join(SAMPLERS)}")


def initial_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The starting noise of samples 0..n-1 for ``seed`` (identical for every model)."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def _unet(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    out = model(x, t)
    return out.sample if hasattr(out, "sample") else out


@torch.no_grad()
def sample(model: nn.Module, scheduler_config: dict, *, n: int, seed: int = 0, sampler: str = "ddim",
           steps: int = 20, batch_size: int = 250, shape: tuple[int, ...] = (1, 28, 28), progress: bool = True,
           record: Callable[[torch.Tensor, torch.Tensor], None] | None = None, desc: str = "sampling") -> torch.Tensor:
    """Generate ``n`` images in [-1, 1] with a deterministic sampler from seeded noise.

    ``record(x_t, t)`` (optional) is called with the model input at every step.
    """
    if n <= 0:
        raise EvaluationError(f"sample count must be positive, got {n}; ask for at least 1 sample")
    if steps <= 0:
        raise EvaluationError(f"step count must be positive, got {steps}")
    make_scheduler(sampler, scheduler_config)  # validate the name before any work
    noise = initial_noise(n, shape, seed)
    out = torch.empty_like(noise)
    model.eval()
    bar = tqdm(total=n * steps, desc=desc, unit="img-step", disable=None if progress else True, leave=False)
    for start in range(0, n, batch_size):
        sched = make_scheduler(sampler, scheduler_config)  # schedulers are stateful: one per batch
        sched.set_timesteps(steps)
        x = noise[start:start + batch_size] * sched.init_noise_sigma
        for t in sched.timesteps:
            xin = sched.scale_model_input(x, t)
            tt = t.expand(len(x)) if t.ndim == 0 else t
            if record is not None:
                record(xin, tt)
            eps = _unet(model, xin, tt)
            x = sched.step(eps, t, x).prev_sample
            bar.update(len(x))
        out[start:start + batch_size] = x.clamp(-1, 1)
    bar.close()
    if not torch.isfinite(out).all():
        raise EvaluationError("sampling produced NaN/Inf images; the model (or its quantization) is broken")
    return out


def trajectory_inputs(model: nn.Module, scheduler_config: dict, *, n: int = 128, seed: int = 12345,
                      sampler: str = "ddim", steps: int = 20, shape: tuple[int, ...] = (1, 28, 28),
                      progress: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """UNet inputs (x_t, t) recorded at every step while the FP ``model`` samples ``n`` images:
    one calibration batch per step. The seed differs from the evaluation seeds on purpose, so
    calibration never sees the evaluation trajectories."""
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    sample(model, scheduler_config, n=n, seed=seed, sampler=sampler, steps=steps, batch_size=n, shape=shape,
           progress=progress, record=lambda x, t: batches.append((x.clone(), t.clone())), desc="recording calibration inputs")
    return batches
