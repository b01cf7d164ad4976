"""Dense bit packing of b-bit integer codes (b in 1..8) into uint8 tensors.

A quantized checkpoint stores each weight as a small integer code. Saving those codes one per
byte would make a 3-bit or 4-bit checkpoint as large as an 8-bit one, so :func:`pack` writes them
as a continuous little-endian bit stream: code ``i`` occupies stream bits ``[i*b, (i+1)*b)``, its
least-significant bit first, and stream bit ``k`` is bit ``k % 8`` of byte ``k // 8``. Trailing
pad bits are zero. Two 4-bit codes therefore share a byte (first code in the low nibble).

It is hand-written because no library packs arbitrary-width codes (3, 5, 6, 7 bits included)
into a plain 1-D uint8 tensor that safetensors can store and any reader can decode from this
documented layout. Everything is vectorized in torch: the general path packs groups of eight
codes (exactly ``b`` bytes) into one int64 word with shifts and reads its low ``b`` bytes back.
"""

from __future__ import annotations

import sys

import torch

from lowbit.errors import CheckpointError, FormatError

__all__ = ["packed_nbytes", "pack", "unpack"]

_GROUP = 8  # eight b-bit codes fill exactly b bytes
_LITTLE = sys.byteorder == "little"


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise FormatError(f"bit width {bits!r} is not supported; use an integer from 1 to 8")


def _check_numel(numel: int) -> None:
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise FormatError(f"code count {numel!r} is invalid; pass a non-negative integer")


def packed_nbytes(numel: int, bits: int) -> int:
    """Return the number of bytes ``pack`` produces for ``numel`` codes of ``bits`` bits.

    This is ``ceil(numel * bits / 8)``.
    """
    _check_bits(bits)
    _check_numel(numel)
    return (numel * bits + 7) // 8


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(_GROUP, dtype=torch.int64, device=device) * bits


def _word_bytes(words: torch.Tensor) -> torch.Tensor:
    """View an int64 [M] tensor as [M, 8] uint8, byte 0 least significant."""
    out = words.view(torch.uint8).reshape(-1, 8)
    return out if _LITTLE else out.flip(-1)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes`` (any shape, flattened in C order) into a dense bit stream.

    Every code must be below ``2**bits``. Returns a 1-D uint8 tensor of
    ``packed_nbytes(codes.numel(), bits)`` bytes on the same device as ``codes``, laid out
    LSB-first as described in the module docstring.

    Raises:
        FormatError: ``bits`` is not in 1..8, ``codes`` is not a uint8 tensor, or a code does
            not fit in ``bits`` bits.
    """
    _check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise FormatError(f"codes must be a uint8 tensor, got {got}; convert with .to(torch.uint8)")
    flat = codes.reshape(-1)
    n = flat.numel()
    if n and bits < 8:
        largest = int(flat.max())
        if largest >= 1 << bits:
            raise FormatError(
                f"code {largest} does not fit in {bits} bits (max {(1 << bits) - 1}); "
                "clamp the codes or use a wider bit width"
            )
    nbytes = packed_nbytes(n, bits)
    if bits == 8:
        return flat.clone()
    if bits == 4:
        if n % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        pairs = flat.reshape(-1, 2)
        return pairs[:, 0] | (pairs[:, 1] << 4)
    groups = -(-n // _GROUP)
    wide = torch.zeros(groups * _GROUP, dtype=torch.int64, device=flat.device)
    wide[:n] = flat
    words = (wide.reshape(groups, _GROUP) << _shifts(bits, flat.device)).sum(dim=1)
    return _word_bytes(words)[:, :bits].reshape(-1)[:nbytes].clone()


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: decode ``numel`` codes of ``bits`` bits from ``packed``.

    Returns a 1-D uint8 tensor of ``numel`` codes on the same device as ``packed``.

    Raises:
        FormatError: ``bits`` is not in 1..8 or ``numel`` is negative.
        CheckpointError: ``packed`` is not a 1-D uint8 tensor of exactly
            ``packed_nbytes(numel, bits)`` bytes.
    """
    expected = packed_nbytes(numel, bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        got = (
            f"a {packed.dim()}-D {packed.dtype} tensor"
            if isinstance(packed, torch.Tensor)
            else type(packed).__name__
        )
        raise CheckpointError(
            f"packed data must be a 1-D uint8 tensor but is {got}; re-save the checkpoint"
        )
    if packed.numel() != expected:
        raise CheckpointError(
            f"packed data has {packed.numel()} bytes but {expected} were expected for {numel} "
            f"codes of {bits} bits: the file is truncated or its metadata was changed; "
            "re-save the checkpoint"
        )
    if bits == 8:
        return packed.clone()
    if bits == 4:
        nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
        return nibbles[:numel].clone()
    groups = -(-numel // _GROUP)
    stream = torch.zeros(groups * bits, dtype=torch.uint8, device=packed.device)
    stream[:expected] = packed
    raw = torch.zeros(groups, 8, dtype=torch.uint8, device=packed.device)
    raw[:, :bits] = stream.reshape(groups, bits)
    if not _LITTLE:
        raw = raw.flip(-1)
    words = raw.reshape(-1).view(torch.int64).reshape(groups, 1)
    codes = (words >> _shifts(bits, packed.device)) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)
