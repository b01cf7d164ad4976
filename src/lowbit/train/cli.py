"""The ``lowbit train`` command line (argparse): train, resume, or export a run's EMA."""

from __future__ import annotations

import argparse
import sys

from lowbit.errors import LowbitError

from . import __doc__ as _PACKAGE_DOC
from .checkpoint import export_ema
from .loop import DEFAULT_EMA_DECAY, DEFAULT_LR, DEFAULT_WARMUP_STEPS, train


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lowbit train", description=_PACKAGE_DOC.split("\n")[0])
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--steps", type=int, help="total optimizer steps (required to train)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument("--warmup-steps", type=int, default=DEFAULT_WARMUP_STEPS)
    p.add_argument("--ema-decay", type=float, default=DEFAULT_EMA_DECAY)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=5000)
    p.add_argument("--ckpt-every-s", type=float, default=600.0)
    p.add_argument("--snapshot-every", type=int, default=10000)
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run")
    p.add_argument("--export-ema", metavar="DEST", help="only export the EMA of --out to DEST")
    args = p.parse_args(argv)
    try:
        if args.export_ema:
            print(export_ema(args.out, args.export_ema))
            return 0
        if args.steps is None:
            p.error("--steps is required to train")
        train(
            args.out,
            args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            ema_decay=args.ema_decay,
            seed=args.seed,
            resume=not args.no_resume,
            device=args.device,
            precision=args.precision,
            num_threads=args.threads,
            log_every=args.log_every,
            ckpt_every=args.ckpt_every,
            ckpt_every_s=args.ckpt_every_s,
            snapshot_every=args.snapshot_every,
        )
    except LowbitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
