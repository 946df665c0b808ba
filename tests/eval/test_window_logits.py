"""Scoring through the lean runner (eval.perplexity.window_logits) against the Hugging Face forward."""
from __future__ import annotations

import pytest
import torch

from tests.infer.test_lean import ARCHS, ATOL
from tests.tiny import make_tiny_model

from bitsmith.eval.perplexity import evaluate, window_logits, windows
from bitsmith.eval.refcache import build_cache, evaluate_against_cache
from bitsmith.eval.suite import evaluate_variants
from bitsmith.runtime.options import RuntimeOptions

pytestmark = pytest.mark.usefixtures("one_thread")

EXACT = RuntimeOptions(int8_decode=False, kv_cache="fp32", prefill="exact")


def _no_hf_forward(model: torch.nn.Module) -> None:
    """Make the model's own forward fail, so a result proves the lean path ran (hooks would make it decline)."""
    def boom(*args, **kwargs):
        raise AssertionError("the Hugging Face forward ran")
    model.forward = boom


def _models(arch: str, tmp_path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """An fp32 model and its w4g32 checkpoint, loaded as eval loads them."""
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize
    from bitsmith.runtime.load import load_model
    from bitsmith.spec import QuantSpec

    src = make_tiny_model(tmp_path / "m", arch, seed=7, **ARCHS[arch])
    ckpt = quantize(src, tmp_path / "q", QuantizePlan(QuantSpec.parse("w4g32")))
    return load_model(src, options=EXACT).model.eval(), load_model(ckpt, options=EXACT).model.eval()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lean_scoring_equals_the_hf_forward(arch: str, tmp_path) -> None:
    reference, model = _models(arch, tmp_path)
    # 72-token windows: past the attention kernel's 32-row tiles and Gemma's window of 8
    wins = windows(torch.randint(0, 100, (3 * 72,), generator=torch.Generator().manual_seed(8)), 72)
    with torch.no_grad():
        slow = [window_logits(m, wins[0], lean=False) for m in (reference, model)]
    hf = evaluate(model, wins, reference=reference, lean=False)
    for m in (reference, model):
        _no_hf_forward(m)
    with torch.no_grad():
        fast = [window_logits(m, wins[0]) for m in (reference, model)]
    for a, b in zip(fast, slow):
        assert a.shape == b.shape == (72, model.config.vocab_size)
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    lean = evaluate(model, wins, reference=reference)
    assert lean.tokens == hf.tokens == 3 * 71
    assert lean.kld_mean > 0  # a real quantization gap, measured the same both ways
    assert lean.ppl == pytest.approx(hf.ppl, rel=1e-4)
    assert lean.ref_ppl == pytest.approx(hf.ref_ppl, rel=1e-4)
    assert lean.kld_mean == pytest.approx(hf.kld_mean, rel=1e-3, abs=1e-6)
    assert lean.top1 == hf.top1


def test_cache_and_variants_score_through_the_lean_path(tmp_path) -> None:
    """refcache's build/score and the suite's evaluate_variants take the same path as evaluate."""
    reference, model = _models("llama", tmp_path)
    wins = windows(torch.randint(0, 100, (2 * 40,), generator=torch.Generator().manual_seed(9)), 40)
    expected = evaluate(model, wins, reference=reference, lean=False)
    for m in (reference, model):
        _no_hf_forward(m)
    got = evaluate_variants(reference, {"q": model}, wins)["q"]
    assert got.ppl == pytest.approx(expected.ppl, rel=1e-4)
    assert got.kld_mean == pytest.approx(expected.kld_mean, rel=1e-3)
    cache = build_cache(reference, wins, k=reference.config.vocab_size, meta={})  # the whole vocabulary: exact KL
    cached = evaluate_against_cache(model, cache)
    assert cached.ppl == pytest.approx(expected.ppl, rel=1e-4)
    assert cached.kld_mean == pytest.approx(expected.kld_mean, rel=1e-3)


def test_models_the_runner_declines_use_the_hf_forward(tmp_path) -> None:
    """A forward hook (as offloading adds) makes the lean path decline; scoring still runs, through the hook."""
    reference, _ = _models("llama", tmp_path)
    wins = windows(torch.randint(0, 100, (40,), generator=torch.Generator().manual_seed(10)), 40)
    calls = []
    reference.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    result = evaluate(reference, wins)
    assert calls == [1] and result.tokens == 39
