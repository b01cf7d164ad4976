"""What the command line does with models: quantize a built-in toy or a diffusion model and
measure the result, and rebuild the model a checkpoint was made from for the samplers.

Kept apart from :mod:`lowbit.cli`, which only parses arguments and prints, so each stays small.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .errors import EvaluationError
from .io import fp32_safetensors_bytes, load, save
from .nn import sqnr_db
from .plan import recipe
from .quantize import quantize
from .zoo import toy


def check_dtype(compute: str, dtype: str) -> None:
    """bf16 between layers is a property of the native kernels: refuse it with emulated compute."""
    if dtype != "float32" and compute == "emulated":
        raise EvaluationError("--dtype bfloat16 applies to native kernels only; drop it or use --compute auto")


def quantize_builtin(model_name: str, recipe_name: str, out: Path, calib_batches: int, seed: int,
                     progress: bool) -> dict:
    """Quantize a built-in model, save it, reload it, and measure what matters."""
    model = toy.build(model_name, seed)
    fp_bytes = fp32_safetensors_bytes(model)
    held_out = toy.example_inputs(model_name, 2, seed=seed + 1000)
    with torch.no_grad():
        ref = [toy.run(model, x) for x in held_out]
    t0 = time.perf_counter()
    quantize(model, recipe(recipe_name), toy.example_inputs(model_name, calib_batches, seed=seed + 1), progress=progress)
    secs = time.perf_counter() - t0
    save(model, out, metadata={"builtin_model": model_name, "seed": str(seed)})
    with torch.device("meta"):
        fresh = toy.build(model_name, seed)
    reloaded = load(out, fresh, compute="emulated")  # bit-identity is a property of the codes
    with torch.no_grad():
        outs = [toy.run(model, x) for x in held_out]
        outs2 = [toy.run(reloaded, x) for x in held_out]
    return dict(model=model, recipe=recipe_name, path=out, seconds=secs, fp32_bytes=fp_bytes,
                bytes=out.stat().st_size, sqnr=sqnr_db(torch.cat(ref), torch.cat(outs)),
                identical=all(torch.equal(a, b) for a, b in zip(outs, outs2)))


def summary(rows: list[dict]) -> str:
    """The one-line-per-recipe table `lowbit quantize` prints under the per-layer report."""
    lines = [f"{'recipe':<9} {'checkpoint B':>13} {'vs fp32':>8} {'output SQNR dB':>15} {'reload identical':>17} {'quantize s':>11}"]
    for r in rows:
        lines.append(f"{r['recipe']:<9} {r['bytes']:>13,} {r['bytes'] / r['fp32_bytes']:>7.3f}x {r['sqnr']:>15.1f}"
                     f" {str(r['identical']):>17} {r['seconds']:>11.2f}")
    return "\n".join(lines)


def quantize_diffusion(spec: str, recipe_name: str, out: Path | None, calib_samples: int, calib_steps: int,
                       seed: int, progress: bool) -> dict:
    """Quantize a diffusion UNet (the bundled one or a local diffusers folder) on inputs recorded
    along its own DDIM trajectory, save it, reload it from the file alone, and measure the ε
    prediction against FP on a held-out trajectory (another seed)."""
    from .evaluate.sampling import trajectory_inputs
    from .zoo.local import open_diffusion_model

    if calib_samples <= 0 or calib_steps <= 0:
        raise EvaluationError("--calib-samples and --calib-steps must be positive")
    dm = open_diffusion_model(spec)
    for note in dm.notes:
        print(f"note: {note}")
    model = dm.model
    fp_bytes = fp32_safetensors_bytes(model)
    kw = dict(shape=dm.shape, steps=calib_steps, progress=progress)
    calib = trajectory_inputs(model, dm.scheduler_config, n=calib_samples, seed=12345 + seed, **kw)
    held_out = trajectory_inputs(model, dm.scheduler_config, n=min(4, calib_samples), seed=54321 + seed, **kw)
    held_out = held_out[:: max(1, len(held_out) // 5)]  # ~5 timesteps spread over the trajectory

    def eps(m, batches):
        with torch.no_grad():
            return [m(x, t).sample for x, t in batches]

    ref = eps(model, held_out)
    t0 = time.perf_counter()
    quantize(model, recipe(recipe_name), calib, progress=progress)
    secs = time.perf_counter() - t0
    out = out or Path(f"runs/{dm.name}-{recipe_name}.safetensors")
    save(model, out, metadata=dm.metadata)
    reloaded = load(out, compute="emulated")  # rebuilt from the checkpoint's own metadata
    outs, outs2 = eps(model, held_out), eps(reloaded, held_out)
    return dict(model=model, recipe=recipe_name, path=out, seconds=secs, fp32_bytes=fp_bytes,
                bytes=out.stat().st_size, sqnr=sqnr_db(torch.cat(ref), torch.cat(outs)),
                identical=all(torch.equal(a, b) for a, b in zip(outs, outs2)), diffusion=True)


def checkpoint_model(checkpoint: str | None, compute: str = "auto", dtype: str = "float32",
                     compile: bool = False, bundled_only: bool = False) -> tuple[torch.nn.Module, dict, tuple]:
    """(model, noise schedule, sample shape) for the samplers: the bundled FP UNet, or a
    checkpoint's model rebuilt from its own metadata; in ``dtype`` between the quantized layers
    and, with ``compile``, under torch.compile (:mod:`lowbit.evaluate.runner`)."""
    from .evaluate.runner import DTYPES, sampling_model
    from .io import read_metadata
    from .zoo.fmnist_unet import FMNIST_SCHEDULER_CONFIG, load_fmnist_unet
    from .zoo.local import BUNDLED, build_from_metadata

    check_dtype(compute, dtype)
    if checkpoint is None:
        model, schedule, shape = load_fmnist_unet().to(DTYPES[dtype]), dict(FMNIST_SCHEDULER_CONFIG), (1, 28, 28)
    else:
        meta = read_metadata(checkpoint)
        if bundled_only and meta.get("user.model", BUNDLED) != BUNDLED:
            raise EvaluationError(f"{checkpoint} is a checkpoint of another model than the bundled one; pass the folder"
                                  " it was quantized from as --model DIR (PSNR/SSIM to its images; FID* needs"
                                  " Fashion-MNIST features), or look at it with lowbit sample --checkpoint"
                                  f" {checkpoint}")
        if "user.model" not in meta and "user.builtin_model" not in meta:
            fresh, schedule, shape = build_from_metadata({"user.model": BUNDLED})  # demo checkpoints before it was stored
        else:
            fresh, schedule, shape = build_from_metadata(meta)
        if schedule is None:
            raise EvaluationError(f"{checkpoint} is a checkpoint of {meta.get('user.builtin_model')}, which is not a"
                                  " trained diffusion model: nothing to sample; quantize fmnist-unet or a diffusers"
                                  " UNet2DModel folder")
        model = load(checkpoint, fresh, compute=compute, dtype=DTYPES[dtype])
    return sampling_model(model, dtype, compile), schedule, shape


def bundled_with(checkpoint: str | None, compute: str = "auto", dtype: str = "float32",
                 compile: bool = False) -> torch.nn.Module:
    """The bundled UNet (or a checkpoint of it) ready for the samplers (see checkpoint_model)."""
    return checkpoint_model(checkpoint, compute, dtype, compile, bundled_only=True)[0]
