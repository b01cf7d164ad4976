"""Diffusion models named on the command line, and the architecture a checkpoint records.

``lowbit quantize --model`` takes the bundled model's name (``fmnist-unet``) or a directory on
the user's disk written by diffusers' ``save_pretrained``: a ``UNet2DModel`` folder
(``config.json`` + ``diffusion_pytorch_model.safetensors``), or a pipeline folder with ``unet/``
and ``scheduler/`` inside (``model_index.json``). Nothing is downloaded: diffusers reads the local
files only, and only safetensors weights are accepted (a ``.bin`` file is a pickle).

The checkpoint then records what rebuilds the float architecture — the bundled model's name, or
the diffusers class and its JSON config — and the noise schedule, so ``lowbit.load(path)`` and
``lowbit sample --checkpoint`` need no model argument. A config is data: rebuilding it runs
``UNet2DModel.from_config`` on the meta device, no code from the file.

Only unconditional ``UNet2DModel`` is supported here: calibrating it needs nothing but the
sampler's own (x_t, t). Conditional UNets need prompts' embeddings for calibration; quantize them
from Python with your own calibration inputs (README, "Use it from Python").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, PlanError

__all__ = ["DiffusionModel", "open_diffusion_model", "build_from_metadata", "BUNDLED"]

BUNDLED = "fmnist-unet"

# The keys of a scheduler config that define the noise schedule; lowbit's samplers (DDIM,
# DPM-Solver++) are built from these alone, whatever scheduler class saved the file.
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "prediction_type", "clip_sample", "clip_sample_range", "timestep_spacing", "steps_offset")

# what diffusers' DDPMScheduler assumes when a folder ships no scheduler config
DEFAULT_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
                    "prediction_type": "epsilon"}


@dataclass
class DiffusionModel:
    """A float diffusion UNet ready to calibrate: the model (fp32, eval), its noise schedule,
    the shape of one sample, and the metadata a checkpoint of it stores (``lowbit.save``'s
    ``metadata=``)."""

    model: nn.Module
    scheduler_config: dict
    shape: tuple[int, ...]
    name: str
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _schedule(config: dict) -> dict:
    return {k: config[k] for k in _SCHEDULE_KEYS if k in config and config[k] is not None}


def _sample_shape(config: dict) -> tuple[int, ...]:
    size = config.get("sample_size")
    if size is None:
        raise PlanError("the model's config has no sample_size; set it in config.json (the image side the UNet was"
                        " trained at)")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(config.get("in_channels", 3)), int(h), int(w))


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"cannot read {what} {path} ({type(e).__name__}); write it again with diffusers'"
                        " save_pretrained") from None


def _unet_folder(path: Path) -> tuple[Path, Path | None]:
    """(the UNet folder, its scheduler_config.json or None) for a UNet or a pipeline folder."""
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json", "pipeline index")
        unet_entry = index.get("unet")
        if not (path / "unet").is_dir() or unet_entry is None:
            raise PlanError(f"the pipeline at {path} has no unet/ folder; pass a folder holding a UNet2DModel")
        sched = path / "scheduler" / "scheduler_config.json"
        return path / "unet", sched if sched.is_file() else None
    for sched in (path / "scheduler_config.json", path.parent / "scheduler" / "scheduler_config.json"):
        if sched.is_file():
            return path, sched
    return path, None


def _open_folder(path: Path) -> DiffusionModel:
    from diffusers import UNet2DModel

    folder, sched_path = _unet_folder(path)
    if not (folder / "config.json").is_file():
        raise PlanError(f"{folder} holds no config.json: pass a folder written by diffusers' save_pretrained"
                        f" (a UNet2DModel, or a pipeline with unet/), or one of: {BUNDLED}")
    config = _read_json(folder / "config.json", "model config")
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise PlanError(f"{folder} holds a {cls}; the command line calibrates unconditional UNet2DModel only"
                        " (a conditional UNet needs prompt embeddings: quantize it from Python with your own"
                        " calibration inputs, README 'Use it from Python')")
    if config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None:
        raise PlanError(f"{folder} holds a class-conditional UNet2DModel (it needs class labels); the command line"
                        " calibrates unconditional models only: quantize it from Python with calibration inputs"
                        " that carry class_labels")
    if not any(folder.glob("*.safetensors")):
        raise PlanError(f"{folder} has no .safetensors weights (lowbit never unpickles .bin files); convert them:"
                        " UNet2DModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    try:
        # low_cpu_mem_usage=False: the fast path needs accelerate, and without it diffusers warns
        model = UNet2DModel.from_pretrained(str(folder), use_safetensors=True, local_files_only=True,
                                            low_cpu_mem_usage=False)
    except Exception as e:  # diffusers raises OSError/ValueError/EnvironmentError for damaged folders
        msg = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise PlanError(f"cannot load the UNet in {folder}: {msg}") from None
    notes = []
    if sched_path is None:
        schedule = dict(DEFAULT_SCHEDULE)
        notes.append(f"no scheduler_config.json beside {folder}: assuming DDPM's linear schedule {schedule}")
    else:
        raw = _read_json(sched_path, "scheduler config")
        if "beta_schedule" not in raw and raw.get("trained_betas") is None:
            raise PlanError(f"{sched_path} is a {raw.get('_class_name', 'scheduler')} without a beta schedule;"
                            " lowbit samples with DDIM/DPM-Solver++, which need a variance-preserving (DDPM-type)"
                            " schedule")
        schedule = _schedule(raw)
    arch_config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    meta = {"model": "diffusers:UNet2DModel", "diffusers_config": json.dumps(arch_config),
            "scheduler_config": json.dumps(schedule)}
    name = path.resolve().name  # the folder the user named (a pipeline's, not its unet/)
    return DiffusionModel(model.float().eval(), schedule, _sample_shape(arch_config), name, meta, notes)


def open_diffusion_model(spec: str) -> DiffusionModel:
    """The float diffusion model ``spec`` names: ``"fmnist-unet"`` (the bundled model) or a local
    diffusers folder (see the module docstring). Raises :class:`lowbit.errors.PlanError` naming
    the fix for anything else."""
    if spec == BUNDLED:
        from .fmnist_unet import FMNIST_SCHEDULER_CONFIG, load_fmnist_unet

        model = load_fmnist_unet()
        return DiffusionModel(model, dict(FMNIST_SCHEDULER_CONFIG), (1, 28, 28), BUNDLED, {"model": BUNDLED})
    path = Path(spec)
    if not path.is_dir():
        raise PlanError(f"unknown model {spec!r}: name a built-in model ({BUNDLED}, toy-unet, convnet-10m) or a"
                        " local folder written by diffusers' save_pretrained")
    return _open_folder(path)


def build_from_metadata(meta: dict[str, str]) -> tuple[nn.Module, dict | None, tuple[int, ...] | None]:
    """(the float architecture on the meta device, its noise schedule, one sample's shape) as a
    checkpoint's metadata records them (``read_checkpoint``'s first value). Raises a
    CheckpointError naming the fix when the checkpoint does not say what it was made from."""
    kind = meta.get("user.model")
    if kind == BUNDLED:
        from .fmnist_unet import FMNIST_SCHEDULER_CONFIG, build_fmnist_unet

        with torch.device("meta"):
            return build_fmnist_unet(), dict(FMNIST_SCHEDULER_CONFIG), (1, 28, 28)
    if kind == "diffusers:UNet2DModel":
        from diffusers import UNet2DModel

        try:
            config = json.loads(meta["user.diffusers_config"])
            schedule = json.loads(meta.get("user.scheduler_config", "null"))
            with torch.device("meta"):
                model = UNet2DModel.from_config(config)
        except (KeyError, json.JSONDecodeError, TypeError, ValueError) as e:
            raise CheckpointError(f"the checkpoint's model config is damaged ({type(e).__name__}); quantize the"
                                  " model again") from None
        return model, schedule, _sample_shape(config)
    if meta.get("user.builtin_model"):
        from . import toy

        with torch.device("meta"):
            return toy.build(meta["user.builtin_model"], int(meta.get("user.seed", "0"))), None, None
    raise CheckpointError("this checkpoint does not record the model it was made from (saved from Python without"
                          " metadata); pass that float model: lowbit.load(path, model)")
