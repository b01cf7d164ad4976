"""Peak resident memory of one variant while it samples, measured in a fresh process.

RSS is per process and never goes down, so each variant gets its own interpreter:
``python -m lowbit.bench.memory MODEL {fp32,bf16} [CHECKPOINT]`` builds the model the way a user
would (FP32/BF16 from the float weights; lowbit variants by loading the packed checkpoint onto a
meta-device model, so no fp32 weight is ever allocated), samples one batch, and prints JSON with
the RSS after imports (the Python + PyTorch baseline every variant pays), the RSS and peak after
loading, the peak while sampling alone (``/proc/self/clear_refs`` resets the high-water mark
after loading) and the overall peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["measure"]


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lowbit.bench.memory")
    ap.add_argument("model")
    ap.add_argument("dtype", choices=["fp32", "bf16"], help="activation dtype")
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, help="latent height and width (default: the model's)")
    a = ap.parse_args(argv)
    import torch

    from ..evaluate.sampling import sample
    from ..io import load
    from .run import MODELS

    torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    spec = MODELS[a.model]
    shape = spec.shape if a.size is None else (spec.shape[0], a.size, a.size)
    base = _status_mb("VmRSS")
    if a.checkpoint:
        with torch.device("meta"):
            fresh = spec.build()
        model = load(a.checkpoint, fresh, dtype=dtype)
    else:
        model = spec.load().to(dtype)

    class _Eps(torch.nn.Module):
        def forward(self, x, t):
            out = model(x.to(dtype), t)
            return (out.sample if hasattr(out, "sample") else out).float()

    loaded = _status_mb("VmRSS")
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork+exec, so a child would
    # report its parent's peak whenever that is higher
    load_peak = _status_mb("VmHWM")
    sampling_peak = None
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0): the peak of sampling alone
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    sample(_Eps(), spec.scheduler, n=a.batch, batch_size=a.batch, steps=a.steps, shape=shape, progress=False)
    if reset:
        sampling_peak = _status_mb("VmHWM")
    peak = max(load_peak, sampling_peak) if sampling_peak is not None else _status_mb("VmHWM")
    print(json.dumps({"baseline_mb": base, "loaded_mb": loaded, "load_peak_mb": load_peak,
                      "sampling_peak_mb": sampling_peak, "peak_mb": peak}))


def measure(model: str, dtype: str, checkpoint: "Path | None", batch: int, steps: int, threads: int,
            size: int | None = None) -> dict:
    """Run the measurement in a child process and return its JSON (or ``{'error': ...}``);
    ``size`` overrides the model's latent height and width."""
    cmd = [sys.executable, "-m", "lowbit.bench.memory", model, dtype] + ([str(checkpoint)] if checkpoint else [])
    cmd += ["--batch", str(batch), "--steps", str(steps), "--threads", str(threads)]
    cmd += [] if size is None else ["--size", str(size)]
    # eager helpers without torch.compile: inductor's own memory is a one-off compile cost, not
    # what the model needs to run
    env = dict(os.environ, LOWBIT_COMPILE_QUANT="0")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"error": (r.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1])


if __name__ == "__main__":
    _main()
