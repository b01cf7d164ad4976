"""``lowbit bench --device cuda``: sampling speed of lowbit's GPU kernels against bf16 on a CUDA GPU.

On a GPU the baseline that matters is bf16 (nobody deploys fp32 there), so ratios are to bf16
eager *in the same run*. Each lowbit recipe goes through the user path — quantize on the CPU,
save the packed checkpoint, ``load(..., device="cuda", dtype=torch.bfloat16)`` — which installs
``torch._int_mm`` W8A8 Linears and convolutions (im2col, ``kernels/int_mm_conv.py``) and
``torch._scaled_mm`` FP8 Linears (compute capability ≥ 8.9; FP8 convolutions run bf16)
(``lowbit.kernels.select``). Timing synchronises the device around each sampling
run; the sampler's scheduler arithmetic stays on the host (a few hundred floats per step), so
every step pays one host↔device round trip, alike for every variant. Memory is the CUDA
allocator's peak while sampling (``torch.cuda.max_memory_allocated``, reset per variant).

The same code runs with ``device="cpu"`` (no memory column): that is how it is tested on
machines without a GPU, and what a CPU-only ``--device cpu`` run of it shows.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .._guards import GuardSkipping
from .._platform import cpu_name, resolve_device
from ..errors import EvaluationError
from ..evaluate.sampling import sample, trajectory_inputs
from ..io import fp32_safetensors_bytes, load, save
from ..nn import quant_layers, sqnr_db
from ..quantize import quantize
from .run import MODELS, _Fn
from .variants import default_workdir

__all__ = ["bench_device", "markdown_device"]


def _on(model: nn.Module, device: torch.device, dtype: torch.dtype) -> Callable:
    """``f(x, t) -> eps`` for the sampler (host tensors in and out) running ``model`` on ``device``."""
    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # copy=True: on the CPU, t is a view into the scheduler's table at a new offset each
        # step, which would recompile a compiled model every step
        out = model(x.to(device, dtype), t.to(device, copy=True))
        return (out.sample if hasattr(out, "sample") else out).float().cpu()
    return f


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _variants(spec, calib, recipes, device, compile_: bool, workdir: Path, log) -> list[dict]:
    fp = spec.load().to(device)
    fp_bytes = fp32_safetensors_bytes(fp)
    bf = copy.deepcopy(fp).to(torch.bfloat16)
    out = [dict(name="fp32", fn=_on(fp, device, torch.float32), bytes=fp_bytes, paths={"fp32": 1}),
           dict(name="bf16", fn=_on(bf, device, torch.bfloat16), bytes=fp_bytes // 2, paths={"bf16": 1})]
    if compile_:
        out.append(dict(name="bf16 + compile", fn=_on(GuardSkipping(copy.deepcopy(bf), dynamic=False), device,
                                                      torch.bfloat16), bytes=fp_bytes // 2, paths={"bf16": 1}))
    for r in recipes:
        q = quantize(spec.load(), r, calib, progress=False)
        path = save(q, Path(workdir) / f"{r}.safetensors")
        del q
        with torch.device("meta"):
            fresh = spec.build()
        m = load(path, fresh, device=device, dtype=torch.bfloat16)
        paths: dict[str, int] = {}
        for _, layer in quant_layers(m):
            if hasattr(layer, "weight_shape"):
                paths[layer.compute_path] = paths.get(layer.compute_path, 0) + 1
        size = path.stat().st_size
        log(f"  built lowbit {r} on {device}: {size:,} B, paths {paths}")
        out.append(dict(name=f"lowbit {r}", fn=_on(m, device, torch.bfloat16), bytes=size, paths=paths))
        if compile_:
            out.append(dict(name=f"lowbit {r} + compile", fn=_on(GuardSkipping(m, dynamic=False), device,
                                                                 torch.bfloat16), bytes=size, paths=paths))
    return out


def bench_device(models: tuple[str, ...] = ("sdlike",), recipes: tuple[str, ...] = ("w8a8", "fp8"),
                 device: str = "cuda", steps: int = 5, repeats: int = 5, batch: int | None = None,
                 compile_: bool = True, log=print) -> list[dict]:
    """Time DDIM sampling of one batch for bf16 and each recipe on ``device``; returns one result
    dict per model (rows with seconds, images/s, ratio to bf16, SQNR vs fp32, peak memory)."""
    dev = resolve_device(device, EvaluationError, "run `lowbit bench` without --device for the CPU benchmark")
    results = []
    for name in models:
        spec = MODELS[name]
        n = batch or spec.batch
        log(f"{name} on {dev}: {spec.description}; batch {n}, DDIM {steps} steps")
        calib = trajectory_inputs(spec.load(), spec.scheduler, n=spec.batch, steps=steps, shape=spec.shape,
                                  progress=False)
        variants = _variants(spec, calib, recipes, dev, compile_, default_workdir(), log)

        def run(v) -> torch.Tensor:
            return sample(_Fn(v["fn"]), spec.scheduler, n=n, batch_size=n, steps=steps, seed=0, shape=spec.shape,
                          progress=False)

        images, times, mem = {}, {v["name"]: [] for v in variants}, {}
        for v in variants:  # untimed first run (compiles where compiled): its images give the SQNR
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            images[v["name"]] = run(v)
            _sync(dev)
            mem[v["name"]] = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
        for r in range(repeats):
            for v in variants:  # interleaved, so drift hits every variant alike
                _sync(dev)
                t0 = time.perf_counter()
                run(v)
                _sync(dev)
                times[v["name"]].append(time.perf_counter() - t0)
            log(f"  repeat {r + 1}/{repeats} done")
        base = statistics.median(times["bf16"])
        rows = [dict(name=v["name"], seconds=statistics.median(times[v["name"]]),
                     images_per_s=n / statistics.median(times[v["name"]]),
                     vs_bf16=base / statistics.median(times[v["name"]]),
                     sqnr_db=None if v["name"] == "fp32" else sqnr_db(images["fp32"], images[v["name"]]),
                     checkpoint_bytes=v["bytes"], paths=v["paths"], peak_mb=mem[v["name"]]) for v in variants]
        results.append(dict(model=name, description=spec.description, device=_device_name(dev),
                            device_type=dev.type, batch=n,
                            steps=steps, repeats=repeats, rows=rows))
    return results


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        cc = torch.cuda.get_device_capability(dev)
        return f"{torch.cuda.get_device_name(dev)} (compute capability {cc[0]}.{cc[1]})"
    return cpu_name()


def markdown_device(results: list[dict], command: str) -> str:
    """The report: one table per model, ratios to bf16 eager from the same run."""
    gpu = any(r["device_type"] == "cuda" for r in results)
    out = ["# Performance on a GPU" if gpu else "# Device benchmark on the CPU (the GPU benchmark's code path)", "",
           f"Generated by `{command}` (torch {torch.__version__}). Ratios are to bf16 eager *in the same run*; the"
           " variants are interleaved within each repeat and the medians reported. SQNR compares each variant's"
           " final images with fp32's from the same initial noise. Peak memory is the CUDA allocator's peak"
           " during the variant's first sampling run ('–' on the CPU).", ""]
    for res in results:
        out += [f"## {res['model']} on {res['device']}: {res['description']}", "",
                f"Batch {res['batch']}, DDIM {res['steps']} steps, {res['repeats']} timed repeats.", "",
                "| variant | s / batch | images/s | × bf16 | SQNR vs fp32 (dB) | checkpoint B | peak memory MiB |"
                " compute paths |", "|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            sq = "–" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}"
            mem = "–" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
            paths = ", ".join(f"{k}: {v}" for k, v in r["paths"].items())
            out.append(f"| {r['name']} | {r['seconds']:.4f} | {r['images_per_s']:.1f} | {r['vs_bf16']:.2f} | {sq} |"
                       f" {r['checkpoint_bytes']:,} | {mem} | {paths} |")
        out.append("")
    return "\n".join(out) + "\n"
