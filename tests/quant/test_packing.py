"""Bit packing: round trips for every width, the byte layout by hand, and the errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.quant.packing import pack_bits, packed_len, unpack_bits


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 8),
    lead=st.lists(st.integers(1, 3), max_size=2),
    n=st.integers(1, 70),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip(bits, lead, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (*lead, n), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, packed_len(n, bits)) == (*lead, (n * bits + 7) // 8)
    assert torch.equal(unpack_bits(packed, bits, n), codes)
    pad = packed_len(n, bits) * 8 - n * bits  # the padding bits of the last byte are zero
    if pad:
        assert int((packed[..., -1] >> (8 - pad)).max()) == 0


def test_layout_2_bits():
    # byte j holds codes 4j..4j+3, code 4j+i in bits [2i, 2i+2): 1 | 2<<2 | 3<<4 | 0<<6 = 1 + 8 + 48 = 57
    codes = torch.tensor([1, 2, 3, 0, 3], dtype=torch.uint8)
    assert pack_bits(codes, 2).tolist() == [57, 3]
    assert pack_bits(torch.tensor([3, 3, 3, 3], dtype=torch.uint8), 2).tolist() == [255]


def test_layout_4_bits():
    # low nibble first: [0x1, 0xA] -> 0xA1, a lone trailing 0xF -> 0x0F
    codes = torch.tensor([0x1, 0xA, 0xF], dtype=torch.uint8)
    assert pack_bits(codes, 4).tolist() == [0xA1, 0x0F]


def test_layout_3_and_1_bits():
    # 3-bit stream: 5 = 101, 3 = 011, 7 = 111 -> stream bits (LSB first) 1,0,1, 1,1,0, 1,1 | 1
    # byte 0 = 1 + 4 + 8 + 16 + 64 + 128 = 221, byte 1 = 1
    assert pack_bits(torch.tensor([5, 3, 7], dtype=torch.uint8), 3).tolist() == [221, 1]
    # 1 bit: code i in bit i: 1 + 4 + 8 + 128 = 141
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1], dtype=torch.uint8), 1).tolist() == [141, 1]


@pytest.mark.parametrize("bits", range(1, 9))
def test_zero_rows(bits):  # e.g. KIVI's V codes while every token is still in the fp16 window
    codes = torch.zeros(2, 0, 32, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (2, 0, packed_len(32, bits))
    assert unpack_bits(packed, bits, 32).shape == (2, 0, 32)


def test_layout_8_bits_is_identity():
    codes = torch.tensor([0, 7, 255], dtype=torch.uint8)
    assert torch.equal(pack_bits(codes, 8), codes)


@pytest.mark.parametrize("bits", [0, 9, 16])
def test_bad_bits(bits):
    codes = torch.zeros(4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=f"bits={bits}"):
        pack_bits(codes, bits)
    with pytest.raises(ValueError, match=f"bits={bits}"):
        unpack_bits(codes, bits, 4)
    with pytest.raises(ValueError, match=f"bits={bits}"):
        packed_len(4, bits)


def test_bad_dtype():
    with pytest.raises(ValueError, match="int32"):
        pack_bits(torch.zeros(8, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="float32"):
        unpack_bits(torch.zeros(4, dtype=torch.float32), 4, 8)


def test_bad_length():
    packed = pack_bits(torch.zeros(10, dtype=torch.uint8), 4)  # 5 bytes
    with pytest.raises(ValueError, match="5 bytes, expected 6"):
        unpack_bits(packed, 4, 12)
