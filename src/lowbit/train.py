"""Training of the bundled Fashion-MNIST DDPM (the full-precision model that lowbit quantizes).

Objective: the "simple" ε-prediction loss of Ho et al. 2020, *Denoising Diffusion Probabilistic
Models* (arXiv:2006.11239), Algorithm 1: draw t ~ Uniform{0..T-1} and ε ~ N(0, I), form
x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε and minimise ||ε - ε_θ(x_t, t)||².

Everything is saved as safetensors, never pickled: ``out_dir/checkpoint.safetensors`` holds the
model, its EMA and the AdamW state, with the step and hyperparameters as JSON metadata. It is
replaced atomically (temp file in the same directory, fsync, ``os.replace``) so a crash or a
``kill`` never leaves a half-written checkpoint; SIGTERM/SIGINT save one before exiting.
``out_dir/train_log.jsonl`` gets one JSON line per ``log_every`` steps.

Run: ``lowbit train --out DIR --steps N`` (one thread by default; ``--help`` lists the options).
"""

from __future__ import annotations

import argparse
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
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tqdm import tqdm

from lowbit.data import load_fashion_mnist, to_model_range
from lowbit.errors import CheckpointError, LowbitError
from lowbit.io import atomic_write
from lowbit.zoo.fmnist_unet import (
    FMNIST_SCHEDULER_CONFIG,
    FMNIST_UNET_CONFIG,
    build_fmnist_scheduler,
    build_fmnist_unet,
)

CHECKPOINT_NAME = "checkpoint.safetensors"
LOG_NAME = "train_log.jsonl"
CHECKPOINT_FORMAT = "lowbit-train-checkpoint/1"
EMA_EXPORT_FORMAT = "lowbit-ema-export/1"

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


def _json_config(config: dict[str, Any]) -> str:
    # Tuples become lists so that a config read back from JSON compares equal.
    return json.dumps(config, sort_keys=True)


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
# Checkpoint (de)serialisation
# --------------------------------------------------------------------------------------------


def _checkpoint_tensors(
    model: torch.nn.Module, ema: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        tensors[f"model.{name}"] = value.detach().to("cpu", copy=True).contiguous()
    for name, value in ema.items():
        tensors[f"ema.{name}"] = value.detach().to("cpu", copy=True).contiguous()
    # AdamW state keyed by parameter *name* (not index) so that it survives a reordering.
    for name, param in model.named_parameters():
        state = optimizer.state.get(param, {})
        for key, value in state.items():
            if not torch.is_tensor(value):
                value = torch.tensor(value)
            tensors[f"optim.{key}.{name}"] = value.detach().to("cpu", copy=True).contiguous()
    return tensors


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    ema: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
) -> None:
    """Atomically write model + EMA + AdamW state + JSON metadata to one safetensors file."""
    tensors = _checkpoint_tensors(model, ema, optimizer)
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "lowbit": json.dumps(meta, sort_keys=True),
        "model_config": _json_config(FMNIST_UNET_CONFIG),
        "scheduler_config": _json_config(FMNIST_SCHEDULER_CONFIG),
    }
    atomic_write(path, st_save(tensors, metadata=metadata))


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a training checkpoint: (tensors, metadata dict). Raises CheckpointError if unusable."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train first with `lowbit train`")
    try:
        # One read, then parse both tensors and header from the same bytes, so a checkpoint
        # replaced meanwhile by a running training cannot mix two versions.
        data = path.read_bytes()
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        raw_meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({exc}); delete it to restart or restore a copy"
        ) from None
    if raw_meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a lowbit training checkpoint (format {raw_meta.get('format')!r}); "
            "point at the checkpoint.safetensors written by lowbit.train"
        )
    if raw_meta.get("model_config") != _json_config(FMNIST_UNET_CONFIG):
        raise CheckpointError(
            f"{path} was trained with a different model config; use a new out_dir for this config"
        )
    meta = json.loads(raw_meta["lowbit"])
    return tensors, meta


def _split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _restore(
    path: Path,
    model: torch.nn.Module,
    ema: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any]:
    tensors, meta = read_checkpoint(path)
    try:
        model.load_state_dict(_split_prefix(tensors, "model."), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path} does not match the model ({exc}); use a new out_dir"
        ) from None
    ema_tensors = _split_prefix(tensors, "ema.")
    if set(ema_tensors) != set(ema):
        raise CheckpointError(f"{path} has incomplete EMA weights; delete it to restart training")
    for name, value in ema.items():
        value.copy_(ema_tensors[name])
    # Rebuild the optimizer state dict (param_groups come from the live optimizer, so a changed
    # lr/betas on the command line applies after resume; the step count and moments are restored).
    optim_tensors = _split_prefix(tensors, "optim.")
    name_to_index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in optim_tensors.items():
        field, _, pname = key.partition(".")
        if pname not in name_to_index:
            raise CheckpointError(f"{path} has optimizer state for unknown parameter {pname!r}")
        state.setdefault(name_to_index[pname], {})[field] = value
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)
    return meta


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


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _write_ema_fp16(ema: dict[str, torch.Tensor], dest: Path, step: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in ema.items()}
    metadata = {
        "format": EMA_EXPORT_FORMAT,
        "config": _json_config(FMNIST_UNET_CONFIG),
        "scheduler_config": _json_config(FMNIST_SCHEDULER_CONFIG),
        "step": str(step),
        "dtype": "float16",
    }
    atomic_write(dest, st_save(tensors, metadata=metadata))


def export_ema(out_dir: str | os.PathLike[str], dest_path: str | os.PathLike[str]) -> Path:
    """Write the EMA weights of ``out_dir``'s checkpoint as fp16 safetensors.

    Keys are plain ``UNet2DModel`` state-dict names; the metadata holds the model config
    (``config``, JSON: ``UNet2DModel(**json.loads(meta["config"]))`` rebuilds the model), the
    scheduler config and the training step. The model has no buffers, so the parameters are the
    whole state dict.
    """
    tensors, meta = read_checkpoint(Path(out_dir) / CHECKPOINT_NAME)
    ema = _split_prefix(tensors, "ema.")
    if not ema:
        raise CheckpointError(f"checkpoint in {out_dir} has no EMA weights; retrain or resume it")
    dest = Path(dest_path)
    _write_ema_fp16(ema, dest, int(meta["step"]))
    return dest


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lowbit train", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--steps", type=int, help="total optimizer steps (required to train)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument("--warmup-steps", type=int, default=DEFAULT_WARMUP_STEPS)
    p.add_argument("--ema-decay", type=float, default=DEFAULT_EMA_DECAY)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=5000)
    p.add_argument("--ckpt-every-s", type=float, default=600.0)
    p.add_argument("--snapshot-every", type=int, default=10000)
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run")
    p.add_argument("--export-ema", metavar="DEST", help="only export the EMA of --out to DEST")
    args = p.parse_args(argv)
    try:
        if args.export_ema:
            print(export_ema(args.out, args.export_ema))
            return 0
        if args.steps is None:
            p.error("--steps is required to train")
        train(
            args.out,
            args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            ema_decay=args.ema_decay,
            seed=args.seed,
            resume=not args.no_resume,
            device=args.device,
            precision=args.precision,
            num_threads=args.threads,
            log_every=args.log_every,
            ckpt_every=args.ckpt_every,
            ckpt_every_s=args.ckpt_every_s,
            snapshot_every=args.snapshot_every,
        )
    except LowbitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
