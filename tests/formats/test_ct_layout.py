"""compressed-tensors pack-quantized layout: bit-exact against the compressed-tensors package's own
packing and decompression on fresh random layers, regrouping of short last groups, refusals."""

from __future__ import annotations

import pytest
import torch

from bitsmith.formats.ct_layout import CTError, from_ct, pack_rows, to_ct, unpack_rows, weight_args
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

ct = pytest.importorskip("compressed_tensors")


def _random_qt(spec: str, out: int, cols: int, seed: int) -> QuantizedTensor:
    s = QuantSpec.parse(spec)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, s.qmax + 1, (out, cols), generator=g).to(torch.uint8)
    groups = s.groups_per_row(cols)
    scale = (torch.rand(out, groups, generator=g) * 0.01 + 1e-3).half()
    zero = torch.randint(0, s.qmax + 1, (out, groups), generator=g).half() if s.has_zero else None
    return QuantizedTensor(codes, scale, zero, s)


def _ct_decompress(layer) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weight_args(*layer.scheme_key)))
    return PackedQuantizationCompressor.decompress(layer.parts(), scheme)["weight"]


@pytest.mark.parametrize("bits", range(2, 9))
def test_packing_matches_compressed_tensors(bits: int) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(bits)
    for cols in (32, 40, 100, 576):
        codes = torch.randint(0, 1 << bits, (7, cols), generator=g).to(torch.uint8)
        signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
        words = pack_rows(codes, bits)
        assert torch.equal(words, pack_to_int32(signed, bits)), cols
        assert torch.equal(unpack_rows(words, bits, cols), codes)


SPECS = ["w4g128", "w4g128s", "w8", "w8s", "w3g64", "w2g32s", "w5g32", "w6", "w7g256s"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(48, 576), (37, 100), (64, 256)])
def test_decompression_is_bit_exact(spec: str, shape: tuple[int, int]) -> None:
    """float32 scales: compressed-tensors' decompression gives bitsmith's float32 weights bit for bit;
    float16 scales: their fp16 rounding, bit for bit. The import gives the same QuantizedTensor weights."""
    qt = _random_qt(spec, *shape, seed=hash((spec, shape)) % 1000)
    ref = qt.dequantize()
    exact = to_ct(qt, torch.float32)
    assert torch.equal(_ct_decompress(exact), ref)
    assert torch.equal(_ct_decompress(to_ct(qt, torch.float16)), ref.half())
    back = from_ct(exact.parts(), weight_args(*exact.scheme_key))
    assert torch.equal(back.dequantize(), ref)
    assert back.spec == qt.spec or qt.spec.group_size and qt.spec.group_size > shape[1]  # one short group reads as a smaller one


def test_short_last_group_is_split_exactly_and_merged_back() -> None:
    qt = _random_qt("w4g128", 16, 576, seed=3)  # 4 groups of 128 and one of 64
    layer = to_ct(qt)
    assert layer.group_size == 64 and layer.weight_scale.shape == (16, 9)
    back = from_ct(layer.parts(), weight_args(*layer.scheme_key))
    assert back.spec == qt.spec and torch.equal(back.scale, qt.scale) and torch.equal(back.zero, qt.zero)


def test_fractional_zeros_are_rounded_and_reported() -> None:
    qt = _random_qt("w4g32", 8, 64, seed=1)
    frac = QuantizedTensor(qt.codes, qt.scale, (qt.zero + 0.25).clamp(max=15), qt.spec)
    assert to_ct(frac).max_zero_rounding == pytest.approx(0.25)
    assert to_ct(qt).max_zero_rounding == 0.0


def test_refusals() -> None:
    qt = _random_qt("w4g32", 8, 64, seed=2)
    with pytest.raises(CTError, match="non-uniform"):
        to_ct(QuantizedTensor(qt.codes, qt.scale, None, QuantSpec.parse("w4g32nf"), torch.linspace(-1, 1, 16).half()))
    with pytest.raises(CTError, match="round"):
        to_ct(qt, torch.bfloat16)
    layer = to_ct(qt)
    sym = to_ct(_random_qt("w4g32s", 8, 64, seed=2))
    with pytest.raises(CTError, match="no bitsmith spec"):  # 4 distinct groups of 16 merge into no bitsmith size
        from_ct({**sym.parts(), "weight_scale": torch.rand(8, 4) + 0.1}, weight_args(4, 16, True))
    with pytest.raises(CTError, match="weight_zero_point"):
        from_ct({k: v for k, v in layer.parts().items() if k != "weight_zero_point"}, weight_args(*layer.scheme_key))
    with pytest.raises(CTError, match="integer weights"):
        from_ct(layer.parts(), {**weight_args(*layer.scheme_key), "type": "float"})
    with pytest.raises(CTError, match="corrupt"):
        from_ct({**layer.parts(), "weight_packed": layer.weight_packed[:, :-1]}, weight_args(*layer.scheme_key))


def test_shared_group_writes_every_row_with_one_size_exactly() -> None:
    from bitsmith.formats.ct_layout import shared_group

    spec = QuantSpec.parse("w4g128")
    assert shared_group(spec, [576, 1536]) == 64 and shared_group(QuantSpec.parse("w8"), [576]) is None
    qt = _random_qt("w4g128", 8, 1536, seed=4)  # whole groups of 128, written as pairs of 64
    layer = to_ct(qt, torch.float32, 64)
    assert layer.group_size == 64 and torch.equal(_ct_decompress(layer), qt.dequantize())
    back = from_ct(layer.parts(), weight_args(*layer.scheme_key))
    assert back.spec == qt.spec and torch.equal(back.scale, qt.scale)
    with pytest.raises(CTError, match="evenly"):
        to_ct(qt, torch.float32, 96)
