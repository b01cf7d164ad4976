"""The quantized attention core, ``p_quant(softmax(Q·Kᵀ·scale + mask)) · V``, in bounded memory.

:class:`lowbit.nn.QuantAttnProcessor` follows diffusers' classic ``AttnProcessor``: it builds the
whole ``(batch·heads, queries, keys)`` probability matrix, because the probabilities are a
quantized matmul operand and PyTorch's fused ``scaled_dot_product_attention`` cannot quantize
them. That matrix grows with the square of the token count: at Stable Diffusion's 64×64 latents
(4096 tokens, 8 heads, batch 2) it is 1 GiB in float32, several times over once the softmax's
upcast and the quantizer's output are counted, where the FP32 model's SDPA needs a few MB.

Every step after Q·Kᵀ is independent per (batch·head, query row): the softmax runs along the key
axis, and an activation quantizer has one scale per tensor, so it is elementwise. Splitting the
work into blocks of whole heads gives the same values as the full computation (tested bit for
bit), while the largest temporary is one block. Only when a single head's matrix exceeds the
budget are its query rows split too; the matmuls of a smaller block may then round differently in
the last bit (MKL chooses kernels by matrix size), so a probability exactly at a rounding
boundary can land on the neighbouring code (tested: within float32 rounding before the
quantizer).
This is the query-chunking of Rabe & Staats, "Self-attention does not need O(n²) memory" (2021),
without its key-chunking, which would need a running softmax and change the rounding.

Written by hand because no PyTorch or diffusers op computes attention with a quantizer between
the softmax and the second matmul. While calibrating, a min/max observer finds the same range
block by block; an observer that samples the values (percentile, MSE) must see the whole matrix
at once, and the processor then passes an unlimited budget.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["BLOCK_ELEMENTS", "attention_core"]

# the most score elements one block may hold: 1 MB in float32, a few times that with the softmax
# and quantizer temporaries, so that the block stays in L2/L3 and the heap never grows for it.
# The SD-like benchmark model's 16×256×256 score tensor runs as 4 blocks of 4 heads.
BLOCK_ELEMENTS = 1 << 18


def _blocks(n: int, rows: int, keys: int, budget: float) -> list[tuple[slice, slice]]:
    # (batch·head slice, query-row slice) pairs covering the score tensor in memory order
    if n * rows * keys <= budget:
        return [(slice(0, n), slice(0, rows))]
    if rows * keys <= budget:
        g = int(budget // (rows * keys))
        return [(slice(i, min(i + g, n)), slice(0, rows)) for i in range(0, n, g)]
    # at least 64 query rows: MKL picks its GEMM kernel by matrix size, and for a few rows it
    # takes paths that round differently and run slowly
    r = max(64, int(budget // keys) // 64 * 64)
    return [(slice(i, i + 1), slice(j, min(j + r, rows))) for i in range(n) for j in range(0, rows, r)]


def attention_core(attn: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   mask: torch.Tensor | None, p_quant: Callable[[torch.Tensor], torch.Tensor],
                   budget: float = BLOCK_ELEMENTS) -> torch.Tensor:
    """``bmm(p_quant(attn.get_attention_scores(query, key, mask)), value)`` for ``(n, tokens,
    head_dim)`` operands, computed in blocks of at most ``budget`` score elements.

    ``mask`` is diffusers' prepared attention mask (``(n, 1 or queries, keys)``) or None. The
    result equals the one-block computation; ``budget`` only trades memory for loop overhead.
    """
    if not budget >= 1:  # (NaN too)
        raise ValueError(f"attention block budget must be at least 1 score element, got {budget!r}")
    n, rows, keys = query.shape[0], query.shape[1], key.shape[1]
    blocks = _blocks(n, rows, keys, budget)
    if len(blocks) == 1:
        return torch.bmm(p_quant(attn.get_attention_scores(query, key, mask)), value)
    out = []
    for heads, qrows in blocks:
        m = None
        if mask is not None:
            m = mask[heads] if mask.shape[0] > 1 else mask
            m = m[:, qrows] if m.shape[1] > 1 else m
        probs = p_quant(attn.get_attention_scores(query[heads, qrows], key[heads], m))
        out.append(torch.bmm(probs, value[heads]))
        del probs  # before the next block's scores are allocated
    if blocks[0][1].stop - blocks[0][1].start == rows:  # whole heads per block
        return torch.cat(out, dim=0)
    per_head = len(blocks) // n
    return torch.cat([torch.cat(out[i:i + per_head], dim=1) for i in range(0, len(out), per_head)], dim=0)
