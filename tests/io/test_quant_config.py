"""The quantization_config of a checkpoint's config.json: compact, and read back to exactly the
layers and specs written, whatever mix of blocks and overrides a checkpoint holds."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from bitsmith.io.quant_config import (QUANT_METHOD, TRIPWIRE, TRIPWIRE_KEY, QuantConfigError, build, expand,
                                      num_blocks, strip, write_into)
from bitsmith.spec import QuantSpec

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]


def model_names(blocks: int) -> list[str]:
    return ["model.embed_tokens", "lm_head"] + [f"model.layers.{i}.{l}" for i in range(blocks) for l in LINEARS]


def test_uniform_checkpoint_is_a_handful_of_patterns() -> None:
    specs = {n: "w4g128" for n in model_names(28) if ".layers." in n}
    config = build(specs, "gptq", 28)
    assert config["quant_method"] == QUANT_METHOD and config["spec"] == "w4g128" and config["overrides"] == {}
    assert config["modules"] == sorted(f"model.layers.*.{l}" for l in LINEARS)
    assert expand(config, model_names(28)) == {n: QuantSpec.parse("w4g128") for n in specs}


@pytest.mark.parametrize("seed", range(20))
def test_random_mixes_read_back_exactly(seed: int) -> None:
    """Oracle: the dict written. Random block counts, layers kept unquantized, per-layer specs."""
    rng = random.Random(seed)
    blocks = rng.randint(1, 6)
    names = model_names(blocks)
    chosen = [n for n in names if rng.random() < 0.8]
    specs = {n: rng.choice(["w4g128", "w4g128", "w8", "w3g64s", "w4g32nf"]) for n in chosen}
    config = build(specs, "rtn", rng.choice([blocks, None]))
    json.loads(json.dumps(config))  # JSON-clean
    assert expand(config, names) == {n: QuantSpec.parse(s) for n, s in specs.items()}


def test_a_layer_missing_from_one_block_is_listed_by_name() -> None:
    specs = {n: "w8" for n in model_names(3) if ".layers." in n and n != "model.layers.2.mlp.down_proj"}
    config = build(specs, "rtn", 3)
    assert "model.layers.*.mlp.down_proj" not in config["modules"]
    assert {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"} <= set(config["modules"])
    assert set(expand(config, model_names(3))) == set(specs)


def test_a_config_naming_a_missing_module_is_refused() -> None:
    config = build({"model.layers.0.mlp.up_proj": "w8", "model.visual.proj": "w8"}, "rtn", None)
    with pytest.raises(QuantConfigError, match="model.visual.proj"):
        expand(config, model_names(2))


@pytest.mark.parametrize("damage", [{"modules": "all"}, {"spec": None}, {"overrides": []}, {"spec": "w9"}])
def test_damaged_configs_are_refused(damage: dict) -> None:
    config = {**build({"model.layers.0.mlp.up_proj": "w8"}, "rtn", 1), **damage}
    with pytest.raises(QuantConfigError):
        expand(config, model_names(1))


def test_num_blocks_reads_text_config() -> None:
    assert num_blocks({"num_hidden_layers": 4}) == 4
    assert num_blocks({"text_config": {"num_hidden_layers": 34}}) == 34
    assert num_blocks({}) is None


def test_write_into_adds_the_field_and_tripwire_and_strip_removes_them(tmp_path: Path) -> None:
    assert write_into(tmp_path, {"a": "w8"}, "rtn") is False  # no config.json: nothing written
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    assert write_into(tmp_path, {"model.layers.0.mlp.up_proj": "w8"}, "rtn")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["modules"] == ["model.layers.*.mlp.up_proj"]
    assert config[TRIPWIRE_KEY] == TRIPWIRE and not TRIPWIRE.endswith(".safetensors")
    assert strip(config) == {"model_type": "llama", "num_hidden_layers": 1}
    other = {"quantization_config": {"quant_method": "gptq"}, TRIPWIRE_KEY: "model.safetensors"}
    assert strip(other) == other  # another tool's fields stay
