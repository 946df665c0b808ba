import pytest
import torch

from bitsmith.formats.packing import pack, packed_row_bytes, unpack


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 8), (4, 576), (2, 1001), (0, 16)])
def test_pack_roundtrip_exact(bits: int, shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(bits * 1000 + shape[1])
    codes = torch.randint(0, 1 << bits, shape, generator=gen, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (shape[0], packed_row_bytes(shape[1], bits))
    assert torch.equal(unpack(packed, bits, shape[1]), codes)


def test_pack_known_bytes() -> None:
    # 4-bit: code i of a run sits in bits [4i, 4i+4) of a little-endian stream.
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]
    # 3-bit: 8 codes of 7 fill 3 bytes with ones.
    assert pack(torch.full((1, 8), 7, dtype=torch.uint8), 3).tolist() == [[255, 255, 255]]


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="too large for 3 bits"):
        pack(torch.tensor([[8]], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="need"):
        unpack(torch.zeros(2, 5, dtype=torch.uint8), 4, 16)


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_matches_bitstream_oracle(bits: int) -> None:
    """Every width against an independent oracle: each code's bits, little-endian, laid end to end per
    row (rows padded to whole runs of 8 codes) and cut into bytes by numpy's packbits."""
    import numpy as np

    gen = torch.Generator().manual_seed(bits)
    for cols in (1, 7, 8, 13, 64, 129):
        codes = torch.randint(0, 1 << bits, (6, cols), dtype=torch.uint8, generator=gen)
        padded = np.zeros((6, -(-cols // 8) * 8), np.uint8)
        padded[:, :cols] = codes.numpy()
        stream = ((padded[..., None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(6, -1)
        expected = torch.from_numpy(np.packbits(stream, axis=1, bitorder="little"))
        assert torch.equal(pack(codes, bits), expected)
        codes_copy = codes.clone()
        pack(codes, bits)
        assert torch.equal(codes, codes_copy)  # the input is never modified in place


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_of_a_transposed_matrix_is_row_major(bits: int) -> None:
    """Codes in any memory layout pack as their values say, into a contiguous result (the exporters
    view packed rows as int32)."""
    codes = torch.randint(0, 1 << bits, (16, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack(codes.t(), bits)
    assert packed.is_contiguous()
    one_row = pack(codes.t()[:1], bits)
    assert one_row.stride() == (one_row.shape[1], 1)  # canonical strides even for a single row
    assert torch.equal(packed, pack(codes.t().contiguous(), bits))
