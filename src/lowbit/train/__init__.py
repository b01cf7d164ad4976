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

Layout: ``loop.py`` is the training loop and its hyperparameter defaults, ``checkpoint.py`` the
safetensors checkpoint and EMA-export format, ``cli.py`` the ``lowbit train`` command line.
"""

from __future__ import annotations

from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    EMA_EXPORT_FORMAT,
    _checkpoint_tensors,
    _json_config,
    _restore,
    _split_prefix,
    _write_ema_fp16,
    export_ema,
    read_checkpoint,
    save_checkpoint,
)
from .cli import _main
from .loop import (
    DEFAULT_EMA_DECAY,
    DEFAULT_GRAD_CLIP,
    DEFAULT_LR,
    DEFAULT_WARMUP_STEPS,
    DEFAULT_WEIGHT_DECAY,
    LOG_NAME,
    _batch_indices,
    _ema_decay_at,
    _lr_at,
    _resolve_precision,
    _StopRequested,
    default_device,
    train,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "EMA_EXPORT_FORMAT",
    "LOG_NAME",
    "DEFAULT_EMA_DECAY",
    "DEFAULT_GRAD_CLIP",
    "DEFAULT_LR",
    "DEFAULT_WARMUP_STEPS",
    "DEFAULT_WEIGHT_DECAY",
    "default_device",
    "export_ema",
    "read_checkpoint",
    "save_checkpoint",
    "train",
    # Internals, re-exported so that ``lowbit.train.<name>`` resolves as it did when this was
    # one module (``_main`` is what ``lowbit train`` in lowbit/cli.py dispatches to).
    "_main",
    "_StopRequested",
    "_batch_indices",
    "_checkpoint_tensors",
    "_ema_decay_at",
    "_json_config",
    "_lr_at",
    "_resolve_precision",
    "_restore",
    "_split_prefix",
    "_write_ema_fp16",
]
