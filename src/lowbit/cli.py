"""The ``lowbit`` command line: formats, recipes, quantize, report, demo, evaluate, sample, bench, train.

Every subcommand does real work; user errors (``LowbitError``) print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# diffusers imports torchao where it is installed (the bench extra); torchao then logs a warning
# for each compiled extension a CPU build cannot load, torch one per Enum torchao registers, and
# diffusers one more when torchao is newer than it expects.
# None of it concerns lowbit's commands, and it buried their first lines.
for _noisy in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

import torch  # noqa: E402 (after the logger levels)

from . import _cli_models as M
from . import formats as F
from .errors import EvaluationError, LowbitError
from .io import fp32_safetensors_bytes, load
from .kernels.select import PATHS
from .plan import RECIPES
from .report import format_report, report, report_checkpoint
from .zoo import toy


def _cmd_formats(args: argparse.Namespace) -> None:
    for name in args.names or F.KNOWN_FORMATS:
        f = F.parse(name)
        vals = f.values()
        shown = ", ".join(f"{v:g}" for v in vals.tolist()) if len(vals) <= 32 else f"{len(vals)} values"
        print(f"{f.name:<12} {f.bits} bits  max {f.max_value:<8g} {len(vals):>4} values: {shown}")


def _cmd_recipes(args: argparse.Namespace) -> None:
    for name, (doc, _) in RECIPES.items():
        print(f"{name:<9} {doc}")


def _cmd_quantize(args: argparse.Namespace) -> None:
    if args.model in toy.BUILTIN:
        out = Path(args.out or f"runs/{args.model}-{args.recipe}.safetensors")
        r = M.quantize_builtin(args.model, args.recipe, out, args.calib_batches, args.seed, not args.quiet)
    else:
        r = M.quantize_diffusion(args.model, args.recipe, Path(args.out) if args.out else None, args.calib_samples,
                                args.calib_steps, args.seed, not args.quiet)
    if not args.quiet:
        print(format_report(report(r["model"]), max_rows=args.max_rows))
    print(f"\nfp32 safetensors: {r['fp32_bytes']:,} B")
    print(M.summary([r]))
    print(f"saved {r['path']}")
    if r.get("diffusion"):
        print(f"sample from it: lowbit sample --checkpoint {r['path']} --out {Path(r['path']).with_suffix('.png')}")


def _cmd_report(args: argparse.Namespace) -> None:
    print(format_report(report_checkpoint(args.checkpoint), max_rows=args.max_rows))


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.out, tuple(args.recipes), args.protocol, args.samples, args.steps, progress=not args.quiet,
             dtype=args.dtype, compile=args.compile)


def _fast_suffix(args: argparse.Namespace) -> str:
    parts = ([] if args.compute == "auto" else [args.compute]) + (["bf16"] if args.dtype == "bfloat16" else []) \
        + (["compiled"] if args.compile else [])
    return f" ({', '.join(parts)})" if parts else ""


def _cmd_evaluate(args: argparse.Namespace) -> None:
    import json

    from .evaluate.output import markdown_table, write_results
    from .evaluate.protocol import get_protocol
    from .evaluate.run import evaluate, seed_spread
    from .zoo.fmnist_unet import FMNIST_SCHEDULER_CONFIG

    if args.seed_spread:
        print(json.dumps(seed_spread(args.seed_spread), indent=1))
        return

    proto = get_protocol(args.protocol).with_(num_samples=args.samples, steps=args.steps, seeds=args.seeds,
                                              sampler=args.sampler)
    if args.model is not None:
        return _evaluate_folder(args, proto)
    models = {"fp32": M.bundled_with(None)}
    sizes = {}
    for ck in args.checkpoints:
        name = Path(ck).stem + _fast_suffix(args)
        models[name] = M.bundled_with(ck, args.compute, args.dtype, args.compile)
        sizes[name] = Path(ck).stat().st_size
    results = evaluate(models, FMNIST_SCHEDULER_CONFIG, proto, sizes=sizes, progress=not args.quiet,
                       save_features=args.out if args.save_features else None)
    files = write_results(results, args.out)
    print(markdown_table(results))
    print(f"\nwrote {', '.join(str(p) for p in files.values())}")


def _evaluate_folder(args: argparse.Namespace, proto) -> None:
    """``lowbit evaluate --model DIR ckpt...``: a user's diffusers UNet2DModel and checkpoints of
    it, scored by the metrics that need no feature extractor (PSNR/SSIM to FP, same seeds)."""
    from diffusers import UNet2DModel

    from .evaluate.output import markdown_table, write_results
    from .evaluate.run import evaluate
    from .evaluate.runner import DTYPES, sampling_model
    from .zoo.local import BUNDLED, open_diffusion_model

    if args.model == BUNDLED:
        raise EvaluationError("the bundled model is evaluated without --model (with FID* and the rest)")
    if args.save_features:
        raise EvaluationError("--save-features needs the Fashion-MNIST feature extractor; drop it with --model")
    M.check_dtype(args.compute, args.dtype)
    dm = open_diffusion_model(args.model)
    for note in dm.notes:
        print(f"note: {note}")
    config = {k: v for k, v in dm.model.config.items() if not k.startswith("_")}
    models, sizes = {"fp32": dm.model}, {"fp32": fp32_safetensors_bytes(dm.model)}
    for ck in args.checkpoints:
        with torch.device("meta"):
            fresh = UNet2DModel.from_config(config)  # load() checks the checkpoint fits this model
        q = load(ck, fresh, compute=args.compute, dtype=DTYPES[args.dtype])
        name = Path(ck).stem + _fast_suffix(args)
        models[name], sizes[name] = sampling_model(q, args.dtype, args.compile), Path(ck).stat().st_size
    results = evaluate(models, dm.scheduler_config, proto, sizes=sizes, progress=not args.quiet, shape=dm.shape,
                       features=False)
    files = write_results(results, args.out)
    print(markdown_table(results))
    print(f"\nwrote {', '.join(str(p) for p in files.values())}")


def _cmd_bench(args: argparse.Namespace) -> None:
    from .bench.run import BUILTIN_MODELS, bench

    if args.steps <= 0 or args.repeats <= 0 or (args.batch is not None and args.batch <= 0):
        raise EvaluationError("--steps, --repeats and --batch must be positive")
    cmd = "lowbit bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "lowbit bench"
    if args.device is not None:
        return _cmd_bench_device(args, cmd.strip())
    folders = [m for m in args.models if m not in BUILTIN_MODELS]
    for m in folders:  # a typo fails here, in one line, not after minutes of benchmarking
        if not Path(m).is_dir():
            raise EvaluationError(f"unknown benchmark model {m!r}: use {', '.join(BUILTIN_MODELS)}, or a local"
                                  " diffusers UNet2DModel folder")
    out = args.out
    if folders and out == "docs/performance.md":  # docs/performance.md is the bundled models' report
        out = f"runs/performance-{Path(folders[0]).resolve().name}.md"
    bench(tuple(args.models), tuple(args.recipes), tuple(args.peers), args.steps, args.repeats, args.threads,
          not args.no_memory, out, command=cmd.strip(), batch=args.batch)


def _cmd_bench_device(args: argparse.Namespace, cmd: str) -> None:
    from pathlib import Path

    from .bench.gpu import bench_device, markdown_device
    from .io import atomic_write

    models = tuple(args.models) if args.models != ["bundled", "sdlike"] else ("sdlike",)
    results = bench_device(models, tuple(args.recipes), args.device, args.steps, args.repeats, args.batch,
                           compile_=not args.no_compile)
    text = markdown_device(results, cmd)
    default = "docs/performance-gpu.md" if args.device == "cuda" else "runs/performance-device-cpu.md"
    out = Path(args.out if args.out != "docs/performance.md" else default)
    atomic_write(out, text.encode())
    print(text)
    print(f"wrote {out}")


def _cmd_sample(args: argparse.Namespace) -> None:
    from .evaluate.output import save_grid
    from .evaluate.sampling import sample

    model, schedule, shape = M.checkpoint_model(args.checkpoint, dtype=args.dtype, compile=args.compile)
    imgs = sample(model, schedule, n=args.n, seed=args.seed, sampler=args.sampler, steps=args.steps, shape=shape,
                  progress=not args.quiet)
    rows = {f"seed {args.seed} [{i}:{i + args.per_row}]": imgs[i:i + args.per_row] for i in range(0, args.n, args.per_row)}
    print(f"wrote {save_grid(rows, args.out)}")


def _fast_options(s: argparse.ArgumentParser, what: str) -> None:
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help=f"activations between the quantized layers of {what} (bfloat16: faster where the CPU"
                        " has bf16 kernels; default float32, whose numerics equal the simulated model's)")
    s.add_argument("--compile", action="store_true",
                   help=f"run {what} under torch.compile (the first batch compiles: tens of seconds; needs a C++"
                        " compiler, else a warning and eager sampling)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Low-bit post-training quantization of diffusion models.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("formats", help="list number formats and their values")
    s.add_argument("names", nargs="*", help="format strings (default: the common ones)")
    s.set_defaults(fn=_cmd_formats)
    s = sub.add_parser("recipes", help="list the named recipes")
    s.set_defaults(fn=_cmd_recipes)
    s = sub.add_parser("quantize", help="quantize the bundled diffusion model, a local diffusers UNet2DModel folder or"
                                        " a built-in toy; save a packed checkpoint, print the report")
    s.add_argument("--model", default="fmnist-unet", metavar="NAME_OR_DIR",
                   help="fmnist-unet (the bundled diffusion model), a folder written by diffusers' save_pretrained"
                        " (a UNet2DModel, or a pipeline with unet/ and scheduler/; safetensors weights, read"
                        f" locally), or a random built-in: {', '.join(toy.BUILTIN)} (default %(default)s)")
    s.add_argument("--recipe", default="w8a8", choices=list(RECIPES), help="named recipe (default %(default)s;"
                   " `lowbit recipes` lists them)")
    s.add_argument("--out", help="checkpoint path (default runs/<model>-<recipe>.safetensors)")
    s.add_argument("--calib-samples", type=int, default=64,
                   help="diffusion models: images sampled by the FP model to record calibration inputs"
                        " (default %(default)s)")
    s.add_argument("--calib-steps", type=int, default=20,
                   help="diffusion models: DDIM steps of that sampling, one calibration batch each (default %(default)s)")
    s.add_argument("--calib-batches", type=int, default=8, help="built-in toys: random calibration batches"
                   " (default %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="seed of the calibration inputs (and of a toy's weights)")
    s.add_argument("--max-rows", type=int, default=None, help="rows of the per-layer table to print (default all)")
    s.add_argument("--quiet", action="store_true", help="no progress bar and no per-layer table")
    s.set_defaults(fn=_cmd_quantize)
    s = sub.add_parser("report", help="per-layer report of a saved checkpoint")
    s.add_argument("checkpoint", help="a lowbit checkpoint (.safetensors)")
    s.add_argument("--max-rows", type=int, default=None, help="rows of the table to print (default all)")
    s.set_defaults(fn=_cmd_report)
    s = sub.add_parser("demo", help="quantize the bundled diffusion model (w8a8, w4a8), evaluate it, write a report")
    s.add_argument("--out", default="runs/demo", help="output folder (default %(default)s)")
    s.add_argument("--recipes", nargs="+", default=["w8a8", "w4a8"], choices=list(RECIPES),
                   help="recipes to quantize with (default: w8a8 w4a8)")
    s.add_argument("--protocol", default="quick", help="quick (default) or full; see docs/evaluation.md")
    s.add_argument("--samples", type=int, help="override the protocol's sample count")
    s.add_argument("--steps", type=int, help="override the protocol's sampler steps")
    s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="activations between the quantized models' int8 layers (default %(default)s; the FP model"
                        " always runs float32)")
    s.add_argument("--compile", default=True, action=argparse.BooleanOptionalAction,
                   help="sample the quantized models under torch.compile (default on; compiling takes a minute"
                        " on an empty cache, timed apart; without a C++ compiler: a warning and eager)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=_cmd_demo)
    s = sub.add_parser("evaluate", help="evaluate the bundled FP model and quantized checkpoints of it")
    s.add_argument("checkpoints", nargs="*", help="lowbit checkpoints of the bundled UNet (or of --model)")
    s.add_argument("--model", metavar="DIR", help="a local diffusers UNet2DModel/pipeline folder: evaluate checkpoints of"
                   " it against it (PSNR/SSIM to its same-seed images; FID* needs lowbit's Fashion-MNIST features,"
                   " so only the bundled model gets it)")
    s.add_argument("--protocol", default="quick", help="quick (default) or full; see docs/evaluation.md")
    s.add_argument("--samples", type=int, help="override the protocol's sample count")
    s.add_argument("--steps", type=int, help="override the protocol's sampler steps")
    s.add_argument("--seeds", type=int, nargs="+", help="override the protocol's seeds")
    s.add_argument("--sampler", choices=["ddim", "dpm"], help="override the protocol's sampler")
    s.add_argument("--out", default="runs/evaluate", help="output folder (default %(default)s)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("--compute", default="auto", choices=list(PATHS),
                   help="compute path of the checkpoints (default auto: native kernels; emulated: the simulated"
                        " model bit for bit)")
    _fast_options(s, "the checkpoints (the FP32 reference always runs float32, eager)")
    s.add_argument("--save-features", action="store_true",
                   help="also write the FP model's sample features per seed into --out (for --seed-spread)")
    s.add_argument("--seed-spread", nargs="+", metavar="FEATURES",
                   help="combine *.features.safetensors of single-seed runs: FID*/P/R per seed, mean ± std, "
                        "seed-to-seed FID* (no sampling)")
    s.set_defaults(fn=_cmd_evaluate)
    s = sub.add_parser("sample", help="sample images from the bundled model or a quantized checkpoint of it")
    s.add_argument("--checkpoint", help="a lowbit checkpoint written by `lowbit quantize` or `lowbit demo` (its model"
                   " is rebuilt from the file; default: the bundled FP model)")
    s.add_argument("--n", type=int, default=40, help="images to sample (default %(default)s)")
    s.add_argument("--per-row", type=int, default=20, help="images per row of the grid (default %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="noise seed (default %(default)s)")
    s.add_argument("--steps", type=int, default=20, help="sampler steps (default %(default)s)")
    s.add_argument("--sampler", default="ddim", choices=["ddim", "dpm"], help="default %(default)s")
    s.add_argument("--out", default="runs/samples.png", help="PNG grid to write (default %(default)s)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    _fast_options(s, "the model")
    s.set_defaults(fn=_cmd_sample)
    s = sub.add_parser("bench", help="sampling speed, memory and accuracy of FP32/BF16, lowbit recipes and peers")
    s.add_argument("--models", nargs="+", default=["bundled", "sdlike"], metavar="MODEL",
                   help="bundled, sdlike (default: both), dit (a DiT-S-like transformer), sdtext (an SD-1.x-like"
                        " text-conditioned UNet2DConditionModel), or a local diffusers"
                        " UNet2DModel/pipeline folder (its"
                        " report goes to runs/performance-<folder>.md unless --out says otherwise)")
    s.add_argument("--recipes", nargs="+", default=["w8a8", "w4a8", "fp8"], choices=list(RECIPES),
                   help="lowbit recipes to time (default: w8a8 w4a8 fp8)")
    s.add_argument("--peers", nargs="*", default=["pt2e", "quanto"], choices=["pt2e", "quanto"],
                   help="peer libraries to time on the same models (default: both; none: --peers)")
    s.add_argument("--steps", type=int, default=5, help="DDIM steps per timed sampling run")
    s.add_argument("--repeats", type=int, default=3, help="timed repeats (medians are reported)")
    s.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    s.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-RSS processes")
    s.add_argument("--out", default="docs/performance.md", help="Markdown report to write")
    s.add_argument("--device", default=None, choices=["cuda", "cpu"],
                   help="cuda: the GPU benchmark instead (lowbit.bench.gpu: bf16 vs lowbit's CUDA kernels on the"
                        " SD-like model, ratios to bf16, report docs/performance-gpu.md); cpu: that same reduced"
                        " benchmark on the CPU, to check it without a GPU (report runs/performance-device-cpu.md). Without"
                        " --device: the full CPU benchmark")
    s.add_argument("--batch", type=int, default=None,
                   help="images per batch (default: the model's: bundled 64, sdlike and folders 4)")
    s.add_argument("--no-compile", action="store_true", help="--device runs: skip the torch.compile variants")
    s.set_defaults(fn=_cmd_bench)
    s = sub.add_parser("train", help="train the bundled UNet on Fashion-MNIST (resumable); --help for options")
    s.set_defaults(fn=None)  # dispatched in main() to lowbit.train
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lowbit`` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # its own argparse: every option goes through unchanged
        from .train import _main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        rc = args.fn(args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
