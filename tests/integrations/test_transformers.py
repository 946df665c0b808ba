"""transformers' from_pretrained on bitsmith checkpoints: the logits are bitsmith's own load_model's,
for every kind of layer a checkpoint holds; generate and save_pretrained work; bad requests are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.tiny import make_tiny_model, sample_text

import bitsmith  # noqa: F401 - registers the quantizer, as a user's `import bitsmith` does
from bitsmith.calib.data import CalibrationConfig
from bitsmith.pipeline.plan import QuantizePlan
from bitsmith.pipeline.quantize import quantize
from bitsmith.runtime.load import load_model
from bitsmith.spec import QuantSpec

ROOT = Path(__file__).resolve().parents[2]
WIDE = dict(hidden_size=128, intermediate_size=256)  # rows wide enough for g128


def _checkpoint(tmp: Path, name: str, spec: str, method: str = "rtn", arch: str = "llama", **kw) -> Path:
    plan_kw = {k: kw.pop(k) for k in ("quantize_head", "quantize_embeddings") if k in kw}
    src = make_tiny_model(tmp / f"{name}-src", arch, seed=len(name), **kw)
    calib = None
    if method == "gptq":
        text = tmp / "calib.txt"
        text.write_text(sample_text() * 8)
        calib = CalibrationConfig(text=text, samples=4, seq_len=32)
    plan = QuantizePlan(QuantSpec.parse(spec), method, calib=calib, **plan_kw)
    return quantize(src, tmp / name, plan)


CASES = {
    "w8-untied": dict(spec="w8"),
    "w4g128-gptq": dict(spec="w4g128", method="gptq", **WIDE),
    "w3g64-tied": dict(spec="w3g64", tie_word_embeddings=True, **WIDE),
    "w4g32-tied-quantized-embedding": dict(spec="w4g32", tie_word_embeddings=True, quantize_embeddings=True),
    "w4g32-quantized-head-and-embedding": dict(spec="w4g32", quantize_head=True, quantize_embeddings=True),
    "w4g32nf-qwen2-bias": dict(spec="w4g32nf", arch="qwen2"),
    "w4g32s-gemma3-quantized-embedding": dict(spec="w4g32s", arch="gemma3_text", quantize_embeddings=True,
                                              tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hf")
    return {name: _checkpoint(tmp, name, **dict(case)) for name, case in CASES.items()}


def _hf(path: Path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=kw.pop("dtype", torch.float32), **kw)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 100, (2, 19), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", sorted(CASES))
def test_from_pretrained_logits_equal_bitsmith_load(checkpoints, case: str) -> None:
    from bitsmith.nn.qlinear import QuantLinear

    path = checkpoints[case]
    model, ref = _hf(path), load_model(path).model
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == sum(isinstance(m, QuantLinear) for m in ref.modules())
    assert [type(m).__name__ for m in model.modules()] == [type(m).__name__ for m in ref.modules()]
    for seed in range(2):
        with torch.no_grad():
            got, want = model(_ids(seed)).logits, ref(_ids(seed)).logits
        assert torch.equal(got, want), f"{case}: max |diff| {(got - want).abs().max().item()}"
    assert model.config.quantization_config.quant_method == "bitsmith"


def test_quantized_embedding_shares_codes_with_a_tied_head(checkpoints) -> None:
    from bitsmith.nn.qembedding import QuantEmbedding
    from bitsmith.nn.qlinear import QuantLinear

    model = _hf(checkpoints["w4g32-tied-quantized-embedding"])
    assert isinstance(model.get_input_embeddings(), QuantEmbedding)
    head = model.get_output_embeddings()
    assert isinstance(head, QuantLinear)
    assert torch.equal(head.quantized().dequantize(), model.get_input_embeddings().qt.dequantize())


def test_generate_matches_bitsmith_loaded_model(checkpoints) -> None:
    path = checkpoints["w3g64-tied"]
    model, ref = _hf(path), load_model(path).model
    prompt = _ids(3)[:1, :6]
    got = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=2)
    want = ref.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=2)
    assert got.shape == (1, 14) and torch.equal(got, want)


@pytest.mark.parametrize("case", ["w4g128-gptq", "w4g32-tied-quantized-embedding", "w4g32nf-qwen2-bias"])
def test_save_pretrained_round_trips(checkpoints, case: str, tmp_path: Path) -> None:
    model = _hf(checkpoints[case])
    model.save_pretrained(tmp_path / "saved")
    again = _hf(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "bitsmith" and saved["modules"]
    with torch.no_grad():
        assert torch.equal(again(_ids()).logits, model(_ids()).logits)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(checkpoints[case]).save_pretrained(tmp_path / "saved")
    with torch.no_grad():  # the saved folder is a bitsmith checkpoint for bitsmith too
        assert torch.equal(load_model(tmp_path / "saved").model(_ids()).logits, model(_ids()).logits)


@pytest.mark.parametrize("config_dtype", [None, "bfloat16"])
def test_default_dtype_is_float32_like_bitsmith_load(checkpoints, tmp_path: Path, config_dtype) -> None:
    """transformers' dtype="auto" takes config.json's dtype, or without one the first stored float
    tensor's (here the fp16 embedding); bitsmith checkpoints run in float32 like bitsmith.load."""
    import shutil

    from transformers import AutoModelForCausalLM

    path = shutil.copytree(checkpoints["w3g64-tied"], tmp_path / "ck")
    config = json.loads((path / "config.json").read_text())
    config.pop("dtype", None)
    if config_dtype:
        config["dtype"] = config_dtype
    (path / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, load_model(path).model(_ids()).logits)


