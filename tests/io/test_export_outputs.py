"""Exports of a checkpoint made with bitsmith's default output policy (embedding and head at w8,
one scale per row): GPTQ writes them dequantized in fp16, GGUF writes them as Q8_0 (the 8-bit type
llama.cpp uses), and the body keeps its exact mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bitsmith.io.checkpoint import read_info
from bitsmith.io.export_gptq import export_gptq
from bitsmith.io.packed import quantized_tensors
from bitsmith.pipeline.outputs import with_output_spec
from bitsmith.pipeline.plan import QuantizePlan
from bitsmith.pipeline.quantize import quantize
from bitsmith.runtime.load import load_model
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.spec import QuantSpec

from tests.tiny import make_tiny_model

EXACT = RuntimeOptions(int8_decode=False, prefill="exact")


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def checkpoint(request, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    model = make_tiny_model(root / "m", "llama", tie_word_embeddings=request.param)
    plan = with_output_spec(QuantizePlan(QuantSpec.parse("w4g32"), "rtn"), model, QuantSpec.parse("w8"))
    return quantize(model, root / "ck", plan)


def _logits(path: Path) -> torch.Tensor:
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return load_model(path, options=EXACT).model(ids).logits.float()


def test_gptq_export_writes_the_outputs_in_fp16(checkpoint: Path, tmp_path: Path) -> None:
    report = export_gptq(checkpoint, tmp_path / "gptq")
    info = read_info(checkpoint)
    assert report["model.embed_tokens"]["written"] == "dequantized fp16"
    assert ("lm_head" in report) == ("lm_head" in info.specs)
    layers = quantized_tensors(checkpoint, info)
    assert str(layers["model.embed_tokens"].spec) == "w8"
    assert (_logits(checkpoint) - _logits(tmp_path / "gptq")).abs().max() < 1e-2  # fp16 rounding of w8 values


def test_gguf_export_writes_the_outputs_as_q8_0(checkpoint: Path, tmp_path: Path) -> None:
    import gguf

    from bitsmith.cli import main

    out = tmp_path / "m.gguf"
    assert main(["export", str(checkpoint), "--to", "gguf", "--out", str(out)]) == 0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["token_embd.weight"] == "Q8_0"
    assert types.get("output.weight", "Q8_0") == "Q8_0"  # absent when tied
    assert types["blk.0.attn_q.weight"] == "Q4_1"  # w4g32 stays exact
