"""GPTQ layout: packing against the documented formula, exact export -> import round trips, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bitsmith.formats.gptq_layout import GPTQError, GPTQFormat, from_gptq, pack_columns, to_gptq
from bitsmith.io.checkpoint import read_info
from bitsmith.io.export_gptq import export_gptq
from bitsmith.io.import_gptq import load_gptq_folder
from bitsmith.io.packed import quantized_tensors
from bitsmith.pipeline.plan import QuantizePlan
from bitsmith.pipeline.quantize import quantize
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

from tests.tiny import make_tiny_model


def _random_qt(spec: str, out: int = 64, cols: int = 128, seed: int = 0) -> QuantizedTensor:
    s = QuantSpec.parse(spec)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, s.qmax + 1, (out, cols), generator=g).to(torch.uint8)
    groups = s.groups_per_row(cols)
    scale = (torch.rand(out, groups, generator=g) * 0.01 + 1e-3).half()
    zero = torch.randint(1, s.qmax + 1, (out, groups), generator=g).half() if s.has_zero else None
    return QuantizedTensor(codes, scale, zero, s)


def test_4bit_packing_matches_gptq_formula() -> None:
    """qweight[i, j] = sum_k code[j, 8i + k] << 4k (AutoGPTQ's pack loop, written out)."""
    qt = _random_qt("w4g32")
    got = to_gptq(qt).qweight
    codes = qt.codes.long()
    want = torch.zeros(codes.shape[1] // 8, codes.shape[0], dtype=torch.int64)
    for k in range(8):
        want |= codes[:, k::8].t() << (4 * k)
    want = torch.where(want >= 2**31, want - 2**32, want)  # the same 32 bits, read as int32
    assert torch.equal(got, want.int())


def test_3bit_words_straddle_like_gptq() -> None:
    """32 3-bit codes fill 3 int32 words; code 10 spans words 0 and 1 (bits 30-32)."""
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 0b111
    words = pack_columns(codes, 3)[0].long() & 0xFFFFFFFF
    assert words.tolist() == [0b11 << 30, 0b1, 0]


@pytest.mark.parametrize("spec", ["w4g32", "w4g32s", "w8g64", "w3g32", "w2g32s", "w4"])
@pytest.mark.parametrize("fmt", list(GPTQFormat))
def test_layer_round_trip_is_exact(spec: str, fmt: GPTQFormat) -> None:
    qt = _random_qt(spec)
    s = qt.spec
    back = from_gptq(to_gptq(qt, fmt), s.bits, s.group_size or -1, s.symmetric, fmt)
    assert back.spec == s
    assert torch.equal(back.codes, qt.codes) and torch.equal(back.scale, qt.scale)
    assert torch.equal(back.dequantize(), qt.dequantize())


def test_folder_export_import_round_trips(tmp_path: Path) -> None:
    src = make_tiny_model(tmp_path / "tiny", "qwen2")  # qwen2: biases on q/k/v stay next to the packed weight
    ck = quantize(src, tmp_path / "ck", QuantizePlan(QuantSpec.parse("w4g32")))
    export_gptq(ck, tmp_path / "gptq")
    config, quantized, others = load_gptq_folder(tmp_path / "gptq")
    assert config["quantization_config"] == {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                                             "sym": False, "checkpoint_format": "gptq", "lm_head": False}
    original = quantized_tensors(ck, read_info(ck))
    assert set(quantized) == set(original)
    for name, qt in original.items():
        assert quantized[name][1] is None and torch.equal(quantized[name][0].dequantize(), qt.dequantize()), name
    assert "model.layers.0.self_attn.q_proj.bias" in others and "model.embed_tokens.weight" in others
    assert (tmp_path / "gptq" / "tokenizer.json").is_file() or (tmp_path / "gptq" / "vocab.json").is_file()


def test_refusals() -> None:
    with pytest.raises(GPTQError, match="non-uniform"):
        qt = _random_qt("w4g32")
        to_gptq(QuantizedTensor(qt.codes, qt.scale, None, QuantSpec.parse("w4g32nf"), torch.linspace(-1, 1, 16).half()))
    with pytest.raises(GPTQError, match="short last group"):
        to_gptq(_random_qt("w4g64", cols=96))
    qt = _random_qt("w4g32")
    zero = qt.zero.clone()
    zero[0, 0] = 0
    with pytest.raises(GPTQError, match="gptq_v2"):
        to_gptq(QuantizedTensor(qt.codes, qt.scale, zero, qt.spec))
    to_gptq(QuantizedTensor(qt.codes, qt.scale, zero, qt.spec), GPTQFormat.V2)  # v2 stores it


def test_fractional_zeros_are_rounded_and_reported() -> None:
    qt = _random_qt("w4g32")
    frac = QuantizedTensor(qt.codes, qt.scale, qt.zero + 0.25, qt.spec)
    assert to_gptq(frac).max_zero_rounding == pytest.approx(0.25)


def test_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    src = make_tiny_model(tmp_path / "tiny")
    with pytest.raises(GPTQError, match="not a bitsmith checkpoint"):
        export_gptq(src, tmp_path / "out")
