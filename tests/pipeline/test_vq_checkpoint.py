"""A vq checkpoint end to end on a tiny random model: quantize (calibrated, rotated) -> packed,
self-describing file -> load -> logits equal the dequantize-then-matmul oracle; inspect and the
CLI say what it is; wrong combinations are refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.tiny import make_tiny_model, sample_text_file

from bitsmith.spec import QuantSpec


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("vq") / "m", "llama", hidden_size=96, intermediate_size=160)


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory) -> Path:
    return sample_text_file(tmp_path_factory.mktemp("vqtext"), 2000)


def logits(ckpt: Path, ids: torch.Tensor, kernel: str) -> torch.Tensor:
    import bitsmith
    from bitsmith.runtime.options import RuntimeOptions

    loaded = bitsmith.load(ckpt, options=RuntimeOptions(kernel=kernel, prefill="exact", int8_decode=False))  # exact w8 head too
    with torch.no_grad():
        return loaded.model(ids).logits


@pytest.mark.parametrize("spec, rotate", [("w2g32vq", True), ("w3g32vq", False)])
def test_quantize_load_logits_round_trip(tiny: Path, calib_text: Path, tmp_path: Path, spec: str, rotate: bool) -> None:
    import bitsmith
    from bitsmith.calib import CalibrationConfig
    from bitsmith.io.inspect import inspect_path
    from bitsmith.io.safetensors import read_header

    out = tmp_path / "q"
    bitsmith.quantize(tiny, out, spec, "vq", calibration=CalibrationConfig(text=str(calib_text), samples=4, seq_len=32),
                      options={"rotate": True} if rotate else {})
    parsed = QuantSpec.parse(spec)
    # self-describing: the metadata names the spec, the file holds indices, scales and the codebook
    header = read_header(next(out.glob("*.safetensors")))
    meta = json.loads(header.metadata["quantization"])
    assert meta["method"] == "vq" and meta["tensors"]["model.layers.0.mlp.up_proj"]["spec"] == spec
    grid = header.tensors["model.layers.0.mlp.up_proj.grid"]
    assert tuple(grid.shape) == (parsed.levels, parsed.vq_dim)
    # inspect: the format, and bits/weight counting the codebook (exactly what the spec says is stored)
    report = inspect_path(out)
    row = next(t for t in report.tensors if t.name == "model.layers.0.mlp.up_proj.weight")
    assert "codebooks" in report.details and f"{parsed.levels} x {parsed.vq_dim}" in report.details["codebooks"]
    assert row.kind == spec and row.bits_per_weight == pytest.approx(parsed.bits_per_weight(160, 96) + (1 / 160 if rotate else 0))
    # the loaded model runs the native kernel and equals the dequantize-then-matmul oracle
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    fast, oracle = logits(out, ids, "auto"), logits(out, ids, "reference")
    assert torch.allclose(fast, oracle, atol=2e-4)
    # decode-sized inputs (one token) take the gemv path
    assert torch.allclose(logits(out, ids[:1, :1], "auto"), oracle[:1, :1], atol=2e-4)
    # and it is a model of the original: closer to it than a random model is
    reference = logits(tiny, ids, "reference")
    other = logits(make_tiny_model(tmp_path / "other", "llama", seed=5, hidden_size=96, intermediate_size=160), ids, "reference")
    assert (fast - reference).pow(2).mean() < (other - reference).pow(2).mean()


def test_wrong_method_or_spec_is_refused_before_work(tiny: Path, tmp_path: Path, capsys) -> None:
    from bitsmith.cli import main

    for spec, method, says in [("w2g64vq", "gptq", "--method vq"), ("w4g32", "vq", "vq spec")]:
        with pytest.raises(SystemExit):
            main(["quantize", str(tiny), "--spec", spec, "--method", method, "--out", str(tmp_path / method)])
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err
    assert not (tmp_path / "gptq").exists() and not (tmp_path / "vq").exists()


def test_cli_quantize_and_inspect(tiny: Path, calib_text: Path, tmp_path: Path, capsys) -> None:
    from bitsmith.cli import main

    out = tmp_path / "c"
    assert main(["quantize", str(tiny), "--spec", "w2g32vq", "--method", "vq", "--rotate", "--calib", str(calib_text),
                 "--calib-samples", "4", "--calib-len", "32", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "w2g32vq" in text


def test_greedy_generation_follows_full_forwards(tiny: Path, calib_text: Path, tmp_path: Path) -> None:
    """The lean decode path (one-row gemv, KV cache) picks the argmax of full forwards at every step."""
    import bitsmith
    from bitsmith.calib import CalibrationConfig
    from bitsmith.infer.generate import generate
    from bitsmith.runtime.load import load_model
    from bitsmith.runtime.options import RuntimeOptions

    out = tmp_path / "g"
    bitsmith.quantize(tiny, out, "w2g32vq", "vq", calibration=CalibrationConfig(text=str(calib_text), samples=4, seq_len=32))
    loaded = load_model(out, options=RuntimeOptions(int8_decode=False))
    tok = loaded.tokenizer
    ids = tok("the cat sat on")["input_ids"]
    result = generate(loaded.model, tok, "the cat sat on", max_new_tokens=10, stop_at_eos=False)
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(10):
            x = torch.cat([x, loaded.model(x).logits[0, -1].argmax().view(1, 1)], 1)
    # token ids, not text: the text skips special tokens (a generated <s> is in the ids, not the text)
    assert list(result.token_ids) == x[0, len(ids):].tolist()
