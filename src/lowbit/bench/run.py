"""``lowbit bench``: end-to-end sampling speed, memory and accuracy of every variant, in one run.

For each model (the bundled Fashion-MNIST UNet and a random SD-like UNet with 128/256/512
channels by default; on request a random DiT-S-like transformer, ``dit``, and a random
SD-1.x-like text-conditioned UNet, ``sdtext``) the benchmark

1. records calibration inputs along the FP32 model's DDIM trajectory;
2. builds the variants (:mod:`.variants`): FP32, BF16, FP32 + ``torch.compile``, each lowbit
   recipe loaded from its packed checkpoint (eager and compiled), and the peers;
3. times full DDIM sampling of one batch, all variants interleaved within each repeat (so drift
   and background load hit every variant alike), and reports medians and ratios to FP32 eager;
4. scores each variant's final images against FP32's from the same initial noise (SQNR, dB);
5. measures peak RSS of the eager variants in fresh processes (:mod:`.memory`), and for the
   SD-like model once more at 128×128 latents (attention over 4096 tokens, as in Stable
   Diffusion at 512 px), where the attention matrices dominate activation memory.

It writes a Markdown report (default ``docs/performance.md``) and prints it.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..evaluate.sampling import sample, trajectory_inputs
from .._platform import cpu_features, cpu_name
from ..nn import sqnr_db
from .attention import attention_table
from .memory import measure
from .variants import Variant, build_variants, default_workdir

__all__ = ["BUILTIN_MODELS", "MODELS", "ModelSpec", "bench"]


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: ``build()`` the architecture (works under the meta device),
    ``load()`` the float model, its scheduler config, image shape and benchmark batch."""

    build: Callable[[], nn.Module]
    load: Callable[[], nn.Module]
    scheduler: dict
    shape: tuple[int, int, int]
    batch: int
    description: str
    large_size: int | None = None  # latent size of the extra memory measurement (None: none)


def _bundled() -> ModelSpec:
    from ..zoo.fmnist_unet import FMNIST_SCHEDULER_CONFIG, build_fmnist_unet, load_fmnist_unet

    return ModelSpec(build_fmnist_unet, load_fmnist_unet, FMNIST_SCHEDULER_CONFIG, (1, 28, 28), 64,
                     "bundled Fashion-MNIST UNet (1.54M params, 1×28×28, channels 24/48/96)")


def _sdlike() -> ModelSpec:
    from ..zoo.sdlike_unet import SDLIKE_SCHEDULER_CONFIG, build_sdlike_unet

    return ModelSpec(build_sdlike_unet, build_sdlike_unet, SDLIKE_SCHEDULER_CONFIG, (4, 32, 32), 4,
                     "SD-like UNet (64.1M params, random weights, 4×32×32 latents, channels 128/256/512)",
                     large_size=128)


def _dit() -> ModelSpec:
    from ..zoo.dit_s import DIT_SCHEDULER_CONFIG, build_dit_s

    # no large-latent memory run: the positional table is fixed to 32×32 latents
    return ModelSpec(build_dit_s, build_dit_s, DIT_SCHEDULER_CONFIG, (4, 32, 32), 4,
                     "DiT-S-like transformer (diffusers DiTTransformer2DModel, 39.8M params, random weights"
                     " but a least-squares-fitted noise readout, 4×32×32 latents, patch 2: 256 tokens, hidden 384,"
                     " 12 blocks; class label i mod 1000 for sample i)")


def _sdtext() -> ModelSpec:
    from ..zoo.sd_text import SD_TEXT_SCHEDULER_CONFIG, build_sd_text

    # no large-latent memory run: the sdlike model's 128×128 run already covers attention memory
    return ModelSpec(build_sd_text, build_sd_text, SD_TEXT_SCHEDULER_CONFIG, (4, 32, 32), 4,
                     "SD-1.x-like text-conditioned UNet (diffusers UNet2DConditionModel, 142M params, random weights"
                     " and prompt states, 4×32×32 latents, channels 128/256/512/512, cross-attention to 77×768"
                     " text states, GEGLU feed-forward)")


