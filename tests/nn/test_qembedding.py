"""QuantEmbedding holds codes below 8 bits packed and unpacks only the looked-up rows; a tied head's native
kernel lends it its packed codes so the table is held once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bitsmith.formats.packing import packed_row_bytes
from bitsmith.methods.rtn import rtn
from bitsmith.nn.qembedding import QuantEmbedding, shared_codes
from bitsmith.nn.qlinear import QuantLinear
from bitsmith.spec import QuantSpec

from tests.tiny import make_tiny_model


@pytest.mark.parametrize("spec", ["w2g32", "w3g64", "w4g32s", "w5g128", "w6g128", "w7", "w8", "w4g32nf"])
def test_lookups_equal_the_unpacked_table(spec: str) -> None:
    """Rows of a 100 x 200 table (ragged last group at 64 and 128) through packed storage match the
    dequantized table's rows exactly, with an embedding scale too; 8-bit and grid codes stay unpacked."""
    g = torch.Generator().manual_seed(hash(spec) % 1000)
    qt = rtn(torch.randn(100, 200, generator=g), QuantSpec.parse(spec), None, {"clip_search": False})
    emb = QuantEmbedding(qt, embed_scale=1.5)
    packed = qt.spec.bits < 8 and qt.spec.grid == "uniform"
    assert (emb._packed is not None) == packed
    if packed:
        assert tuple(emb._packed.shape) == (100, packed_row_bytes(200, qt.spec.bits))
        assert sum(t.numel() * t.element_size() for t in emb.held_tensors()) < qt.codes.numel()  # below a byte a code
    ids = torch.randint(0, 100, (3, 7), generator=g)
    torch.testing.assert_close(emb(ids), qt.dequantize()[ids] * 1.5, rtol=0, atol=0)
    assert torch.equal(emb.qt.codes, qt.codes) and torch.equal(emb.qt.scale, qt.scale)


@pytest.mark.parametrize("spec", ["w6g32", "w4g32", "w3g32", "w8"])
def test_a_tied_head_shares_its_packed_codes(tmp_path: Path, spec: str) -> None:
    """A tied model loaded with outputs at ``spec``: the embedding holds the head kernel's own bytes (not
    at 3 bits, whose kernel may repack in place: there it keeps its own packed copy), and lookups and
    logits are those of the unshared table."""
    from bitsmith.pipeline.outputs import with_output_spec
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize
    from bitsmith.runtime.load import load_model
    from bitsmith.runtime.options import RuntimeOptions

    src = make_tiny_model(tmp_path / "m", tie_word_embeddings=True)
    plan = with_output_spec(QuantizePlan(QuantSpec.parse("w4g32"), "rtn"), src, QuantSpec.parse(spec))
    exact = RuntimeOptions(int8_decode=False, prefill="exact")  # the head's float path: comparable to x @ W^T
    model = load_model(quantize(src, tmp_path / "q", plan), options=exact).model
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear)
    qt = emb.qt
    if spec == "w8":
        assert emb._table is not None and emb._table.codes.data_ptr() == head._kernel.qweight.data_ptr()
    elif spec == "w3g32":
        assert emb._packed is not None and emb._packed.data_ptr() != head._kernel.qweight.data_ptr()
        assert shared_codes(head, qt) is None
    else:
        assert emb._packed.data_ptr() == head._kernel.qweight.data_ptr()
    ids = torch.arange(3, 40).unsqueeze(0)
    torch.testing.assert_close(emb(ids)[0], qt.dequantize()[ids[0]], rtol=0, atol=0)
    x = torch.randn(5, qt.shape[1])
    torch.testing.assert_close(head(x), x @ qt.dequantize().T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_and_unpack_in_row_slices_equal_one_go(monkeypatch: pytest.MonkeyPatch, bits: int) -> None:
    """Large tables are packed and unpacked a slice of rows at a time (bounded int64 intermediates); the
    bytes and codes are those of the whole-matrix path, including a last slice shorter than the others."""
    from bitsmith.formats import packing

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (23, 75), generator=g, dtype=torch.uint8)
    whole = packing.pack(codes, bits)
    monkeypatch.setattr(packing, "ROW_SLICE", 5)
    sliced = packing.pack(codes, bits)
    assert torch.equal(sliced, whole)
    assert torch.equal(packing.unpack(sliced, bits, 75), codes)