def test_bfloat16_is_honoured_like_bitsmith_load(checkpoints) -> None:
    path = checkpoints["w8-untied"]
    model, ref = _hf(path, dtype=torch.bfloat16), load_model(path, dtype=torch.bfloat16).model
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, ref(_ids()).logits)


@pytest.mark.parametrize("device_map", ["cuda", "auto", {"": "cuda:0"}, {"model": "cpu", "lm_head": "disk"},
                                        torch.device("cuda", 0), {"model": 0}])
def test_device_maps_off_the_cpu_are_refused(device_map) -> None:
    from bitsmith.integrations.transformers import check_device_map

    with pytest.raises(ValueError, match="CPU only.*model.to"):
        check_device_map(device_map)


@pytest.mark.parametrize("device_map", [None, "cpu", {"": "cpu"}, {"model": "cpu", "lm_head": torch.device("cpu")}])
def test_cpu_device_maps_are_accepted(device_map) -> None:
    from bitsmith.integrations.transformers import check_device_map

    check_device_map(device_map)


def test_cpu_device_map_loads(checkpoints) -> None:
    pytest.importorskip("accelerate", reason="transformers needs accelerate for any device_map")
    model = _hf(checkpoints["w8-untied"], device_map="cpu")
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, load_model(checkpoints["w8-untied"]).model(_ids()).logits)


def test_float64_is_refused(checkpoints) -> None:
    with pytest.raises(ValueError, match="float32"):
        _hf(checkpoints["w8-untied"], dtype=torch.float64)


def test_quantizing_a_float_model_through_transformers_is_refused(tmp_path: Path) -> None:
    from bitsmith.integrations.transformers import BitsmithConfig

    src = make_tiny_model(tmp_path / "src")
    with pytest.raises(ValueError, match="bitsmith quantize"):
        _hf(src, quantization_config=BitsmithConfig(spec="w4g32", modules=["model.layers.*.mlp.up_proj"]))


def test_config_that_disagrees_with_the_shards_is_refused(checkpoints, tmp_path: Path) -> None:
    import shutil

    from bitsmith.io.quant_config import QuantConfigError

    folder = shutil.copytree(checkpoints["w8-untied"], tmp_path / "mixed")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["spec"] = "w4g32"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantConfigError, match="disagree"):
        _hf(folder)


def test_checkpoint_without_the_field_still_loads_through_bitsmith(checkpoints, tmp_path: Path) -> None:
    import shutil

    folder = shutil.copytree(checkpoints["w8-untied"], tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        want = load_model(checkpoints["w8-untied"]).model(_ids()).logits
        assert torch.equal(load_model(folder).model(_ids()).logits, want)
    from bitsmith.integrations.transformers import upgrade

    upgrade(folder)  # the field, from the shard headers: transformers loads it again
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["spec"] == "w8"
    with torch.no_grad():
        assert torch.equal(_hf(folder)(_ids()).logits, want)


def test_upgrade_refuses_a_folder_that_is_no_checkpoint(tmp_path: Path) -> None:
    from bitsmith.integrations.transformers import upgrade
    from bitsmith.io.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="not a bitsmith checkpoint"):
        upgrade(make_tiny_model(tmp_path / "float"))