def _folder(path: str) -> ModelSpec:
    """A user's diffusers ``UNet2DModel`` (or DDPM pipeline) folder (:mod:`lowbit.zoo.local`):
    its own weights and noise schedule, batch 4 unless ``--batch`` says otherwise."""
    from diffusers import UNet2DModel

    from ..zoo.local import open_diffusion_model

    dm = open_diffusion_model(path)
    config = {k: v for k, v in dm.model.config.items() if not k.startswith("_")}
    params = sum(p.numel() for p in dm.model.parameters())
    del dm.model  # the variants load their own copies
    desc = (f"{dm.name} (local diffusers UNet2DModel, {params / 1e6:.2f}M params, "
            f"{'×'.join(map(str, dm.shape))}, channels {'/'.join(map(str, config['block_out_channels']))})")
    return ModelSpec(lambda: UNet2DModel.from_config(config), lambda: open_diffusion_model(path).model,
                     dm.scheduler_config, dm.shape, 4, desc)


class _Models(dict):
    """Model name -> ModelSpec, built lazily (importing diffusers models is not free). A name
    that is a folder on disk is a user's diffusers UNet2DModel (:func:`_folder`)."""

    _makers = {"bundled": _bundled, "sdlike": _sdlike, "dit": _dit, "sdtext": _sdtext}

    def __missing__(self, key: str) -> ModelSpec:
        if key in self._makers:
            self[key] = self._makers[key]()
        elif Path(key).is_dir():
            self[key] = _folder(key)
        else:
            raise KeyError(f"unknown benchmark model {key!r}: use one of {', '.join(self._makers)}, or a local"
                           " diffusers UNet2DModel folder")
        return self[key]


MODELS = _Models()
BUILTIN_MODELS = tuple(_Models._makers)  # the names ``lowbit bench --models`` takes besides folders


class _Fn(nn.Module):
    """``fn`` as the module the sampler expects. ``fn`` is kept out of the module tree: the
    sampler's ``.eval()`` must not reach an exported PT2E graph, which refuses train/eval."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.__dict__["fn"] = fn

    def forward(self, x, t):
        return self.fn(x, t)


def _sample(v: Variant, spec: ModelSpec, steps: int, seed: int = 0) -> torch.Tensor:
    return sample(_Fn(v.fn), spec.scheduler, n=spec.batch, batch_size=spec.batch, steps=steps, seed=seed,
                  shape=spec.shape, progress=False)


def _memory_runs(v: Variant, spec: ModelSpec, memory: bool) -> int:
    """How many fresh memory-measuring processes variant ``v`` gets: eager variants that a user
    would load (FP32, BF16, lowbit checkpoints) get one, and one more at the model's large latent
    size unless they are the float32-activation twin of a recipe; compiled ones and peers none."""
    if not memory or v.name.endswith("compile") or not (v.name in ("fp32", "bf16") or v.checkpoint):
        return 0
    return 2 if spec.large_size and not v.name.endswith("(fp32 act.)") else 1


def bench_model(name: str, recipes: tuple[str, ...], peers: tuple[str, ...], steps: int, repeats: int,
                threads: int, memory: bool, log=print, progress: bool = True, batch: int | None = None) -> dict:
    """Benchmark one model; returns a dict of rows for the report. ``progress``: tqdm bars over
    the sampling runs and the memory processes (shown only when stderr is a terminal);
    ``batch`` overrides the model's benchmark batch."""
    spec = MODELS[name] if batch is None else replace(MODELS[name], batch=batch)
    log(f"{name}: {spec.description}; batch {spec.batch}, DDIM {steps} steps")
    fp = spec.load()
    calib = trajectory_inputs(fp, spec.scheduler, n=spec.batch, steps=steps, shape=spec.shape, progress=False)
    workdir = default_workdir()
    variants = build_variants(spec.load, spec.build, calib, recipes, peers, workdir, log=log)
    images, times, first = {}, {v.name: [] for v in variants}, {}
    # the whole run is minutes per model (the compiled variants' first runs alone up to a minute each)
    bar = tqdm(total=len(variants) * (1 + repeats), desc=f"{name}: sampling", unit="run",
               disable=None if progress else True, leave=False)
    for v in variants:  # untimed first run (compiles where compiled); its images give the SQNR
        bar.set_postfix_str(f"first run: {v.name}")
        t0 = time.perf_counter()
        images[v.name] = _sample(v, spec, steps)
        first[v.name] = time.perf_counter() - t0
        bar.update()
    for r in range(repeats):
        for v in variants:
            bar.set_postfix_str(f"repeat {r + 1}/{repeats}: {v.name}")
            t0 = time.perf_counter()
            _sample(v, spec, steps)
            times[v.name].append(time.perf_counter() - t0)
            bar.update()
        log(f"  repeat {r + 1}/{repeats} done")
    bar.close()
    base = statistics.median(times["fp32"])
    rows = []
    mem_bar = tqdm(total=sum(_memory_runs(v, spec, memory) for v in variants), desc=f"{name}: peak RSS",
                   unit="process", disable=None if progress else True, leave=False)
    for v in variants:
        med = statistics.median(times[v.name])
        row = dict(name=v.name, seconds=med, images_per_s=spec.batch / med, speedup=base / med,
                   sqnr_db=sqnr_db(images["fp32"], images[v.name]) if v.name != "fp32" else None,
                   checkpoint_bytes=v.checkpoint_bytes, paths=v.paths, build_seconds=v.build_seconds,
                   first_seconds=first[v.name])
        if _memory_runs(v, spec, memory):
            mem_bar.set_postfix_str(v.name)
            row["memory"] = measure(name, v.dtype, v.checkpoint, spec.batch, 2, threads)
            mem_bar.update()
        if _memory_runs(v, spec, memory) == 2:
            # batch 1, 1 step: at this size one step already reaches every layer's peak
            row["memory_large"] = measure(name, v.dtype, v.checkpoint, 1, 1, threads, size=spec.large_size)
            mem_bar.update()
        rows.append(row)
    mem_bar.close()
    # the checkpoints were only needed by the variants and the memory processes: 160 MB per
    # SD-like run would otherwise pile up in the temp folder (the models keep no file open: load
    # copies what it keeps off the mapping)
    shutil.rmtree(workdir, ignore_errors=True)
    compiled = next((r for r in rows if r["name"].endswith("w8a8 + compile")), None)
    attention = attention_table(fp, (calib[0][0], calib[0][1]), compiled and 1e3 * compiled["seconds"] / steps)
    return dict(model=name, description=spec.description, batch=spec.batch, steps=steps, repeats=repeats, rows=rows,
                attention=attention, large_size=spec.large_size)


