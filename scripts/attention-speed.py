"""Per-forward time of one W8A8 checkpoint with its attention matmuls on int8 codes
(``lowbit.kernels.int8_attention``, what ``compute="auto"`` picks) against the emulated bf16
attention core, bf16 activations, one thread, medians of interleaved runs, SQNR against FP32.

Usage: ``.venv/bin/python scripts/attention-speed.py sdtext`` (or ``sdlike --size 128 --batch 1``
for Stable Diffusion's 4,096-token attention; ``--compile`` compiles both models, and there
``auto`` keeps the emulated core, so pass ``--path int8`` to time the forced kernel).
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lowbit.bench.run import BUILTIN_MODELS, MODELS
from lowbit.evaluate.sampling import trajectory_inputs
from lowbit.io import load, save
from lowbit.kernels.select import install_attention_kernels
from lowbit.nn import sqnr_db
from lowbit.quantize import quantize

ap = argparse.ArgumentParser()
ap.add_argument("model", choices=BUILTIN_MODELS)
ap.add_argument("--size", type=int, help="latent height and width (default: the model's)")
ap.add_argument("--batch", type=int, help="default: the benchmark's")
ap.add_argument("--repeats", type=int, default=7)
ap.add_argument("--path", default="auto", choices=["auto", "int8"])
ap.add_argument("--compile", action="store_true")
a = ap.parse_args()
torch.set_num_threads(1)
spec = MODELS[a.model]
fp = spec.load().eval()
calib = trajectory_inputs(fp, spec.scheduler, n=spec.batch, steps=5, shape=spec.shape, progress=False)
shape = spec.shape if a.size is None else (spec.shape[0], a.size, a.size)
g = torch.Generator().manual_seed(0)
x, t = torch.randn(a.batch or spec.batch, *shape, generator=g), torch.tensor(500)
with torch.no_grad():
    ref = fp(x, t).sample
ckpt = Path(tempfile.mkdtemp()) / f"{a.model}-w8a8.safetensors"
save(quantize(spec.load(), "w8a8", calib, progress=False), ckpt)
del fp
fns = {}
for tag in ("emulated", a.path):
    with torch.device("meta"):
        m = spec.build()
    q = load(ckpt, m, dtype=torch.bfloat16)
    n = install_attention_kernels(q, tag)
    print(f"{tag}: {n} attention cores with the int8 kernel", flush=True)
    f = torch.compile(q, dynamic=False) if a.compile else q
    fns[tag] = (lambda f=f: f(x.bfloat16(), t).sample.float())
with torch.no_grad():
    for k, f in fns.items():
        t0 = time.perf_counter()
        y = f()
        print(f"{k}: first call {time.perf_counter() - t0:.1f} s, SQNR vs FP32 {sqnr_db(ref, y):.2f} dB", flush=True)
    ts = {k: [] for k in fns}
    for _ in range(a.repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
med = {k: statistics.median(v) for k, v in ts.items()}
print(f"{a.model} {'x'.join(map(str, shape))} batch {x.shape[0]} {'compiled' if a.compile else 'eager'}: "
      + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in med.items())
      + f"; emulated / {a.path} = {med['emulated'] / med[a.path]:.3f}")
