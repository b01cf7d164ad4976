"""Tests for lowbit.pack: byte counts, exact layout, round trips and errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import CheckpointError, FormatError
from lowbit.pack import pack, packed_nbytes, unpack

ALL_BITS = list(range(1, 9))
NUMELS = [0, 1, 2, 3, 7, 8, 9, 13, 16, 17, 255, 1001]


def reference_pack(codes: list[int], bits: int) -> bytes:
    """Independent, deliberately naive bit-by-bit implementation of the documented layout."""
    out = bytearray((len(codes) * bits + 7) // 8)
    for i, code in enumerate(codes):
        for j in range(bits):
            if (code >> j) & 1:
                k = i * bits + j
                out[k // 8] |= 1 << (k % 8)
    return bytes(out)


def random_codes(numel: int, bits: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (numel,), generator=gen, dtype=torch.int64).to(torch.uint8)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("numel", NUMELS)
def test_round_trip_and_byte_count(bits: int, numel: int) -> None:
    codes = random_codes(numel, bits, seed=bits * 10_000 + numel)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.dim() == 1
    assert packed.numel() == packed_nbytes(numel, bits) == -(-numel * bits // 8)
    out = unpack(packed, bits, numel)
    assert out.dtype == torch.uint8 and out.shape == (numel,)
    assert torch.equal(out, codes)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_layout_matches_reference(bits: int) -> None:
    for numel in (1, 5, 8, 11, 24, 37):
        codes = random_codes(numel, bits, seed=bits * 100 + numel)
        expected = reference_pack(codes.tolist(), bits)
        assert bytes(pack(codes, bits).tolist()) == expected


@pytest.mark.parametrize("bits", ALL_BITS)
def test_pad_bits_are_zero_with_max_codes(bits: int) -> None:
    codes = torch.full((3,), (1 << bits) - 1, dtype=torch.uint8)
    packed = pack(codes, bits)
    total = 3 * bits
    assert bytes(packed.tolist()) == reference_pack(codes.tolist(), bits)
    last = int(packed[-1])
    used = total - 8 * (packed.numel() - 1)
    assert last >> used == 0


def test_literal_layouts() -> None:
    u8 = torch.uint8
    assert pack(torch.tensor([1, 2], dtype=u8), 4).tolist() == [0x21]
    assert pack(torch.tensor([1, 2, 3], dtype=u8), 4).tolist() == [0x21, 0x03]
    assert pack(torch.tensor([1, 2, 3, 0], dtype=u8), 2).tolist() == [0b00111001]
    # 3-bit [7, 1] is 6 bits -> one byte; a third code spills into a second (zero) byte.
    assert pack(torch.tensor([7, 1], dtype=u8), 3).tolist() == [0x0F]
    assert pack(torch.tensor([7, 1, 0], dtype=u8), 3).tolist() == [0x0F, 0x00]
    assert pack(torch.tensor([0, 0, 4], dtype=u8), 3).tolist() == [0x00, 0x01]
    assert pack(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1], dtype=u8), 1).tolist() == [0x8D, 0x01]
    assert pack(torch.tensor([0xAB, 0x01], dtype=u8), 8).tolist() == [0xAB, 0x01]
    assert pack(torch.tensor([31, 1], dtype=u8), 5).tolist() == [0x3F, 0x00]


def test_multidimensional_input_is_flattened_in_c_order() -> None:
    codes = random_codes(24, 3, seed=7)
    grid = codes.reshape(2, 3, 4)
    assert torch.equal(pack(grid, 3), pack(codes, 3))
    assert torch.equal(pack(grid.transpose(0, 2), 3), pack(grid.transpose(0, 2).reshape(-1), 3))
    assert torch.equal(unpack(pack(grid, 3), 3, 24), codes)


def test_pack_does_not_alias_input() -> None:
    codes = torch.tensor([1, 2, 3], dtype=torch.uint8)
    packed = pack(codes, 8)
    packed[0] = 99
    assert codes.tolist() == [1, 2, 3]


def test_packed_nbytes_values() -> None:
    assert packed_nbytes(0, 3) == 0
    assert packed_nbytes(1, 1) == 1
    assert packed_nbytes(8, 1) == 1
    assert packed_nbytes(9, 1) == 2
    assert packed_nbytes(3, 3) == 2
    assert packed_nbytes(10_000_000, 3) == 3_750_000


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bad_bits_raise_format_error(bits: int) -> None:
    with pytest.raises(FormatError, match="bit width"):
        pack(torch.zeros(4, dtype=torch.uint8), bits)
    with pytest.raises(FormatError):
        unpack(torch.zeros(4, dtype=torch.uint8), bits, 4)
    with pytest.raises(FormatError):
        packed_nbytes(4, bits)


def test_code_too_large_raises_format_error() -> None:
    with pytest.raises(FormatError, match=r"code 16 .*4 bits"):
        pack(torch.tensor([3, 16, 2], dtype=torch.uint8), 4)
    with pytest.raises(FormatError, match=r"code 200 .*3 bits"):
        pack(torch.tensor([200, 9], dtype=torch.uint8), 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.int8])
def test_non_uint8_input_raises_format_error(dtype: torch.dtype) -> None:
    with pytest.raises(FormatError, match="uint8"):
        pack(torch.zeros(4, dtype=dtype), 4)


def test_truncated_buffer_raises_checkpoint_error() -> None:
    packed = pack(random_codes(10, 3, seed=1), 3)
    with pytest.raises(CheckpointError, match=r"has 3 bytes but 4 were expected.*re-save"):
        unpack(packed[:3], 3, 10)
    with pytest.raises(CheckpointError, match="bytes but"):
        unpack(torch.cat([packed, packed[:1]]), 3, 10)
    with pytest.raises(CheckpointError, match="bytes but"):
        unpack(packed, 3, 11)


def test_unpack_rejects_wrong_dtype_or_shape() -> None:
    with pytest.raises(CheckpointError, match="1-D uint8"):
        unpack(torch.zeros(4, dtype=torch.int32), 8, 4)
    with pytest.raises(CheckpointError, match="1-D uint8"):
        unpack(torch.zeros(2, 2, dtype=torch.uint8), 8, 4)


@settings(max_examples=50, deadline=None)
@given(data=st.data(), bits=st.integers(min_value=1, max_value=8))
def test_round_trip_property(data: st.DataObject, bits: int) -> None:
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=70))
    codes = torch.tensor(values, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert bytes(packed.tolist()) == reference_pack(values, bits)
    assert unpack(packed, bits, len(values)).tolist() == values
