"""The training loop: DDPM ε-prediction with AdamW, EMA, deterministic data order, resumability.

Also holds the hyperparameter defaults and why they were chosen; checkpoints are written and
restored through :mod:`lowbit.train.checkpoint`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lowbit.data import load_fashion_mnist, to_model_range
from lowbit.errors import CheckpointError, LowbitError
from lowbit.zoo.fmnist_unet import (
    FMNIST_SCHEDULER_CONFIG,
    build_fmnist_scheduler,
    build_fmnist_unet,
)

from .checkpoint import CHECKPOINT_NAME, _restore, _write_ema_fp16, save_checkpoint

LOG_NAME = "train_log.jsonl"

# Defaults chosen for a short CPU budget (tens of thousands of steps, not the 800k of DDPM):
# - lr 1e-3 (5x the paper's 2e-4): a 1.5M-parameter UNet at batch 64 tolerates it and converges
#   much faster; the 500-step linear warmup keeps Adam's first, badly-estimated updates small;
#   gradient clipping at 1.0 catches the occasional spike at high-noise timesteps.
# - weight decay 0: the model is small and underfits this budget; decay would only bias it.
# - EMA 0.999 (horizon ~1000 steps, ~10 min on one CPU thread): 0.9999 would average over ~10k
#   steps and lag far behind a model that is still improving quickly.
DEFAULT_LR = 1e-3
DEFAULT_WARMUP_STEPS = 500
DEFAULT_WEIGHT_DECAY = 0.0
DEFAULT_EMA_DECAY = 0.999
DEFAULT_GRAD_CLIP = 1.0
# Random horizontal flips are OFF: every shoe class (sandal, sneaker, ankle boot) faces left in
# Fashion-MNIST, so flipping would teach the model right-facing shoes that the data (and any
# FID against the test set) never contains, while the symmetric garments gain nothing from it.


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for the forward pass, or None for plain fp32.

    bf16 autocast is ~1.7x faster on CPUs with AMX (measured on one thread) and on recent GPUs;
    weights, optimizer state, EMA and the loss stay fp32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise LowbitError(f"unknown precision {precision!r}; use 'auto', 'bf16' or 'fp32'")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        return torch.bfloat16 if amx() else None
    return None


def _lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then constant."""
    if warmup_steps <= 0:
        return lr
    return lr * min(1.0, (step + 1) / warmup_steps)


def _ema_decay_at(num_updates: int, decay: float) -> float:
    # Warm-up of the decay: early on the EMA follows the (random-init-dominated) weights closely
    # instead of averaging them in with weight ~decay for thousands of steps.
    return min(decay, (1 + num_updates) / (10 + num_updates))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