def _fmt_paths(paths: dict) -> str:
    return ", ".join(f"{k}: {n}" if len(paths) > 1 or n > 1 else k for k, n in paths.items())


def _above(m: dict, fp: dict, key: str) -> str:
    """``m[key]`` above the process baseline in MB, with its ratio to the FP32 row's."""
    if m.get(key) is None:
        return "–"
    a = m[key] - m["baseline_mb"]
    fp_a = fp[key] - fp["baseline_mb"] if fp.get(key) is not None else None
    return f"{a:.0f}" + (f" ({a / fp_a:.2f})" if fp_a else "")


def _large_table(res: dict) -> list[str]:
    """The memory measured at the model's larger latent size, as a table (empty if none)."""
    rows = [r for r in res["rows"] if "memory_large" in r]
    if not rows or rows[0]["name"] != "fp32":
        return []
    s, fp = res["large_size"], rows[0]["memory_large"]
    out = [f"Peak RSS at {s}×{s} latents (batch 1, 1 DDIM step, a fresh process per variant): attention's"
           " score matrices grow with the square of the token count, so at this size they, not the weights,"
           " decide activation memory.", "",
           "| variant | peak RSS MB | RSS above baseline MB (× FP32) | while sampling, above baseline MB (× FP32) |",
           "|---|---|---|---|"]
    for r in rows:
        m = r["memory_large"]
        if "error" in m:
            out.append(f"| {r['name']} | error | {m['error']} | – |")
            continue
        out.append(f"| {r['name']} | {m['peak_mb']:.0f} | {_above(m, fp, 'peak_mb')} |"
                   f" {_above(m, fp, 'sampling_peak_mb')} |")
    return out + [""]


def cpu_kernel_note() -> str:
    """What this CPU's oneDNN computes natively: int8 exactly or with split weights, bf16 or not."""
    from ..kernels import onednn, vnni
    from ..kernels.bf16 import cpu_bf16_available

    if not onednn.available():
        int8 = "no exact oneDNN int8 here: int recipes do not run int8"
    elif vnni.pair_limit() is None:
        int8 = "oneDNN int8 is exact here (VNNI/AMX)"
    else:
        int8 = ("this CPU has no VNNI: layers with 8-bit weights run oneDNN int8 on split weights (exact, twice the"
                " integer work; lowbit.kernels.vnni), 4-bit weights run directly")
    bf16 = ("oneDNN has bf16 kernels" if cpu_bf16_available() else
            "oneDNN has no bf16 kernels here, so bf16 rows run PyTorch's slow reference path and FP8 layers stay emulated")
    return f"CPU kernels: {int8}; {bf16}."


