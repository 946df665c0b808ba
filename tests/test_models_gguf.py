"""GGUF sources: tiny files written in the test, and the real installed models (slow).

The tiny llama GGUF is written the way llama.cpp's converter writes one (q/k rows permuted for
rotary, ggml names, reversed shapes, gpt2 tokenizer metadata); reading it back must give the
original weights up to the quantization, i.e. exactly ``gguf.quants.dequantize``.
"""
from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch

from bitsmith.models import ModelSourceError, build_model, find_blocks, open_source
from bitsmith.io.gguf.names import unpermute_qk
from bitsmith.models.gguf_source import GGUFStore, read_gguf_header

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 64, 128, 4, 2, 2
QTYPES = {  # GGUF block stem -> storage type, covering the plain and the legacy block quants
    "attn_q": "Q8_0", "attn_k": "F32", "attn_v": "Q4_0", "attn_output": "Q4_1",
    "ffn_gate": "Q5_0", "ffn_up": "F16", "ffn_down": "Q8_0",
}
HF_STEMS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.environ.get("BITSMITH_TEST_REAL_CACHE") is None:
        monkeypatch.setenv("BITSMITH_CACHE", str(tmp_path / "cache"))


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp converter's rotary permute (written from its documented formula)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: printable bytes map to themselves, others above 255."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def tokenizer_vocab() -> tuple[list[str], list[str]]:
    tokens = byte_tokens()
    merges = ["Ġ t", "h e", "Ġt he"]
    return tokens + ["Ġt", "he", "Ġthe", "<|end|>"], merges


def reference_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = len(tokenizer_vocab()[0])
    cfg = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, vocab_size=vocab, max_position_embeddings=256,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def write_llama_gguf(path: Path, model, *, tied: bool = False, arch: str = "llama") -> dict[str, np.ndarray]:
    """Write ``model`` as a llama GGUF; returns the HF-layout weights the file really holds."""
    import gguf

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    tokens, merges = tokenizer_vocab()
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    held: dict[str, np.ndarray] = {}

    def put(gguf_name: str, hf_name: str, qtype: str, n_head: int = 0) -> None:
        value = sd[hf_name]
        stored = permute(value, n_head) if n_head else value
        qt = gguf.GGMLQuantizationType[qtype]
        data = gguf.quants.quantize(stored, qt)
        w.add_tensor(gguf_name, data, raw_dtype=None if qtype in ("F32", "F16") else qt)
        back = gguf.quants.dequantize(data, qt).reshape(value.shape).astype(np.float32)
        held[hf_name] = unpermute_qk(back, n_head) if n_head else back

    put("token_embd.weight", "model.embed_tokens.weight", "Q8_0")
    for i in range(LAYERS):
        for stem, hf in HF_STEMS.items():
            n_head = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(stem, 0) if arch == "llama" else 0
            put(f"blk.{i}.{stem}.weight", f"model.layers.{i}.{hf}.weight", QTYPES.get(stem, "F32"), n_head)
    put("output_norm.weight", "model.norm.weight", "F32")
    if not tied:
        put("output.weight", "lm_head.weight", "Q8_0")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


@pytest.fixture
def tiny_gguf(tmp_path: Path):
    model = reference_model()
    path = tmp_path / "tiny-llama.gguf"
    return model, path, write_llama_gguf(path, model)


