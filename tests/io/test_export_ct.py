"""compressed-tensors folders: export -> import round trips bit-exact, the folder loads in
transformers (compressed-tensors support) with bitsmith's logits, the config is what the
compressed-tensors package parses, and what does not map is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bitsmith.cli import main
from bitsmith.formats.ct_layout import CTError
from bitsmith.io.checkpoint import read_info
from bitsmith.io.export_ct import export_ct
from bitsmith.io.import_ct import load_ct_folder
from bitsmith.io.packed import quantized_tensors
from bitsmith.pipeline.plan import QuantizePlan
from bitsmith.pipeline.quantize import quantize
from bitsmith.runtime.load import load_model
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.spec import QuantSpec

from tests.tiny import make_tiny_model

pytest.importorskip("compressed_tensors")
EXACT = RuntimeOptions(int8_decode=False, prefill="exact")  # the float32 dequantize-then-matmul path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("ct") / "tiny", "qwen2")  # q/k/v biases; 96-wide MLP rows


def _checkpoint(tiny: Path, tmp_path: Path, spec: str) -> Path:
    return quantize(tiny, tmp_path / f"ck-{spec}", QuantizePlan(QuantSpec.parse(spec)))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("spec", ["w4g64", "w8s", "w3g32s"])
def test_export_import_round_trip_is_bit_exact(tiny: Path, tmp_path: Path, spec: str) -> None:
    ck = _checkpoint(tiny, tmp_path, spec)
    export_ct(ck, tmp_path / "ct")
    config, quantized, others = load_ct_folder(tmp_path / "ct")
    original = quantized_tensors(ck, read_info(ck))
    assert set(quantized) == set(original)
    for name, qt in original.items():
        assert quantized[name].spec == qt.spec, name  # w4g64 on 96-wide rows comes back as g64, not g32
        assert torch.equal(quantized[name].dequantize(), qt.dequantize()), name
    assert "model.layers.0.self_attn.q_proj.bias" in others and "model.embed_tokens.weight" in others
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    a, b = load_model(ck, options=EXACT), load_model(tmp_path / "ct", options=EXACT)
    assert b.info.method == "import-compressed-tensors"
    assert torch.equal(_logits(a.model, ids), _logits(b.model, ids))


def test_config_parses_with_compressed_tensors(tiny: Path, tmp_path: Path) -> None:
    from compressed_tensors.quantization import QuantizationConfig

    ck = _checkpoint(tiny, tmp_path, "w4g64")
    report = export_ct(ck, tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.format == "pack-quantized" and parsed.ignore == ["lm_head"]
    (group,) = parsed.config_groups.values()  # one spec, one group: every row written in groups of gcd(64, 64, 96)
    assert group.weights.group_size == 32 and not group.weights.symmetric and group.weights.num_bits == 4
    assert len(group.targets) == 14 and {e["group_size"] for e in report.values()} == {32}


@pytest.mark.parametrize("spec", ["w4g64", "w8s"])
def test_transformers_loads_the_folder_with_bitsmith_logits(tiny: Path, tmp_path: Path, spec: str) -> None:
    """transformers' compressed-tensors support decompresses to bitsmith's weights bit for bit
    (float32 scales), so the logits agree to float rounding. Asymmetric folders need
    dequantize=True in transformers 5.x (its compressed path mis-sizes packed zero points:
    llm-compressor issue 1618); symmetric ones load either way."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ck = _checkpoint(tiny, tmp_path, spec)
    export_ct(ck, tmp_path / "ct")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(dequantize=True))
    weights = dict(hf.named_parameters())
    for name, qt in quantized_tensors(ck, read_info(ck)).items():
        assert torch.equal(weights[f"{name}.weight"], qt.dequantize()), name
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    ours, theirs = _logits(load_model(ck, options=EXACT).model, ids), _logits(hf, ids)
    assert (ours - theirs).abs().max() < 1e-4
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_refusals_write_nothing(tiny: Path, tmp_path: Path) -> None:
    nf = _checkpoint(tiny, tmp_path, "w4g32nf")
    with pytest.raises(CTError, match="non-uniform"):
        export_ct(nf, tmp_path / "out")
    with pytest.raises(CTError, match="not a bitsmith checkpoint"):
        export_ct(tiny, tmp_path / "out")
    ck = _checkpoint(tiny, tmp_path, "w4g64")
    with pytest.raises(CTError, match="scale dtype"):
        export_ct(ck, tmp_path / "out", "bfloat16")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(CTError, match="already exists"):
        export_ct(ck, nf)