def markdown(results: list[dict], command: str, threads: int) -> str:
    """The report: one table per model, ratios to FP32 eager from the same run."""
    features = cpu_features()
    cpu = cpu_name() + (f" ({features})" if features else "")
    out = ["# Performance", "",
           f"Generated by `{command}` (torch {torch.__version__}, {cpu}, {threads} thread(s),"
           f" {os.cpu_count()} logical CPUs). Ratios are to FP32 eager *in the same run*; all variants of a model"
           " are interleaved within each repeat and the medians reported. SQNR compares each variant's final"
           " images with FP32's from the same initial noise. 'build s' is quantize + save + load (or quantize +"
           " calibrate for peers); 'first run s' is the untimed first sampling run, which includes"
           " torch.compile's compilation for compiled variants. Peak RSS is measured in a fresh process per eager"
           " variant (loading, then sampling one batch for 2 steps); the 'above baseline' columns subtract the"
           " RSS of the interpreter with torch and diffusers imported, which every variant pays. 'While"
           " sampling' is the peak after loading (the high-water mark reset once the model is loaded): what"
           " the loaded model needs to run, without the transient peak of building it.", "", cpu_kernel_note(), ""]
    for res in results:
        out += [f"## {res['model']}: {res['description']}", "",
                f"Batch {res['batch']}, DDIM {res['steps']} steps, {res['repeats']} timed repeats.", "",
                "| variant | s / batch | images/s | × FP32 | SQNR vs FP32 (dB) | checkpoint B (× fp32) |"
                " peak RSS MB | RSS above baseline MB (× FP32) | while sampling, above baseline MB (× FP32) |"
                " compute paths | build s | first run s |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        fp_bytes = res["rows"][0]["checkpoint_bytes"]
        fp_mem = res["rows"][0].get("memory", {})
        for r in res["rows"]:
            ck = "–" if r["checkpoint_bytes"] is None else f"{r['checkpoint_bytes']:,} ({r['checkpoint_bytes'] / fp_bytes:.3f})"
            m = r.get("memory")
            if m is None:
                peak = above = sampling = "–"
            elif "error" in m:
                peak, above, sampling = "error", m["error"], "–"
            else:
                peak = f"{m['peak_mb']:.0f}"
                above = _above(m, fp_mem, "peak_mb")
                sampling = _above(m, fp_mem, "sampling_peak_mb")
            sq = "–" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}"
            out.append(f"| {r['name']} | {r['seconds']:.3f} | {r['images_per_s']:.1f} | {r['speedup']:.2f} | {sq} |"
                       f" {ck} | {peak} | {above} | {sampling} | {_fmt_paths(r['paths'])} | {r['build_seconds']:.0f} |"
                       f" {r['first_seconds']:.1f} |")
        out.append("")
        out += _large_table(res)
        if res.get("attention"):
            out += ["Attention matmuls (QKᵀ + PV) at this model's shapes, operands already quantized"
                    " (`lowbit.bench.attention`): the bare matmuls. The int8 attention kernel"
                    " (`lowbit.kernels.int8_attention`) also quantizes and runs the softmax, in blocks; whole cores"
                    " are timed by `scripts/attention-speed.py`.",
                    ""] + res["attention"] + [""]
    return "\n".join(out) + "\n"


def bench(models: tuple[str, ...] = ("bundled", "sdlike"), recipes: tuple[str, ...] = ("w8a8", "w4a8", "fp8"),
          peers: tuple[str, ...] = ("pt2e", "quanto"), steps: int = 5, repeats: int = 3, threads: int | None = None,
          memory: bool = True, out: "str | Path | None" = "docs/performance.md", command: str = "lowbit bench",
          log=print, progress: bool = True, batch: int | None = None) -> list[dict]:
    """Run the benchmark and write the Markdown report to ``out`` (``None``: don't write);
    ``progress``: tqdm bars while it runs (on a terminal). ``models`` are names in
    :data:`MODELS` or local diffusers UNet2DModel folders; ``batch`` overrides each model's batch."""
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    # every compiled variant of a model shares the model class's forward code object, and dynamo
    # counts all of their graphs against one per-code limit (8 by default); past it, frames fall
    # back to slow partial compilation. The benchmark compiles up to ~8 variants per model.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
    from ..io import atomic_write

    results = []
    for m in models:  # the report is rewritten after each model, so a late failure loses nothing
        results.append(bench_model(m, recipes, peers, steps, repeats, threads, memory, log, progress, batch))
        text = markdown(results, command, threads)
        if out is not None:
            atomic_write(Path(out), text.encode())
            log(f"wrote {out}")
        log(text)
    return results