def test_tensors_equal_dequantize_and_unpermute(tiny_gguf) -> None:
    model, path, held = tiny_gguf
    src = open_source(path)
    assert src.kind == "gguf" and src.config.model_type == "llama"
    assert set(src.tensor_names()) == set(held)
    for name, value in held.items():
        assert torch.equal(src.load_tensor(name), torch.from_numpy(value)), name
    # attn_k is F32: un-permuting must give back the original rows exactly
    k = "model.layers.1.self_attn.k_proj.weight"
    assert torch.equal(src.load_tensor(k), model.state_dict()[k])
    assert src.tensor_shape(k) == (KV_HEADS * HIDDEN // HEADS, HIDDEN)
    assert src.source_dtype("model.layers.0.self_attn.v_proj.weight") == "Q4_0"
    assert src.source_dtype("model.layers.0.mlp.up_proj.weight") == "F16"


def test_header_scan_agrees_with_gguf_reader(tiny_gguf) -> None:
    import gguf

    _, path, _ = tiny_gguf
    header = read_gguf_header(path)
    reader = gguf.GGUFReader(str(path))
    assert [(t.name, t.qtype, t.shape, t.offset, t.n_bytes) for t in header.tensors] == [
        (t.name, int(t.tensor_type), tuple(reversed(t.shape.tolist())), t.data_offset, t.n_bytes)
        for t in reader.tensors
    ]
    assert header.metadata["llama.attention.head_count_kv"] == KV_HEADS


def test_build_model_matches_reference_logits(tiny_gguf) -> None:
    model, path, held = tiny_gguf
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(held[name]))
    built = build_model(open_source(path))
    ids = torch.tensor([[3, 70, 200, 5, 99, 17, 256, 258]])
    with torch.no_grad():
        torch.testing.assert_close(built(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    assert find_blocks(built)[0] == "model.layers"


def test_tied_gguf_and_tokenizer_round_trip(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    model = reference_model()
    path = tmp_path / "tied.gguf"
    held = write_llama_gguf(path, model, tied=True)
    src = open_source(path)
    assert "lm_head.weight" not in src.tensor_names()
    built = build_model(src)
    assert built.lm_head.weight is built.model.embed_tokens.weight
    assert torch.equal(built.lm_head.weight, torch.from_numpy(held["model.embed_tokens.weight"]))
    tok = src.tokenizer()
    assert tok.convert_ids_to_tokens(tok(" the he", add_special_tokens=False).input_ids) == ["Ġthe", "Ġ", "he"]
    out = tmp_path / "hf"
    src.save_config_and_tokenizer(out)
    again = open_source(path)  # second open reads the cached config/tokenizer folder
    assert again.config.to_dict() == src.config.to_dict()
    assert AutoConfig.from_pretrained(str(out)).tie_word_embeddings is True
    assert (out / "generation_config.json").is_file()
    assert AutoTokenizer.from_pretrained(str(out))(" the").input_ids == tok(" the").input_ids


def test_gemma_norm_offset_and_names(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "g.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    stored = np.linspace(1.5, 2.5, 8, dtype=np.float32)  # the converter wrote 1 + w
    norm = stored - np.float32(1.0)
    for stem in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm", "attn_q_norm"):
        w.add_tensor(f"blk.0.{stem}.weight", stored)
    q = np.arange(64, dtype=np.float32).reshape(8, 8)
    w.add_tensor("blk.0.attn_q.weight", q)
    w.add_tensor("rope_freqs.weight", norm)  # GGUF-only: ignored
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    store = GGUFStore(path, read_gguf_header(path))
    assert sorted(store.names()) == sorted([
        "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.pre_feedforward_layernorm.weight", "model.layers.0.post_feedforward_layernorm.weight",
        "model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.q_proj.weight",
    ])
    for name in store.names():
        expected = q if name.endswith("q_proj.weight") else norm  # no permute for gemma
        np.testing.assert_array_equal(store.load(name).numpy(), expected)


# ---------------------------------------------------------------------------------- bad inputs


def test_truncated_gguf(tiny_gguf) -> None:
    _, path, _ = tiny_gguf
    data = path.read_bytes()
    path.write_bytes(data[:-5000])
    with pytest.raises(ModelSourceError, match=r"tiny-llama.gguf is truncated \(header says .* MB of tensor data, file has .* MB\); download it again"):
        open_source(path)
    path.write_bytes(data[:300])
    with pytest.raises(ModelSourceError, match="header is cut short"):
        open_source(path)


def test_bad_magic(tiny_gguf) -> None:
    _, path, _ = tiny_gguf
    path.write_bytes(b"GGML" + path.read_bytes()[4:])
    with pytest.raises(ModelSourceError, match="is not a GGUF file"):
        open_source(path)


def test_unsupported_gguf_arch(tmp_path: Path) -> None:
    model = reference_model()
    path = tmp_path / "odd.gguf"
    write_llama_gguf(path, model, arch="mamba")
    with pytest.raises(ModelSourceError, match="architecture 'mamba', not supported yet"):
        open_source(path)


# ------------------------------------------------------------------------- real models (slow)

TEXT = Path(str(files("bitsmith").joinpath("data", "pride_and_prejudice_60k.txt")))  # shipped: a fresh clone has it


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.exp(model(ids, labels=ids).loss))


@pytest.mark.slow
@pytest.mark.parametrize(
    "alias,ceiling,expect",
    [("smollm2-135m", 40.0, "Paris"), ("gemma3-270m", 40.0, "France"), ("qwen2.5-coder-1.5b", 60.0, "Paris")],
)
def test_real_model_perplexity_and_generation(
    alias: str, ceiling: float, expect: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bitsmith.models.aliases import cache_dir

    monkeypatch.delenv("BITSMITH_CACHE", raising=False)  # share the real cache (assembled once)
    try:
        src = open_source(alias)
    except ModelSourceError as err:
        pytest.skip(str(err))
    assert src.path.is_file() and (src.path.parent == cache_dir() or alias == "smollm2-135m")
    model = build_model(src)
    tok = src.tokenizer()
    ids = tok(TEXT.read_text()[:2000], return_tensors="pt").input_ids[:, :512]
    ppl = perplexity(model, ids)
    print(f"{alias}: perplexity {ppl:.2f} on {ids.shape[1]} tokens")
    assert 3.0 < ppl < ceiling
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, prompt.shape[1]:])
    print(f"{alias}: greedy continuation {text!r}")
    assert expect in text  # a wrong norm offset or permutation gives gibberish


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_tensors_match_transformers_gguf_loader(alias: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' own GGUF loader is an independent oracle for names, q/k permute, norm offset."""
    from transformers import AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    monkeypatch.delenv("BITSMITH_CACHE", raising=False)
    try:
        src = open_source(alias)
    except ModelSourceError as err:
        pytest.skip(str(err))
    model = build_model(src)
    theirs = load_gguf_checkpoint(str(src.path), return_tensors=True, model_to_load=model)["tensors"]
    assert set(theirs) == set(src.tensor_names())
    worst = max((src.load_tensor(n) - theirs[n].float()).abs().max().item() for n in theirs)
    print(f"{alias}: max |tensor diff| vs transformers GGUF loader {worst:.2e} over {len(theirs)} tensors")
    assert worst < 1e-6
    direct = AutoTokenizer.from_pretrained(str(src.path.parent), gguf_file=src.path.name, local_files_only=True)
    text = TEXT.read_text()[:2000]
    assert src.tokenizer()(text).input_ids == direct(text).input_ids  # the cached copy is faithful


def test_dequantization_in_row_slices_is_exact(tiny_gguf, monkeypatch) -> None:
    """Tensors dequantize in slices of rows (bounded temporaries); slices as small as one row give
    the same values as one slice."""
    import bitsmith.models.gguf_source as gs

    _, path, held = tiny_gguf
    monkeypatch.setattr(gs, "DEQUANT_CHUNK", 1)
    src = open_source(path)
    for name, value in held.items():
        assert torch.equal(src.load_tensor(name), torch.from_numpy(value)), name