LOAD = ("import torch, transformers; from transformers import AutoModelForCausalLM; "
        "m = AutoModelForCausalLM.from_pretrained({path!r}); "
        "print(sorted({{type(x).__name__ for x in m.modules()}} & {{'QuantLinear', 'Linear'}}))")


@pytest.mark.parametrize("first", [
    "import bitsmith",  # bitsmith first: the import hook registers when transformers loads its quantizers
    "import transformers; import bitsmith",  # transformers imported, its quantizer table not yet
    "import transformers.quantizers.auto; import bitsmith",  # table already loaded: registered at once
])
def test_registration_works_in_either_import_order(checkpoints, first: str) -> None:
    code = f"{first}; " + LOAD.format(path=str(checkpoints["w8-untied"]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['Linear', 'QuantLinear']"  # lm_head stays a float Linear


def test_without_bitsmith_transformers_raises_naming_bitsmith_load(checkpoints) -> None:
    """The obvious mistake (no `import bitsmith`) is an error that says what to do, not random weights."""
    code = LOAD.format(path=str(checkpoints["w4g32-tied-quantized-embedding"]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0
    assert "ValueError" in out.stderr and "bitsmith.load(path)" in out.stderr and "import bitsmith" in out.stderr


@pytest.mark.parametrize("first", [
    "import bitsmith",
    "import transformers.quantizers.auto; import bitsmith",  # quantizer table loaded, modeling module not yet
    "import transformers.modeling_utils; import bitsmith",  # both loaded before bitsmith
])
def test_old_checkpoint_is_an_error_naming_the_fix_not_random_weights(checkpoints, tmp_path: Path, first: str) -> None:
    """A checkpoint written before config.json carried the quantization_config: transformers alone would
    initialise its quantized layers at random; after `import bitsmith` from_pretrained refuses it."""
    import shutil

    from bitsmith.io.quant_config import TRIPWIRE_KEY

    folder = shutil.copytree(checkpoints["w8-untied"], tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"], config[TRIPWIRE_KEY]
    (folder / "config.json").write_text(json.dumps(config))
    out = subprocess.run([sys.executable, "-c", f"{first}; " + LOAD.format(path=str(folder))],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0, out.stdout
    assert "ValueError" in out.stderr and "written before" in out.stderr
    assert "bitsmith.load(path)" in out.stderr and "upgrade(" in out.stderr
    fixed = f"{first}; from bitsmith.integrations.transformers import upgrade; upgrade({str(folder)!r}); "
    out = subprocess.run([sys.executable, "-c", fixed + LOAD.format(path=str(folder))],
                         capture_output=True, text=True, cwd=ROOT)  # the fix the message names works
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['Linear', 'QuantLinear']"


def test_the_guard_passes_other_folders_through(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from bitsmith.integrations.transformers import old_checkpoint_message

    plain = make_tiny_model(tmp_path / "float")
    assert old_checkpoint_message(plain, {}) is None and old_checkpoint_message("org/model", {}) is None
    assert type(AutoModelForCausalLM.from_pretrained(plain)).__name__ == "LlamaForCausalLM"


def test_exported_gptq_folder_drops_bitsmith_fields(checkpoints, tmp_path: Path) -> None:
    from bitsmith.io.export_gptq import export_gptq

    export_gptq(checkpoints["w8-untied"], tmp_path / "gptq")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq" and "transformers_weights" not in config


def test_a_checkpoint_missing_a_packed_tensor_is_refused(checkpoints, tmp_path: Path) -> None:
    """Not the uninitialised memory transformers would allocate for it."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from bitsmith.io.quant_config import QuantConfigError

    folder = shutil.copytree(checkpoints["w3g64-tied"], tmp_path / "cut")
    with safe_open(folder / "model.safetensors", "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del tensors["model.layers.1.mlp.up_proj.scale"]
    save_file(tensors, folder / "model.safetensors", metadata=meta)
    with pytest.raises(QuantConfigError, match=r"no model\.layers\.1\.mlp\.up_proj\.scale"):
        _hf(folder)
