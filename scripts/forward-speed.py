"""Per-forward time of FP32 eager against lowbit W8A8/W4A8 checkpoints (float32 activations),
eager and compiled, on one benchmark model, one thread, medians of 5 interleaved runs.

A quick check for a CPU where the full ``lowbit bench`` is impractical (it runs bf16 rows, which
on CPUs without oneDNN bf16 kernels are ~60x slower than fp32). Usage:
``.venv/bin/python scripts/forward-speed.py bundled`` (or ``sdlike``).
"""
import tempfile
import statistics
import sys
import time

import torch

torch.set_num_threads(1)
from pathlib import Path
from lowbit.bench.run import MODELS
from lowbit.evaluate.sampling import trajectory_inputs
from lowbit.quantize import quantize
from lowbit.io import save, load
from lowbit.nn import sqnr_db, quant_layers
name = sys.argv[1]
spec = MODELS[name]
fp = spec.load().eval()
calib = trajectory_inputs(fp, spec.scheduler, n=spec.batch, steps=5, shape=spec.shape, progress=False)
x, t = calib[0][0], calib[0][1]
fns = {"fp32": lambda: fp(x, t.clone()).sample}
for r in ("w8a8", "w4a8"):
    p = Path(tempfile.mkdtemp()) / f"{name}-{r}.safetensors"
    save(quantize(spec.load(), r, calib, progress=False), p)  # a fresh checkpoint: the real user path
    with torch.device("meta"):
        m = spec.build()
    q = load(p, m)
    ns = sum(getattr(k.kernel, "split", False) for _, k in quant_layers(q) if getattr(k, "kernel", None) is not None)
    print(r, "split layers", ns, flush=True)
    fns[r] = (lambda q=q: q(x, t.clone()).sample)
    qc = torch.compile(q, dynamic=False)
    fns[r + "+compile"] = (lambda qc=qc: qc(x, t.clone()).sample)
with torch.no_grad():
    ref = fns["fp32"]()
    for k, f in fns.items():
        t0 = time.perf_counter(); y = f(); print(k, "first", round(time.perf_counter() - t0, 1), "s, SQNR", round(float(sqnr_db(ref, y)), 1) if k != "fp32" else "", flush=True)
    ts = {k: [] for k in fns}
    for r in range(5):
        for k, f in fns.items():
            t0 = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in ts.items()}
    for k in fns: print(name, k, f"{1e3*med[k]:.1f} ms/step", f"x{med['fp32']/med[k]:.2f}", flush=True)
