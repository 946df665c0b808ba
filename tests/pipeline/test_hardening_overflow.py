"""Hardening: a finite fp32 weight beyond the fp16 range never yields a checkpoint with inf/NaN.

A weight of 1e30 used to make the stored fp16 scale inf: quantize exited 0 and eval printed
ppl=nan. Now such a layer is kept unquantized at fp32 (with a warning and a report entry), in both
the calibration-free and the calibrated loop; the writer refuses inf/NaN as a last line of defence
and the loader refuses a checkpoint that holds them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bitsmith.calib import calibration_batches
from bitsmith.io.checkpoint import CheckpointError, CheckpointWriter
from bitsmith.pipeline.layerwise import quantize_blocks
from bitsmith.pipeline.plan import QuantizePlan
from bitsmith.pipeline.quantize import quantize
from bitsmith.spec import QuantSpec
from tests.tiny import make_tiny_model, sample_text, tiny_tokenizer

LAYER = "model.layers.1.mlp.down_proj"  # the last block: its huge output does not poison the next block's inputs


def _model_with(folder: Path, value: float, base: Path) -> Path:
    """A copy of the tiny model with one weight of LAYER set to ``value``."""
    folder.mkdir()
    for f in base.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    state = load_file(folder / "model.safetensors")
    state[f"{LAYER}.weight"][3, 5] = value
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return calibration_batches(tiny_tokenizer(), sample_text(600), samples=4, seq_len=32)


def _all_finite(folder: Path) -> None:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            assert not t.is_floating_point() or torch.isfinite(t).all(), f"{key} holds inf/NaN"


def _logits_finite(folder: Path) -> None:
    from bitsmith.runtime.load import load_model

    loaded = load_model(folder)
    ids = tiny_tokenizer()("the cat sat on the mat", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits
    assert torch.isfinite(logits).all()


def _run(method: str, model: Path, out: Path, calib: torch.Tensor, spec: str = "w4g32") -> Path:
    plan = QuantizePlan(QuantSpec.parse(spec), method, batch_size=4)
    if method == "gptq":
        return quantize_blocks(model, out, plan, calib)
    return quantize(model, out, plan)


@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq"])
def test_weight_of_1e30_keeps_its_layer_at_fp32(base, calib, tmp_path, caplog, method) -> None:
    model = _model_with(tmp_path / "m", 1e30, base)
    with caplog.at_level(logging.WARNING):
        out = _run(method, model, tmp_path / "q", calib)
    assert any(LAYER in r.getMessage() and "1e+30" in r.getMessage() for r in caplog.records)
    _all_finite(out)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        kept = f.get_tensor(f"{LAYER}.weight")
    assert kept.dtype == torch.float32 and kept[3, 5] == 1e30  # stored wide, not clipped
    report = json.loads((out / "bitsmith.json").read_text())
    assert LAYER not in report["tensors"]
    assert [l["name"] for l in report["report"]["unquantized_layers"]] == [LAYER]
    assert LAYER not in [l["name"] for l in report["report"]["layers"]]
    _logits_finite(out)


@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq"])
@pytest.mark.parametrize("spec", ["w4g32", "w4g32nf", "w2g32s"])
def test_weight_just_over_fp16(base, calib, tmp_path, caplog, method, spec) -> None:
    """7e4, just over fp16's 65504. A 4-bit uniform scale (7e4 / 15) fits fp16; an nf grid's scale is
    the extreme weight itself (levels in [-1, 1]) and w2g32s's is 7e4 / 1.5: rtn's and gptq's range
    searches then pick a shrunk scale that fits, while hqq's scale overflows and its layer is kept."""
    model = _model_with(tmp_path / "m", 7e4, base)
    with caplog.at_level(logging.WARNING):
        out = _run(method, model, tmp_path / "q", calib, spec)
    _all_finite(out)
    kept = LAYER not in json.loads((out / "bitsmith.json").read_text())["tensors"]
    assert kept == (method == "hqq" and spec != "w4g32")
    assert kept == any(LAYER in r.getMessage() and "7e+04" in r.getMessage() for r in caplog.records)
    _logits_finite(out)


def test_writer_refuses_inf(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="x.scale holds inf/NaN"):
        with CheckpointWriter(tmp_path / "ckpt", "rtn", {}) as writer:
            writer.add_tensor("x.scale", torch.tensor([1.0, float("inf")], dtype=torch.float16))
    assert not (tmp_path / "ckpt").exists()


def test_loader_refuses_a_checkpoint_with_an_inf_scale(base, tmp_path) -> None:
    from bitsmith.runtime.load import load_model

    out = quantize(base, tmp_path / "q", QuantizePlan(QuantSpec.parse("w4g32"), "rtn"))
    path = out / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(path)
    state[f"{LAYER}.scale"][0, 0] = float("inf")  # hand-made: no bitsmith writer would store it
    save_file(state, path, metadata=metadata)
    with pytest.raises(CheckpointError, match=rf"{LAYER}\.scale .*holds inf/NaN scales; re-quantize it"):
        load_model(out)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_head_and_embedding_follow_the_rule(base, calib, tmp_path, caplog, method) -> None:
    """The same rule for the head and a quantized embedding (each loop quantizes them on their own)."""
    folder = tmp_path / "m"
    folder.mkdir()
    for f in base.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    state = load_file(folder / "model.safetensors")
    state["lm_head.weight"][7, 5] = 1e30
    state["model.embed_tokens.weight"][100, 5] = 1e30  # a token the test sentence does not use
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    plan = QuantizePlan(QuantSpec.parse("w4g32"), method, quantize_head=True, quantize_embeddings=True, batch_size=4)
    with caplog.at_level(logging.WARNING):
        out = (quantize_blocks(folder, tmp_path / "q", plan, calib) if method == "gptq"
               else quantize(folder, tmp_path / "q", plan))
    _all_finite(out)
    report = json.loads((out / "bitsmith.json").read_text())
    kept = {l["name"] for l in report["report"]["unquantized_layers"]}
    assert kept == {"lm_head", "model.embed_tokens"} and not kept & set(report["tensors"])
    assert sum("1e+30" in r.getMessage() for r in caplog.records) == 2
    _logits_finite(out)


def test_cli_quantize_then_eval_as_the_user_tried(base, tmp_path, capsys) -> None:
    """The issue's steps: quantize a model with a 1e30 weight (exit 0, a warning naming the layer),
    then eval: a finite perplexity, not ppl=nan."""
    from bitsmith.cli import main

    model = _model_with(tmp_path / "m", 1e30, base)
    text = tmp_path / "text.txt"
    text.write_text(sample_text(400, seed=5))
    assert main(["quantize", str(model), "--method", "rtn", "--spec", "w4g32", "--out", str(tmp_path / "q")]) == 0
    assert LAYER in capsys.readouterr().err
    report = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "q"), "--text", str(text), "--ctx", "64", "--json", str(report)]) == 0
    assert "nan" not in capsys.readouterr().out.lower()
    assert "NaN" not in report.read_text()