class _StopRequested:
    """Turns SIGTERM/SIGINT into "save a checkpoint at the end of this step, then return"."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequested":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    # The data order is a pure function of (seed, step): a resumed run sees exactly the batches
    # an uninterrupted run would have seen, without saving any RNG state.
    per_epoch = n // batch_size  # drop the last partial batch
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[i * batch_size : (i + 1) * batch_size]


def train(
    out_dir: str | os.PathLike[str],
    steps: int,
    batch_size: int = 64,
    lr: float = DEFAULT_LR,
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    ema_decay: float = DEFAULT_EMA_DECAY,
    grad_clip: float = DEFAULT_GRAD_CLIP,
    seed: int = 0,
    resume: bool = True,
    device: str | None = None,
    precision: str = "auto",
    num_threads: int | None = None,
    log_every: int = 100,
    ckpt_every: int = 5000,
    ckpt_every_s: float = 600.0,
    snapshot_every: int = 10000,
    data_root: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
) -> Path:
    """Train the bundled Fashion-MNIST UNet with the DDPM ε-prediction loss.

    Args:
        out_dir: run directory (checkpoint, JSON-lines log, EMA snapshots).
        steps: total number of optimizer steps (including those of a resumed run).
        batch_size, lr, warmup_steps, weight_decay, grad_clip: AdamW settings (see module
            constants for why these defaults).
        ema_decay: EMA decay, warmed up as ``min(decay, (1+n)/(10+n))``.
        seed: seeds the initialisation, the data order and the noise of every step.
        resume: continue from ``out_dir/checkpoint.safetensors`` if it exists; with
            ``resume=False`` an existing checkpoint is an error (never silently overwritten).
        device: ``"cuda"`` if available else ``"cpu"`` by default.
        precision: ``"auto"`` (bf16 autocast on AMX CPUs / bf16 GPUs), ``"bf16"`` or ``"fp32"``.
        num_threads: if given, ``torch.set_num_threads(num_threads)``.
        log_every: steps between log lines.
        ckpt_every, ckpt_every_s: checkpoint every this many steps or seconds, whichever first.
        snapshot_every: also keep the EMA as fp16 ``snapshots/ema-stepNNNNNNN.safetensors``
            every this many steps (0 disables), so earlier models can be compared.
        data_root: directory of the Fashion-MNIST idx files (see :func:`load_fashion_mnist`).
        progress: show a tqdm bar (default: only when stderr is a terminal).

    Returns:
        The path of the final checkpoint.
    """
    if steps <= 0 or batch_size <= 0:
        raise LowbitError(f"steps ({steps}) and batch_size ({batch_size}) must be positive")
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT_NAME
    log_path = out / LOG_NAME
    dev = torch.device(device or default_device())
    amp_dtype = _resolve_precision(precision, dev)

    torch.manual_seed(seed)
    model = build_fmnist_unet().to(dev).train()
    params = [p for p in model.parameters()]
    ema = {name: p.detach().clone() for name, p in model.named_parameters()}
    ema_buffers = [ema[name] for name, _ in model.named_parameters()]
    optimizer = torch.optim.AdamW(
        params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay
    )
    scheduler = build_fmnist_scheduler("ddpm")
    alphas_cumprod = scheduler.alphas_cumprod.to(dev, torch.float32)
    num_timesteps = int(FMNIST_SCHEDULER_CONFIG["num_train_timesteps"])

    hparams = {
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": warmup_steps,
        "weight_decay": weight_decay,
        "ema_decay": ema_decay,
        "grad_clip": grad_clip,
        "seed": seed,
        "precision": "bf16" if amp_dtype is torch.bfloat16 else "fp32",
        "hflip": False,
    }
    step = 0
    wall_before = 0.0
    if ckpt_path.exists():
        if not resume:
            raise CheckpointError(
                f"{ckpt_path} already exists; resume it (resume=True) or pick a new out_dir"
            )
        meta = _restore(ckpt_path, model, ema, optimizer)
        step = int(meta["step"])
        wall_before = float(meta.get("wall_s", 0.0))
        if int(meta["hparams"].get("seed", seed)) != seed:
            raise CheckpointError(
                f"{ckpt_path} was trained with seed {meta['hparams']['seed']}, not {seed}; "
                "pass the same seed or a new out_dir"
            )
    if step >= steps:
        print(f"[lowbit.train] {ckpt_path} is already at step {step} >= {steps}; nothing to do")
        return ckpt_path

    images_u8, _ = load_fashion_mnist("train", root=data_root)
    n_images = images_u8.shape[0]
    if n_images < batch_size:
        raise LowbitError(f"batch_size {batch_size} exceeds the {n_images} training images")

    def log(record: dict[str, Any]) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def checkpoint(reason: str) -> None:
        meta = {
            "step": step,
            "images_seen": step * batch_size,
            "wall_s": wall_before + (time.time() - t_start),
            "hparams": hparams,
            "torch": torch.__version__,
        }
        save_checkpoint(ckpt_path, model, ema, optimizer, meta)
        log({"event": "checkpoint", "reason": reason, "step": step, "time": time.time()})

    t_start = time.time()
    log(
        {
            "event": "resume" if step else "start",
            "step": step,
            "target_steps": steps,
            "device": str(dev),
            "threads": torch.get_num_threads(),
            "hparams": hparams,
            "time": t_start,
        }
    )
    print(
        f"[lowbit.train] {'resuming at' if step else 'starting'} step {step} -> {steps}, "
        f"device={dev}, threads={torch.get_num_threads()}, precision={hparams['precision']}, "
        f"out={out}",
        flush=True,
    )

    show_bar = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=steps, initial=step, disable=not show_bar, dynamic_ncols=True)
    loss_sum = torch.zeros((), device=dev)
    loss_count = 0
    t_window = time.time()
    t_last_ckpt = time.time()
    with _StopRequested() as stop:
        while step < steps:
            idx = _batch_indices(step, batch_size, n_images, seed)
            x0 = to_model_range(images_u8[idx]).to(dev)
            # Per-step generator: noise and timesteps are a function of (seed, step) too.
            g = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + 7919 * step + 1)
            t = torch.randint(0, num_timesteps, (batch_size,), generator=g, device=dev)
            noise = torch.randn(x0.shape, generator=g, device=dev)
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1.0 - a).sqrt() * noise

            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, lr, warmup_steps)
            autocast_dtype = amp_dtype or torch.float32
            with torch.autocast(dev.type, dtype=autocast_dtype, enabled=amp_dtype is not None):
                pred = model(xt, t).sample
            loss = F.mse_loss(pred.float(), noise)
            if not torch.isfinite(loss):
                raise LowbitError(
                    f"loss became {loss.item()} at step {step}; lower the lr (now {lr}) and "
                    "resume from the last checkpoint"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            with torch.no_grad():
                d = _ema_decay_at(step, ema_decay)
                torch._foreach_lerp_(ema_buffers, [p.detach() for p in params], 1.0 - d)
            step += 1
            bar.update(1)
            loss_sum += loss.detach()
            loss_count += 1

            if step % log_every == 0 or step == steps:
                now = time.time()
                mean_loss = (loss_sum / loss_count).item()
                record = {
                    "step": step,
                    "loss": round(mean_loss, 6),
                    "lr": optimizer.param_groups[0]["lr"],
                    "images_per_s": round(loss_count * batch_size / (now - t_window), 2),
                    "ms_per_step": round(1000 * (now - t_window) / loss_count, 1),
                    "wall_s": round(wall_before + now - t_start, 1),
                    "time": now,
                }
                log(record)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                if not show_bar:
                    print(json.dumps(record), flush=True)
                loss_sum.zero_()
                loss_count = 0
                t_window = now

            if snapshot_every and step % snapshot_every == 0:
                _write_ema_fp16(ema, out / "snapshots" / f"ema-step{step:07d}.safetensors", step)
            due = step % ckpt_every == 0 or time.time() - t_last_ckpt >= ckpt_every_s
            if due or stop.requested or step == steps:
                checkpoint("signal" if stop.requested else "periodic" if step < steps else "final")
                t_last_ckpt = time.time()
            if stop.requested:
                print(f"[lowbit.train] stopped by signal at step {step}; saved", flush=True)
                break
    bar.close()
    return ckpt_path
