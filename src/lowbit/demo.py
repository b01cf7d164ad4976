"""``lowbit demo``: the main job — quantize the bundled diffusion model and evaluate it honestly.

1. load the bundled Fashion-MNIST UNet (fp16 weights shipped in the package, run in fp32);
2. record calibration inputs along the FP model's own DDIM trajectory (all sampler steps);
3. for each recipe: quantize, save a packed checkpoint, reload it into a meta-device model
   (native int8 kernels) and, by default, put it on the fastest CPU path: bf16 between the
   quantized layers, the whole UNet under ``torch.compile`` (``dtype``/``compile`` change that);
4. sample every model from the same seeds with the protocol (default: quick) and score them —
   the FP model as users run it today, float32 eager, so "speed × FP" is the real speed-up;
5. print the table and write results.json / results.md / grid.png / bars.png and the per-layer
   report of each quantized model into the output folder.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import torch

from .evaluate.output import markdown_table, write_results
from .evaluate.protocol import get_protocol
from .errors import EvaluationError
from .evaluate.run import evaluate
from .evaluate.runner import DTYPES, sampling_model
from .evaluate.sampling import trajectory_inputs
from .io import fp32_safetensors_bytes, load, save
from .quantize import quantize
from .report import format_report, report
from .zoo.fmnist_unet import FMNIST_SCHEDULER_CONFIG, build_fmnist_unet, load_fmnist_unet


def quantize_bundled(recipe: str, out_dir: Path, calib: list, progress: bool = True,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Path]:
    """Quantize the bundled UNet with ``recipe``, save it, and return it reloaded from disk
    (``dtype``: the activations between its quantized layers)."""
    model = quantize(load_fmnist_unet(), recipe, calib, progress=progress)
    path = save(model, out_dir / f"fmnist-unet-{recipe}.safetensors", metadata={"model": "fmnist-unet"})
    (out_dir / f"report-{recipe}.txt").write_text(format_report(report(model)) + "\n")
    with torch.device("meta"):
        fresh = build_fmnist_unet()
    return load(path, fresh, dtype=dtype), path


def _run_label(model: torch.nn.Module, dtype: str, compile: bool) -> str:
    """How a loaded model runs: its layers' kernel paths (from the per-layer report), the
    activations between them, compiled or eager."""
    paths = Counter(row.path for row in report(model) if row.path != "float")
    layers = ", ".join(f"{path} {n} layers" for path, n in paths.most_common())
    return f"{layers}; {'bf16' if dtype == 'bfloat16' else 'float32'} between layers; {'compiled' if compile else 'eager'}"


def run_demo(out_dir: "str | Path" = "runs/demo", recipes: tuple[str, ...] = ("w8a8", "w4a8"),
             protocol: str = "quick", num_samples: int | None = None, steps: int | None = None,
             calib_samples: int = 128, progress: bool = True, dtype: str = "bfloat16", compile: bool = True) -> dict:
    """Run the demo and return the results dict (also written to ``out_dir``). ``dtype``
    ("bfloat16" or "float32") and ``compile`` say how the quantized models sample; the FP model
    always samples float32 eager, the reference every speed-up is measured against."""
    if dtype not in DTYPES:
        raise EvaluationError(f"unknown activation dtype {dtype!r}: use {' or '.join(DTYPES)}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    proto = get_protocol(protocol).with_(num_samples=num_samples, steps=steps)
    fp = load_fmnist_unet()
    sizes = {"fp32": fp32_safetensors_bytes(fp)}
    print(f"bundled model: {sum(p.numel() for p in fp.parameters()):,} parameters, trained "
          f"{getattr(fp, 'lowbit_train_step', '?')} steps; protocol {proto.name}: {proto.sampler.upper()} "
          f"{proto.steps} steps, {proto.num_samples} samples, seeds {list(proto.seeds)}", flush=True)
    calib = trajectory_inputs(fp, FMNIST_SCHEDULER_CONFIG, n=calib_samples, steps=proto.steps, progress=progress)
    models: dict[str, torch.nn.Module] = {"fp32": fp}
    quant_seconds, paths, loaded = {}, [], {}
    for r in recipes:
        tq = time.perf_counter()
        q, path = quantize_bundled(r, out, calib, progress, DTYPES[dtype])
        models[r], loaded[r] = sampling_model(q, dtype, compile), q
        quant_seconds[r] = time.perf_counter() - tq
        sizes[r] = path.stat().st_size
        paths.append(str(path))
        print(f"{r}: calibrated on {len(calib)}×{calib_samples} trajectory inputs, saved {path} "
              f"({sizes[r]:,} B, {sizes[r] / sizes['fp32']:.3f}× fp32) in {quant_seconds[r]:.1f} s", flush=True)
    results = evaluate(models, FMNIST_SCHEDULER_CONFIG, proto, sizes=sizes, progress=progress)
    results["models"]["fp32"]["run"] = "float32 eager"
    for r, s in quant_seconds.items():
        results["models"][r]["quantize_seconds"] = s
        # after sampling: a model whose compilation failed (no C++ compiler) fell back to eager
        results["models"][r]["run"] = _run_label(loaded[r], dtype, getattr(models[r], "compiled", False))
    results["wall_seconds"] = time.perf_counter() - t0
    files = write_results(results, out)
    print()
    print(markdown_table(results))
    print(f"\nwrote {', '.join(str(p) for p in files.values())}; wall time {results['wall_seconds']:.0f} s")
    # the same checkpoints on the path that is the simulated model bit for bit
    print(f"the simulated model's numbers (plain float32 PyTorch, slower): lowbit evaluate {' '.join(paths)}"
          " --compute emulated")
    return results
