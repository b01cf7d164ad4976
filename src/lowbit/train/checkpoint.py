"""Training checkpoints and EMA exports: the safetensors format, atomic writes, restore.

``checkpoint.safetensors`` holds the model, its EMA and the AdamW state (keyed by parameter
name) with the step and hyperparameters as JSON metadata; ``export_ema`` writes the EMA alone
as fp16 safetensors, the form the bundled model ships in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lowbit.errors import CheckpointError
from lowbit.io import atomic_write
from lowbit.zoo.fmnist_unet import FMNIST_SCHEDULER_CONFIG, FMNIST_UNET_CONFIG

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "lowbit-train-checkpoint/1"
EMA_EXPORT_FORMAT = "lowbit-ema-export/1"


def _json_config(config: dict[str, Any]) -> str:
    # Tuples become lists so that a config read back from JSON compares equal.
    return json.dumps(config, sort_keys=True)


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
