"""The ``lowbit`` command line: formats, recipes, quantize, report, demo.

Every subcommand does real work; user errors (``LowbitError``) print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import safetensors.torch
import torch

from . import formats as F
from .errors import LowbitError
from .io import load, save
from .nn import sqnr_db
from .plan import RECIPES, recipe
from .quantize import quantize
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


def _fp32_safetensors_bytes(model: torch.nn.Module) -> int:
    """Size of the float model saved as plain fp32 safetensors (the reference for ratios)."""
    return len(safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()}))


def _quantize_builtin(model_name: str, recipe_name: str, out: Path, calib_batches: int, seed: int,
                      progress: bool) -> dict:
    """Quantize a built-in model, save it, reload it, and measure what matters."""
    model = toy.build(model_name, seed)
    fp_bytes = _fp32_safetensors_bytes(model)
    held_out = toy.example_inputs(model_name, 2, seed=seed + 1000)
    with torch.no_grad():
        ref = [toy.run(model, x) for x in held_out]
    t0 = time.perf_counter()
    quantize(model, recipe(recipe_name), toy.example_inputs(model_name, calib_batches, seed=seed + 1), progress=progress)
    secs = time.perf_counter() - t0
    save(model, out, metadata={"builtin_model": model_name, "seed": str(seed)})
    with torch.device("meta"):
        fresh = toy.build(model_name, seed)
    reloaded = load(out, fresh)
    with torch.no_grad():
        outs = [toy.run(model, x) for x in held_out]
        outs2 = [toy.run(reloaded, x) for x in held_out]
    return dict(model=model, recipe=recipe_name, path=out, seconds=secs, fp32_bytes=fp_bytes,
                bytes=out.stat().st_size, sqnr=sqnr_db(torch.cat(ref), torch.cat(outs)),
                identical=all(torch.equal(a, b) for a, b in zip(outs, outs2)))


def _summary(rows: list[dict]) -> str:
    lines = [f"{'recipe':<9} {'checkpoint B':>13} {'vs fp32':>8} {'output SQNR dB':>15} {'reload identical':>17} {'quantize s':>11}"]
    for r in rows:
        lines.append(f"{r['recipe']:<9} {r['bytes']:>13,} {r['bytes'] / r['fp32_bytes']:>7.3f}x {r['sqnr']:>15.1f}"
                     f" {str(r['identical']):>17} {r['seconds']:>11.2f}")
    return "\n".join(lines)


def _cmd_quantize(args: argparse.Namespace) -> None:
    out = Path(args.out or f"runs/{args.model}-{args.recipe}.safetensors")
    r = _quantize_builtin(args.model, args.recipe, out, args.calib_batches, args.seed, not args.quiet)
    if not args.quiet:
        print(format_report(report(r["model"]), max_rows=args.max_rows))
    print(f"\nfp32 safetensors: {r['fp32_bytes']:,} B")
    print(_summary([r]))
    print(f"saved {out}")


def _cmd_report(args: argparse.Namespace) -> None:
    print(format_report(report_checkpoint(args.checkpoint), max_rows=args.max_rows))


def _cmd_demo(args: argparse.Namespace) -> None:
    out_dir = Path(args.out)
    t0 = time.perf_counter()
    print(f"lowbit demo: quantizing the built-in {toy.BUILTIN[0]} (random init, "
          f"{sum(p.numel() for p in toy.build(toy.BUILTIN[0]).parameters()):,} params) with each recipe\n")
    rows = []
    for name in args.recipes:
        rows.append(_quantize_builtin("toy-unet", name, out_dir / f"toy-unet-{name}.safetensors", 8, 0, False))
    print(f"per-layer report, {rows[1]['recipe'] if len(rows) > 1 else rows[0]['recipe']}:")
    print(format_report(report(rows[1 if len(rows) > 1 else 0]["model"]), max_rows=args.max_rows))
    print(f"\nfp32 safetensors: {rows[0]['fp32_bytes']:,} B; output SQNR is vs the float model on held-out inputs")
    print(_summary(rows))
    print(f"\ncheckpoints in {out_dir}/ (inspect one with: lowbit report {rows[0]['path']}); "
          f"wall time {time.perf_counter() - t0:.1f} s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Low-bit post-training quantization of diffusion models.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("formats", help="list number formats and their values")
    s.add_argument("names", nargs="*", help="format strings (default: the common ones)")
    s.set_defaults(fn=_cmd_formats)
    s = sub.add_parser("recipes", help="list the named recipes")
    s.set_defaults(fn=_cmd_recipes)
    s = sub.add_parser("quantize", help="quantize a built-in model, save a packed checkpoint, print the report")
    s.add_argument("--model", default="toy-unet", choices=toy.BUILTIN)
    s.add_argument("--recipe", default="w8a8", choices=list(RECIPES))
    s.add_argument("--out", help="checkpoint path (default runs/<model>-<recipe>.safetensors)")
    s.add_argument("--calib-batches", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-rows", type=int, default=None)
    s.add_argument("--quiet", action="store_true", help="no progress bar and no per-layer table")
    s.set_defaults(fn=_cmd_quantize)
    s = sub.add_parser("report", help="per-layer report of a saved checkpoint")
    s.add_argument("checkpoint")
    s.add_argument("--max-rows", type=int, default=None)
    s.set_defaults(fn=_cmd_report)
    s = sub.add_parser("demo", help="quantize the built-in UNet with several recipes, save, reload, report")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--recipes", nargs="+", default=["w8a8", "w4a8", "fp8", "w4a8-fp"], choices=list(RECIPES))
    s.add_argument("--max-rows", type=int, default=None)
    s.set_defaults(fn=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lowbit`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