def test_quantized_embedding_is_written_dequantized(tmp_path: Path) -> None:
    """bitsmith's default (a w8 embedding, the head tied to it) exports as a float embedding with the
    same values held exactly in float32, and one config group for the linear layers; the re-imported
    model's logits equal the checkpoint's."""
    from bitsmith.pipeline.outputs import with_output_spec

    tied = make_tiny_model(tmp_path / "tied", "qwen2", tie_word_embeddings=True)
    plan = with_output_spec(QuantizePlan(QuantSpec.parse("w4g64")), tied, QuantSpec.parse("w8"))
    ck = quantize(tied, tmp_path / "ck", plan)
    assert "model.embed_tokens" in read_info(ck).specs
    report = export_ct(ck, tmp_path / "ct")
    assert report["model.embed_tokens"]["written"].startswith("dequantized float32, exact")
    config, quantized, others = load_ct_folder(tmp_path / "ct")
    embedding = quantized_tensors(ck, read_info(ck))["model.embed_tokens"].dequantize()
    assert "model.embed_tokens" not in quantized
    assert torch.equal(others["model.embed_tokens.weight"], embedding.to(torch.float32))
    assert len(config["quantization_config"]["config_groups"]) == 1
    assert "transformers_weights" not in config  # bitsmith's tripwire stays behind
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    a, b = load_model(ck, options=EXACT), load_model(tmp_path / "ct", options=EXACT)
    assert (_logits(a.model, ids) - _logits(b.model, ids)).abs().max() < 1e-5


def test_cli_export_and_overwrite(tiny: Path, tmp_path: Path, capsys) -> None:
    ck = _checkpoint(tiny, tmp_path, "w4g64")
    out = tmp_path / "ct"
    assert main(["export", str(ck), "--to", "compressed-tensors", "--out", str(out)]) == 0
    assert "compressed-tensors layers" in capsys.readouterr().out
    assert main(["export", str(ck), "--to", "compressed-tensors", "--out", str(out), "--overwrite",
                 "--scale-dtype", "float16"]) == 0
    _, quantized, _ = load_ct_folder(out)
    assert all(qt.scale.dtype == torch.float16 for qt in quantized.values())
    with pytest.raises(SystemExit):  # a folder bitsmith did not write is never replaced
        main(["export", str(ck), "--to", "compressed-tensors", "--out", str(tiny), "--overwrite"])
    assert (tiny / "config.json").is_file()


def test_ct_folder_re_exports_to_gguf_exactly(tmp_path: Path) -> None:
    """A compressed-tensors folder is a MODEL for export --to gguf as a GPTQ folder is: the same blocks."""
    import numpy as np
    from gguf import GGUFReader

    from bitsmith.io.gguf.export import export_gguf

    src = make_tiny_model(tmp_path / "tiny", "llama")
    ck = quantize(src, tmp_path / "ck", QuantizePlan(QuantSpec.parse("w4g32s")))
    export_ct(ck, tmp_path / "ct")
    export_gguf(ck, tmp_path / "ck.gguf")
    from_ct = export_gguf(tmp_path / "ct", tmp_path / "ct.gguf")
    assert {t.route for t in from_ct.tensors if t.qtype == "Q4_0"} == {"exact"}
    a = {t.name: t for t in GGUFReader(str(tmp_path / "ck.gguf")).tensors}
    b = {t.name: t for t in GGUFReader(str(tmp_path / "ct.gguf")).tensors}
    assert set(a) == set(b)
    for name, t in a.items():
        assert t.tensor_type == b[name].tensor_type and np.array_equal(np.asarray(t.data), np.asarray(b[name].data)), name
