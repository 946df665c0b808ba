"""GGUF export: exact re-encoding of checkpoint codes, metadata and tensors read back with gguf's
own reader, same logits through bitsmith's GGUF source, llama.cpp's type mix, clear refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bitsmith.formats.ggml_types import decode
from bitsmith.io.checkpoint import read_info
from bitsmith.io.gguf.encode import encode_exact
from bitsmith.io.gguf.export import export_gguf
from bitsmith.io.gguf.mixes import ExportError, pick_type
from bitsmith.io.packed import quantized_tensors
from bitsmith.runtime.load import load_model
from bitsmith.pipeline.plan import QuantizePlan
from bitsmith.pipeline.quantize import quantize
from bitsmith.spec import QuantSpec

from tests.tiny import make_tiny_model

GEMMA = {"head_dim": 256, "query_pre_attn_scalar": 256}  # llama.cpp scales attention by 1/sqrt(head_dim)


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITSMITH_CACHE", str(tmp_path / "cache"))


def _checkpoint(tmp_path: Path, arch: str, spec: str) -> Path:
    src = make_tiny_model(tmp_path / arch, arch, **(GEMMA if arch.startswith("gemma") else {}))
    return quantize(src, tmp_path / f"{arch}-{spec}", QuantizePlan(QuantSpec.parse(spec)))


def test_q4_1_reencoding_is_exact_up_to_fp16_m(tmp_path: Path) -> None:
    """Q4_1 stores w = d q + m: d = scale exactly, m = -zero * scale rounded to fp16, the one error."""
    ck = _checkpoint(tmp_path, "llama", "w4g32")
    for name, qt in quantized_tensors(ck, read_info(ck)).items():
        qtype, data, err = encode_exact(qt)
        assert qtype == "Q4_1"
        got = decode(data, "Q4_1", qt.shape)
        want = qt.dequantize().numpy()
        m = -qt.zero.float() * qt.scale.float()  # [out, G]
        bound = (m - m.half().float()).abs().max().item()  # fp16 rounding of m, the only difference
        assert np.abs(got - want).max() <= bound + 1e-9 and err <= bound + 1e-9
        assert np.abs(got - want).max() < 2e-4, name  # measured ~1e-4 on weights of ~0.1: 68 dB


@pytest.mark.parametrize("spec,qtype", [("w4g32s", "Q4_0"), ("w8g32s", "Q8_0"), ("w5g32s", "Q5_0")])
def test_symmetric_reencoding_is_bit_exact(tmp_path: Path, spec: str, qtype: str) -> None:
    ck = _checkpoint(tmp_path, "llama", spec)
    for qt in quantized_tensors(ck, read_info(ck)).values():
        got_type, data, err = encode_exact(qt)
        assert got_type == qtype and err == 0.0
        assert np.array_equal(decode(data, qtype, qt.shape), qt.dequantize().numpy())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_export_gives_same_logits_through_gguf_source(tmp_path: Path, arch: str) -> None:
    ck = _checkpoint(tmp_path, arch, "w4g32s")
    result = export_gguf(ck, tmp_path / "m.gguf")
    assert {t.route for t in result.tensors} == {"exact", "copied"}
    a, b = load_model(ck), load_model(tmp_path / "m.gguf")
    ids = torch.arange(3, 60).unsqueeze(0)
    with torch.no_grad():
        diff = (a.model(ids).logits - b.model(ids).logits).abs().max().item()
    assert diff < 1e-4


def test_gguf_reader_sees_same_tensors_and_metadata(tmp_path: Path) -> None:
    from gguf import GGUFReader

    from bitsmith.io.gguf.names import permute_qk

    ck = _checkpoint(tmp_path, "llama", "w8g32s")
    export_gguf(ck, tmp_path / "m.gguf")
    reader = GGUFReader(str(tmp_path / "m.gguf"))
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == 2 and field("llama.attention.head_count_kv") == 2
    assert field("llama.embedding_length") == 64 and field("general.file_type") == 7  # MOSTLY_Q8_0
    assert field("tokenizer.ggml.bos_token_id") == 1 and field("tokenizer.ggml.eos_token_id") == 2
    assert len(field("tokenizer.ggml.tokens")) == 117
    tensors = {t.name: t for t in reader.tensors}
    quantized = quantized_tensors(ck, read_info(ck))
    q = tensors["blk.1.attn_q.weight"]
    got = decode(np.asarray(q.data), q.tensor_type.name, (64, 64))
    want = permute_qk(quantized["model.layers.1.self_attn.q_proj"].dequantize().numpy(), 4)
    assert np.array_equal(got, want)
    v = tensors["blk.0.attn_v.weight"]
    assert np.array_equal(decode(np.asarray(v.data), "Q8_0", (32, 64)),
                          quantized["model.layers.0.self_attn.v_proj"].dequantize().numpy())


def test_requantize_reports_extra_error(tmp_path: Path) -> None:
    ck = _checkpoint(tmp_path, "llama", "w4g64")  # no GGUF type holds a 64-wide group
    with pytest.raises(ExportError, match="--type"):
        export_gguf(ck, tmp_path / "a.gguf")
    result = export_gguf(ck, tmp_path / "b.gguf", "Q8_0")
    requant = [t for t in result.tensors if t.route == "requantized"]
    assert requant and all(20 < t.sqnr_db < 80 for t in requant)


def test_from_unquantized_model_with_mix_and_importance(tmp_path: Path) -> None:
    src = make_tiny_model(tmp_path / "tiny", "llama", hidden_size=256, intermediate_size=256, num_hidden_layers=8)
    result = export_gguf(src, tmp_path / "m.gguf", "Q4_K_M", calibration_tokens=64)
    types = {t.name: t.qtype for t in result.tensors}
    assert types["blk.0.attn_v.weight"] == "Q6_K" and types["blk.2.attn_v.weight"] == "Q4_K"
    assert types["blk.7.ffn_down.weight"] == "Q6_K" and types["blk.0.attn_q.weight"] == "Q4_K"
    assert types["output.weight"] == "Q6_K" and types["blk.0.attn_norm.weight"] == "F32"
    out = load_model(tmp_path / "m.gguf")  # readable through bitsmith's own source
    assert out.model.config.num_hidden_layers == 8


def test_mix_rules_and_fallbacks() -> None:
    # llama.cpp's use_more_bits over 30 layers (SmolLM2): first/last eighth and every third between
    q6 = [i for i in range(30) if pick_type("Q4_K_M", f"blk.{i}.attn_v.weight", 256, 30, True) == "Q6_K"]
    assert q6 == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert pick_type("Q4_K_M", "blk.3.attn_q.weight", 576, 30, True) == "Q5_0"  # 576 % 256: fallback
    assert pick_type("Q4_K_M", "blk.0.ffn_down.weight", 1536, 30, True) == "Q6_K"
    assert pick_type("Q4_K_M", "token_embd.weight", 576, 30, True) == "Q8_0"  # tied head, row not /256
    assert pick_type("Q4_K_M", "token_embd.weight", 512, 30, False) == "Q4_K"
    assert pick_type("Q4_0", "output.weight", 512, 30, False) == "Q6_K"
    with pytest.raises(ExportError, match="unknown GGUF type"):
        pick_type("Q9_X", "blk.0.attn_q.weight", 256, 2, True)


def test_not_a_checkpoint_needs_type_and_existing_out_refused(tmp_path: Path) -> None:
    src = make_tiny_model(tmp_path / "tiny")
    with pytest.raises(ExportError, match="--type"):
        export_gguf(src, tmp_path / "m.gguf")
    (tmp_path / "taken.gguf").write_bytes(b"x")
    with pytest.raises(ExportError, match="already exists"):
        export_gguf(src, tmp_path / "taken.gguf", "Q8_0")
    assert not list(tmp_path.glob(".*partial"))
