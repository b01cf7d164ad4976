"""Would int8 attention matmuls pay? Times the two attention matmuls of each benchmark model.

Quantized attention (``QuantAttnProcessor``) fake-quantizes Q, K, the softmax probabilities
and V, then runs its two batched matmuls (QKᵀ and PV) in float — bf16 in a bf16 model. A native
int8 version would run them as int8 GEMMs (``torch._int_mm``, one call per batch × head: PyTorch
has no batched int8 matmul on CPU) plus a dequantization of the int32 result. This module
measures, at the exact shapes each model's attention layers see, what the matmuls cost each
way, and how much of a sampling step the bf16 matmuls are: the most an int8 path could save.
The quantization of the operands is left out of every column (the emulated path pays it too);
int8 pads the tokens to a multiple of 8 (``_int_mm``'s constraint).

``lowbit bench`` appends the table to its report; ``python -m lowbit.bench.attention`` prints it.
The bare matmuls are not the whole story: :mod:`lowbit.kernels.int8_attention`, the int8 core,
also quantizes its operands and runs the softmax in blocks, and whole cores compare differently
(``docs/performance-notes.md``; ``scripts/attention-speed.py`` times whole models).
"""

from __future__ import annotations

import statistics
import time

import torch

__all__ = ["attention_shapes", "attention_table"]


def attention_shapes(model: torch.nn.Module, inputs: tuple) -> list[tuple[int, int, int, int, int]]:
    """``(batch × heads, query tokens, key tokens, head_dim, count)`` of every distinct attention
    shape in one forward pass of ``model`` on ``inputs``. Key tokens differ from query tokens in
    cross-attention (a text-conditioned UNet's 77 prompt tokens)."""
    seen: dict[tuple[int, int, int, int], int] = {}

    def tokens_of(t: torch.Tensor) -> int:
        return t.shape[2] * t.shape[3] if t.dim() == 4 else t.shape[1]

    def hook(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        b, tq = x.shape[0], tokens_of(x)
        tk = tq if context is None else tokens_of(context)
        head_dim = mod.inner_dim // mod.heads if hasattr(mod, "inner_dim") else x.shape[1] // mod.heads
        key = (b * mod.heads, tq, tk, head_dim)
        seen[key] = seen.get(key, 0) + 1

    mods = [m for m in model.modules() if hasattr(m, "get_attention_scores") and hasattr(m, "heads")]
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in mods]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return [(bh, tq, tk, d, n) for (bh, tq, tk, d), n in seen.items()]


def _median_ms(fn, repeats: int = 15) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _matmul_ms(bh: int, tq: int, tk: int, head_dim: int) -> dict[str, float]:
    """QKᵀ ([Tq,d]·[d,Tk]) plus PV ([Tq,Tk]·[Tk,d]) for ``bh`` heads, in ms, three ways."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(bh, tq, head_dim, generator=g)
    k, v = (torch.randn(bh, tk, head_dim, generator=g) for _ in range(2))
    p = torch.softmax(torch.randn(bh, tq, tk, generator=g), -1)
    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        qd, kd, vd, pd = q.to(dt), k.to(dt), v.to(dt), p.to(dt)
        out[name] = _median_ms(lambda: (torch.bmm(qd, kd.transpose(1, 2)), torch.bmm(pd, vd)))
    # _int_mm needs more than 16 rows and K, N multiples of 8: tokens are padded up to that
    pq, pk = (max(24, -(-n // 8) * 8) for n in (tq, tk))
    qi = torch.randint(-127, 128, (bh, pq, head_dim), dtype=torch.int8, generator=g)
    vi = torch.randint(-127, 128, (bh, pk, head_dim), dtype=torch.int8, generator=g)
    kt = torch.randint(-127, 128, (bh, head_dim, pk), dtype=torch.int8, generator=g)
    pi = torch.randint(0, 128, (bh, pq, pk), dtype=torch.int8, generator=g)
    scale = torch.tensor(1e-3)

    def int8():
        for i in range(bh):
            (torch._int_mm(qi[i], kt[i]).float() * scale, torch._int_mm(pi[i], vi[i]).float() * scale)

    out["int8"] = _median_ms(int8) if head_dim % 8 == 0 else float("nan")
    return out


def attention_table(model: torch.nn.Module, inputs: tuple, step_ms: float | None = None) -> list[str]:
    """Markdown rows: each attention shape's matmul time in fp32, bf16 and int8, and (given the
    measured ``step_ms`` of one denoising step) the bf16 matmuls' share of it."""
    rows = ["| heads × batch | query tokens | key tokens | head dim | layers | fp32 ms | bf16 ms |"
            " int8 `_int_mm` ms | int8 speed-up over bf16 |",
            "|---|---|---|---|---|---|---|---|---|"]
    total_bf16 = 0.0
    for bh, tq, tk, d, n in attention_shapes(model, inputs):
        t = _matmul_ms(bh, tq, tk, d)
        total_bf16 += n * t["bf16"]
        rows.append(f"| {bh} | {tq} | {tk} | {d} | {n} | {t['fp32']:.3f} | {t['bf16']:.3f} | {t['int8']:.3f} |"
                    f" {t['bf16'] / t['int8']:.2f} |")
    if step_ms:
        rows += ["", f"All attention matmuls in bf16: {total_bf16:.1f} ms per step, {100 * total_bf16 / step_ms:.1f} % of"
                 f" a {step_ms:.0f} ms lowbit w8a8 + compile step."]
    return rows


if __name__ == "__main__":
    from .run import MODELS

    torch.set_num_threads(1)
    for name in ("bundled", "sdlike", "sdtext"):
        spec = MODELS[name]
        model = spec.build()
        x = (torch.randn(spec.batch, *spec.shape), torch.tensor(500))
        print(f"## {name}\n")
        print("\n".join(attention_table(model, x)) + "\n")
