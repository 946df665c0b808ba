"""The front door: bitsmith.quantize / load / evaluate give what the layers below give."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny import make_tiny_model, sample_text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("api") / "tiny")


def test_front_door_quantize_load_evaluate(tiny: Path, tmp_path: Path) -> None:
    import bitsmith
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize
    from bitsmith.runtime.load import load_model

    text = tmp_path / "text.txt"
    text.write_text(sample_text() * 4)
    path = bitsmith.quantize(tiny, tmp_path / "q", "w4g32")  # hqq: the calibration-free default
    # the front door's default plan: hqq, the (untied) head at w6g64 and the embedding at w4g64 (the
    # defaults w6g128 and w4g128 under a 4-bit body, narrowed to the tiny model's 64-wide rows)
    parse = bitsmith.QuantSpec.parse
    plan = QuantizePlan(parse("w4g32"), "hqq", quantize_embeddings=True, quantize_head=True,
                        layer_specs={"model.embed_tokens": parse("w4g64"), "lm_head": parse("w6g64")})
    same = quantize(tiny, tmp_path / "q2", plan)
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        a = bitsmith.load(path).model(input_ids=ids).logits
        b = load_model(same).model(input_ids=ids).logits
    assert torch.equal(a, b)
    assert bitsmith.load(path).info.method == "hqq"
    scores = bitsmith.evaluate(path, reference=tiny, text=text, ctx=32, max_windows=2)
    assert set(scores) == {"model", "reference"}
    assert scores["reference"].kld_mean is None and scores["model"].kld_mean > 0  # the reference is not scored against itself
    assert 0 < scores["model"].top1 <= 1
    assert scores["model"].ppl > 1


def test_front_door_output_spec(tiny: Path, tmp_path: Path) -> None:
    import bitsmith
    from bitsmith.io.checkpoint import read_info

    default = read_info(bitsmith.quantize(tiny, tmp_path / "d", "w4g32"))
    kept = read_info(bitsmith.quantize(tiny, tmp_path / "k", "w4g32", output_spec=None))
    table = read_info(bitsmith.quantize(tiny, tmp_path / "t", "w4g32", embedding_spec="w2g32"))
    # as the CLI: auto
    assert (str(default.specs["model.embed_tokens"]), str(default.specs["lm_head"])) == ("w4g64", "w6g64")
    assert (str(table.specs["model.embed_tokens"]), str(table.specs["lm_head"])) == ("w2g32", "w6g64")
    assert "model.embed_tokens" not in kept.specs and "lm_head" not in kept.specs
    assert str(kept.specs["model.layers.0.mlp.down_proj"]) == str(default.specs["model.layers.0.mlp.down_proj"]) == "w4g32"


def test_front_door_calibrated_default_is_gptq(tiny: Path, tmp_path: Path) -> None:
    import bitsmith
    from bitsmith.calib.data import CalibrationConfig

    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text() * 8)
    config = CalibrationConfig(text=calib, samples=4, seq_len=32)
    path = bitsmith.quantize(tiny, tmp_path / "g", "w4g32", calibration=config, compute_dtype="fp32")
    assert bitsmith.load(path).info.method == "gptq"


def test_front_door_names_stay_torch_free() -> None:
    code = ("import sys, bitsmith; bitsmith.QuantSpec.parse('w4g128'); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_unknown_attribute_is_an_attribute_error() -> None:
    import bitsmith

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bitsmith.nope  # noqa: B018
