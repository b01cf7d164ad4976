"""``lowbit demo``: the main job — quantize the bundled diffusion model and evaluate it honestly.

1. load the bundled Fashion-MNIST UNet (fp16 weights shipped in the package, run in fp32);
2. record calibration inputs along the FP model's own DDIM trajectory (all sampler steps);
3. for each recipe: quantize, save a packed checkpoint, reload it into a meta-device model;
4. sample every model from the same seeds with the protocol (default: quick) and score them;
5. print the table and write results.json / results.md / grid.png / bars.png and the per-layer
   report of each quantized model into the output folder.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .evaluate.output import markdown_table, write_results
from .evaluate.protocol import get_protocol
from .evaluate.run import evaluate
from .evaluate.sampling import trajectory_inputs
from .io import fp32_safetensors_bytes, load, save
from .quantize import quantize
from .report import format_report, report
from .zoo.fmnist_unet import FMNIST_SCHEDULER_CONFIG, build_fmnist_unet, load_fmnist_unet


def quantize_bundled(recipe: str, out_dir: Path, calib: list, progress: bool = True) -> tuple[torch.nn.Module, Path]:
    """Quantize the bundled UNet with ``recipe``, save it, and return it reloaded from disk."""
    model = quantize(load_fmnist_unet(), recipe, calib, progress=progress)
    path = save(model, out_dir / f"fmnist-unet-{recipe}.safetensors", metadata={"model": "fmnist-unet"})
    (out_dir / f"report-{recipe}.txt").write_text(format_report(report(model)) + "\n")
    with torch.device("meta"):
        fresh = build_fmnist_unet()
    return load(path, fresh), path


def run_demo(out_dir: "str | Path" = "runs/demo", recipes: tuple[str, ...] = ("w8a8", "w4a8"),
             protocol: str = "quick", num_samples: int | None = None, steps: int | None = None,
             calib_samples: int = 128, progress: bool = True) -> dict:
    """Run the demo and return the results dict (also written to ``out_dir``)."""
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
    quant_seconds, paths = {}, []
    for r in recipes:
        tq = time.perf_counter()
        models[r], path = quantize_bundled(r, out, calib, progress)
        quant_seconds[r] = time.perf_counter() - tq
        sizes[r] = path.stat().st_size
        paths.append(str(path))
        print(f"{r}: calibrated on {len(calib)}×{calib_samples} trajectory inputs, saved {path} "
              f"({sizes[r]:,} B, {sizes[r] / sizes['fp32']:.3f}× fp32) in {quant_seconds[r]:.1f} s", flush=True)
    results = evaluate(models, FMNIST_SCHEDULER_CONFIG, proto, sizes=sizes, progress=progress)
    for r, s in quant_seconds.items():
        results["models"][r]["quantize_seconds"] = s
    results["wall_seconds"] = time.perf_counter() - t0
    files = write_results(results, out)
    print()
    print(markdown_table(results))
    print(f"\nwrote {', '.join(str(p) for p in files.values())}; wall time {results['wall_seconds']:.0f} s")
    # the demo samples the numerics-equal configuration; point at the faster one it did not run
    print(f"faster (bf16 between layers, compiled; see README): lowbit evaluate {' '.join(paths)}"
          " --dtype bfloat16 --compile")
    return results
