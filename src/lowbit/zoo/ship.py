"""Ship the bundled model: export a training run's EMA weights into the package (fp16
safetensors) together with a small reference sample that the tests regenerate.

Run: ``python -m lowbit.zoo.ship RUN_DIR`` (RUN_DIR is a ``lowbit train --out`` folder).
The reference sample (4 images, DDIM 10 steps, seed 0, from the fp16 weights loaded as fp32)
pins the shipped weights *and* the sampling path: a test fails if either changes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import safetensors.torch

from ..io import atomic_write
from .fmnist_unet import FMNIST_SCHEDULER_CONFIG, WEIGHTS_PATH, load_fmnist_unet

SAMPLE_PATH = WEIGHTS_PATH.with_name("fmnist_unet_sample.safetensors")
SAMPLE_ARGS = dict(n=4, seed=0, sampler="ddim", steps=10)


def reference_sample(weights: "str | Path | None" = None):
    """The bundled model's images for :data:`SAMPLE_ARGS` (what the shipped sample must equal)."""
    from ..evaluate.sampling import sample

    return sample(load_fmnist_unet(weights), FMNIST_SCHEDULER_CONFIG, progress=False, **SAMPLE_ARGS)


def ship(run_dir: "str | Path", weights: Path = WEIGHTS_PATH, sample_path: Path = SAMPLE_PATH) -> tuple[Path, Path]:
    """Export ``run_dir``'s EMA weights to ``weights`` and write the reference sample."""
    from ..train import export_ema

    export_ema(run_dir, weights)
    imgs = reference_sample(weights)
    meta = {k: str(v) for k, v in SAMPLE_ARGS.items()}
    atomic_write(sample_path, safetensors.torch.save({"images": imgs.contiguous()}, metadata=meta))
    return weights, sample_path


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lowbit.zoo.ship", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    for path in ship(args.run_dir):
        print(f"wrote {path} ({path.stat().st_size:,} B)")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
