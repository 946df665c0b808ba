"""Resuming the calibration-free (streaming) path: a run killed after some output shards were
committed continues from them, and writes the same checkpoint, file for file, as a run never
interrupted (rtn and hqq; an untied quantized head, whose source tensor yields two outputs)."""

from pathlib import Path

import pytest
from tests.tiny import make_tiny_model

from bitsmith.io.checkpoint import read_info
from bitsmith.pipeline import quantize as quantize_module
from bitsmith.pipeline.plan import QuantizePlan
from bitsmith.pipeline.quantize import quantize
from bitsmith.spec import QuantSpec

SHARD = 40_000  # bytes: the tiny model's checkpoint in several shards


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream-resume")
    return {"untied": make_tiny_model(root / "untied", num_hidden_layers=3),
            "tied": make_tiny_model(root / "tied", num_hidden_layers=2, tie_word_embeddings=True)}


def files(folder: Path) -> dict[str, bytes]:
    """Every file of a checkpoint but its report (whose timings differ between any two runs)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "bitsmith.json"}


def crash_after(n: int):
    def progress(name: str, done: int, total: int) -> None:
        if done == n:
            raise KeyboardInterrupt(f"simulated kill after tensor {n}")
    return progress


@pytest.mark.parametrize("method,model,head,shard,kill", [
    ("rtn", "untied", False, SHARD, 12), ("hqq", "untied", False, SHARD, 12),
    ("rtn", "tied", True, 8_000, 1),  # killed with the embedding committed, its quantized head copy not
    ("rtn", "tied", True, 8_000, 12)])
def test_resume_equals_uninterrupted(models, tmp_path, monkeypatch, method, model, head, shard, kill) -> None:
    import json

    monkeypatch.setattr(quantize_module, "STREAM_SHARD_BYTES", shard)
    plan = QuantizePlan(QuantSpec.parse("w4g32"), method, quantize_head=head)
    whole = quantize(models[model], tmp_path / "whole", plan)
    assert len([p for p in whole.iterdir() if p.suffix == ".safetensors"]) >= 3
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        quantize(models[model], out, plan, progress=crash_after(kill))
    assert not out.exists()  # never a complete-looking folder before the end
    ledger = tmp_path / "resumed.partial" / "shards.json"
    shards = json.loads(ledger.read_text())["shards"]
    assert shards  # something committed to resume from
    committed = {line["name"] for shard in shards for line in shard["reports"]}
    with pytest.raises(ValueError, match="--resume"):
        quantize(models[model], out, plan)
    with pytest.raises(ValueError, match="different settings.*spec"):
        quantize(models[model], out, QuantizePlan(QuantSpec.parse("w3g32"), method, quantize_head=head), resume=True)

    quantized = []
    real = quantize_module._write_layer
    monkeypatch.setattr(quantize_module, "_write_layer", lambda w, module, *a: quantized.append(module) or real(w, module, *a))
    quantize(models[model], out, plan, resume=True)
    assert files(out) == files(whole)
    assert not (tmp_path / "resumed.partial").exists()
    layers = [entry["name"] for entry in read_info(whole).report["layers"]]
    assert sorted(quantized) == sorted(set(layers) - committed)  # only what the killed run had not committed
    assert sorted(entry["name"] for entry in read_info(out).report["layers"]) == sorted(layers)


def test_resume_without_earlier_run_starts_fresh(models, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(quantize_module, "STREAM_SHARD_BYTES", SHARD)
    plan = QuantizePlan(QuantSpec.parse("w4g32"), "rtn")
    out = quantize(models["untied"], tmp_path / "q", plan, resume=True)
    assert files(out) == files(quantize(models["untied"], tmp_path / "q2", plan))


def test_kill_before_any_shard_leaves_nothing_to_refuse(models, tmp_path, monkeypatch) -> None:
    """A run that committed no shard is not 'unfinished work': the next plain run just starts."""
    monkeypatch.setattr(quantize_module, "STREAM_SHARD_BYTES", 1 << 30)
    plan = QuantizePlan(QuantSpec.parse("w4g32"), "rtn")
    with pytest.raises(KeyboardInterrupt):
        quantize(models["untied"], tmp_path / "q", plan, progress=crash_after(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no work folder, no lock
    assert quantize(models["untied"], tmp_path / "q", plan).exists()
