"""Per-forward time of a DiT-S-like transformer (random weights) in FP32/BF16 against lowbit
W8A8/W4A8 checkpoints loaded onto the meta device, one thread, medians of interleaved runs.

The benchmark models of ``lowbit bench`` are UNets; this probe checks the same kernels on a
Linear-dominated diffusion transformer: diffusers' ``DiTTransformer2DModel`` with DiT-S widths
(12 blocks, hidden 384, 6 heads; 4×32×32 latents, patch 2: 256 tokens), class-conditional,
batch 4. Its weights are random, so the SQNRs (one forward's output against FP32's) measure the
arithmetic, not image quality; calibration is on random inputs. Usage:
``.venv/bin/python scripts/dit-forward-speed.py [repeats]``.
"""
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel

import lowbit
from lowbit.evaluate.runner import sampling_model
from lowbit.io import fp32_safetensors_bytes

torch.set_num_threads(1)
REPEATS = int(sys.argv[1]) if len(sys.argv) > 1 else 5


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, num_layers=12,
                                 sample_size=32, patch_size=2).eval()


def inputs(seed: int, batch: int = 4) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 32, 32, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            torch.randint(0, 1000, (batch,), generator=g))


fp = build()
fp_bytes = fp32_safetensors_bytes(fp)
print(f"DiT-S-like: {sum(p.numel() for p in fp.parameters()) / 1e6:.1f}M parameters, fp32 file {fp_bytes:,} B")
x, t, y = inputs(12345)
variants = {"fp32": (fp, torch.float32, False), "bf16": (build().to(torch.bfloat16), torch.bfloat16, False)}
variants["bf16 + compile"] = (build().to(torch.bfloat16), torch.bfloat16, True)
calib = [inputs(s) for s in range(8)]
for recipe in ("w8a8", "w4a8"):
    path = lowbit.save(lowbit.quantize(build(), recipe, calib, progress=False),
                       Path(tempfile.mkdtemp()) / f"dit-{recipe}.safetensors")
    paths = []
    for dtype, comp, label in ((torch.float32, False, ""), (torch.bfloat16, False, " bf16"),
                               (torch.bfloat16, True, " bf16 + compile")):
        with torch.device("meta"):
            fresh = build()
        q = lowbit.load(path, fresh, dtype=dtype)
        paths = Counter(r.path for r in lowbit.report(q))
        variants[recipe + label] = (q, dtype, comp)
    print(f"{recipe}: checkpoint {path.stat().st_size:,} B ({path.stat().st_size / fp_bytes:.3f}x fp32); "
          f"layers {dict(paths)}", flush=True)

calls = {}
for name, (model, dtype, comp) in variants.items():
    sm = sampling_model(model, "bfloat16" if dtype == torch.bfloat16 else "float32", comp)
    calls[name] = (lambda sm=sm: sm(x, t, y)) if sm is not model else (lambda m=model, d=dtype: m(x.to(d), t, y).sample.float())
with torch.no_grad():
    # sampling_model's wrapper passes (x, t) only: the class labels ride along as a third argument
    outs = {n: c() for n, c in calls.items()}  # warm-up (compiles), and the outputs for the SQNRs
    times = {n: [] for n in calls}
    for _ in range(REPEATS):
        for n, c in calls.items():
            t0 = time.perf_counter()
            c()
            times[n].append(time.perf_counter() - t0)
ref = outs["fp32"]
fp_ms = statistics.median(times["fp32"]) * 1e3
print(f"\n| variant | ms per forward (batch 4) | × FP32 | SQNR vs FP32 dB |\n|---|---|---|---|")
for n in calls:
    ms = statistics.median(times[n]) * 1e3
    sq = "–" if n == "fp32" else f"{10 * torch.log10(ref.pow(2).mean() / (outs[n] - ref).pow(2).mean()):.1f}"
    print(f"| {n} | {ms:.1f} | {fp_ms / ms:.2f} | {sq} |")
