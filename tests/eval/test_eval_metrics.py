"""Metrics against hand-computed values; windows; evaluate() on a tiny random Llama."""
from __future__ import annotations

import math

import pytest
import torch

from bitsmith.eval.metrics import EvalResult, TokenStats, summarize, token_stats
from bitsmith.eval.perplexity import evaluate, tokenize_text, windows


def _tiny_llama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
    )
    return LlamaForCausalLM(config)


# ---------------------------------------------------------------- token_stats / summarize


def test_identical_logits_give_zero_kl_and_full_top1() -> None:
    logits = torch.randn(20, 50, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 50, (20,), generator=torch.Generator().manual_seed(2))
    s = token_stats(logits, logits, targets)
    assert torch.allclose(s.kld, torch.zeros(20, dtype=torch.float64), atol=1e-6)
    assert bool(s.top1.all())
    assert torch.equal(s.nll, s.ref_nll)


def test_kl_of_known_three_way_pair() -> None:
    p = torch.tensor([0.5, 0.25, 0.25])
    q = torch.tensor([0.25, 0.5, 0.25])
    s = token_stats(p.log()[None], q.log()[None], torch.tensor([1]))
    # KL(p||q) = .5 ln(.5/.25) + .25 ln(.25/.5) + .25 ln 1 = .25 ln 2
    assert s.kld.item() == pytest.approx(0.25 * math.log(2), abs=1e-6)
    assert s.nll.item() == pytest.approx(-math.log(0.5), abs=1e-6)  # model q on target 1
    assert s.ref_nll.item() == pytest.approx(-math.log(0.25), abs=1e-6)
    assert not bool(s.top1.item())  # argmax p = 0, argmax q = 1


def test_masked_reference_token_contributes_zero_kl() -> None:
    ref = torch.tensor([[0.0, 0.0, float("-inf")]])  # p = [.5, .5, 0]
    model = torch.tensor([[0.0, 0.0, 0.0]])  # q = [1/3]*3
    s = token_stats(ref, model, torch.tensor([0]))
    assert s.kld.item() == pytest.approx(math.log(1.5), abs=1e-6)


def test_chunked_equals_unchunked() -> None:
    gen = torch.Generator().manual_seed(3)
    ref = torch.randn(50, 1000, generator=gen) * 3
    logits = ref + torch.randn(50, 1000, generator=gen)
    targets = torch.randint(0, 1000, (50,), generator=gen)
    a = token_stats(ref, logits, targets, chunk=7)
    b = token_stats(ref, logits, targets, chunk=1000)
    for field in ("nll", "kld", "ref_nll"):
        assert torch.allclose(getattr(a, field), getattr(b, field), rtol=0, atol=1e-9)
    assert torch.equal(a.top1, b.top1)
    assert a.kld.shape == (50,) and a.kld.dtype == torch.float64


def test_no_reference_leaves_kl_fields_empty() -> None:
    s = token_stats(None, torch.zeros(4, 10), torch.zeros(4, dtype=torch.long))
    assert s.kld is None and s.top1 is None and s.ref_nll is None
    result = summarize([s])
    assert result.kld_mean is None and result.top1 is None and result.ref_ppl is None
    assert set(result.as_dict()) == {"ppl", "tokens"}


@pytest.mark.parametrize("vocab", [7, 300])
def test_uniform_model_has_perplexity_equal_to_vocab(vocab: int) -> None:
    targets = torch.arange(40) % vocab
    s = token_stats(None, torch.zeros(40, vocab), targets, chunk=9)
    assert summarize([s]).ppl == pytest.approx(vocab, rel=1e-6)


def test_summarize_pools_positions_and_percentiles() -> None:
    kld = torch.arange(100, dtype=torch.float64)  # 0..99
    stats = [
        TokenStats(nll=torch.full((50,), math.log(2.0), dtype=torch.float64), kld=kld[:50],
                   top1=torch.ones(50, dtype=torch.bool),
                   ref_nll=torch.zeros(50, dtype=torch.float64)),
        TokenStats(nll=torch.full((50,), math.log(2.0), dtype=torch.float64), kld=kld[50:],
                   top1=torch.zeros(50, dtype=torch.bool),
                   ref_nll=torch.zeros(50, dtype=torch.float64)),
    ]
    r = summarize(stats)
    assert r.tokens == 100
    assert r.ppl == pytest.approx(2.0)
    assert r.ref_ppl == pytest.approx(1.0)
    assert r.kld_mean == pytest.approx(49.5)
    assert r.kld_median == pytest.approx(49.5)
    assert r.kld_p99 == pytest.approx(98.01)  # linear interpolation between 98 and 99
    assert r.top1 == pytest.approx(0.5)
    d = r.as_dict()
    assert {"ppl", "tokens", "kld_mean", "kld_p99", "top1", "ref_ppl", "kld_median"} <= set(d)
    assert isinstance(d["tokens"], int) and isinstance(d["ppl"], float)


def test_eval_result_is_frozen() -> None:
    r = EvalResult(ppl=1.0, tokens=1)
    with pytest.raises(AttributeError):
        r.ppl = 2.0  # type: ignore[misc]


def test_shape_mismatch_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="one target token id per logits row"):
        token_stats(None, torch.zeros(4, 10), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="share the tokenizer"):
        token_stats(torch.zeros(4, 11), torch.zeros(4, 10), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one window"):
        summarize([])


# ---------------------------------------------------------------- windows / tokenize_text


def test_windows_drop_the_remainder() -> None:
    w = windows(list(range(10)), ctx=3)
    assert w.shape == (3, 3) and w.dtype == torch.long
    assert w.flatten().tolist() == list(range(9))
    assert windows(torch.arange(6), ctx=3).shape == (2, 3)


def test_windows_error_on_short_text() -> None:
    with pytest.raises(ValueError) as err:
        windows(list(range(300)), ctx=512)
    assert str(err.value) == (
        "the text has 300 tokens, fewer than one window of --ctx 512; "
        "use a longer text or a smaller --ctx"
    )


def _word_tokenizer(bos_by_default: bool):  # noqa: ANN202 - transformers type
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "the": 3, "cat": 4, "sat": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos_by_default:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 0)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_tokenize_text_follows_the_bos_convention() -> None:
    llama_like = _word_tokenizer(bos_by_default=True)
    qwen_like = _word_tokenizer(bos_by_default=False)
    assert tokenize_text(llama_like, "the cat sat") == [0, 3, 4, 5]
    assert tokenize_text(qwen_like, "the cat sat") == [3, 4, 5]
    assert tokenize_text(llama_like, "the cat sat", add_bos=False) == [3, 4, 5]
    assert tokenize_text(qwen_like, "the cat sat", add_bos=True) == [0, 3, 4, 5]


# ---------------------------------------------------------------- evaluate


def test_evaluate_against_itself_gives_zero_kl() -> None:
    model = _tiny_llama()
    w = windows(torch.randint(0, 300, (100,), generator=torch.Generator().manual_seed(0)), 32)
    seen: list[tuple[int, int]] = []
    r = evaluate(model, w, reference=model, progress=lambda d, t: seen.append((d, t)))
    assert r.tokens == 3 * 31
    assert r.kld_mean == pytest.approx(0.0, abs=1e-6)
    assert r.kld_p99 == pytest.approx(0.0, abs=1e-6)
    assert r.top1 == 1.0
    assert r.ppl == pytest.approx(r.ref_ppl)
    assert seen == [(32, 96), (64, 96), (96, 96)]
    assert model.training  # the caller's mode is restored


def test_evaluate_ppl_matches_cross_entropy() -> None:
    model = _tiny_llama(seed=1)
    w = windows(torch.randint(0, 300, (64,), generator=torch.Generator().manual_seed(1)), 16)
    r = evaluate(model, w)
    assert r.kld_mean is None and r.tokens == 4 * 15
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=w).logits[:, :-1]  # [4, 15, V]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 300), w[:, 1:].reshape(-1))
    assert r.ppl == pytest.approx(math.exp(ce.item()), rel=1e-5)
    other = evaluate(_tiny_llama(seed=2), w, reference=model)
    assert other.kld_mean > 0 and other.ref_ppl == pytest.approx(r.ppl, rel=1e-5)


def test_windows_with_bos_start_every_window_with_it() -> None:
    from bitsmith.eval.perplexity import windows

    w = windows(list(range(10, 30)), ctx=5, bos=1)
    assert w.tolist() == [[1, 10, 11, 12, 13], [1, 14, 15, 16, 17], [1, 18, 19, 20, 21], [1, 22, 23, 24, 25], [1, 26, 27, 28, 29]]
    assert windows(list(range(10, 30)), ctx=5).shape == (4, 5)


def _kl_oracle(ref: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row the slow way: float64 log-softmax, 0 log 0 = 0."""
    logp = torch.log_softmax(ref.double(), -1)
    logq = torch.log_softmax(logits.double(), -1)
    return torch.where(torch.isneginf(logp), 0.0, logp.exp() * (logp - logq)).sum(-1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_kl_and_top1_against_a_float64_oracle(seed: int) -> None:
    """Random logits over a large vocabulary, small and large divergences, masked reference tokens in some
    rows and exact ties (top-1 takes the first index, as argmax): the float32 fast path within 1e-6
    (absolute, plus 1e-5 relative) of the float64 oracle, per position."""
    g = torch.Generator().manual_seed(seed)
    t, v = 37, 5003
    ref = torch.randn(t, v, generator=g) * 4
    scale = torch.logspace(-4, 0, t)[:, None]  # KL from ~1e-8 to ~1
    logits = ref + scale * torch.randn(t, v, generator=g)
    ref[3, torch.randint(0, v, (50,), generator=g)] = float("-inf")  # tokens the reference masks
    ref[5, 10], ref[5, 20] = 100.0, 100.0  # a tie in the reference's top token
    logits[5, 20], logits[5, 10] = 100.0, 100.0
    targets = torch.randint(0, v, (t,), generator=g)
    s = token_stats(ref, logits, targets, chunk=16)
    want = _kl_oracle(ref, logits)
    assert torch.isfinite(s.kld).all()
    torch.testing.assert_close(s.kld, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(s.top1, ref.argmax(-1) == logits.argmax(-1)) and bool(s.top1[5])
    want_nll = -torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(s.nll, want_nll, atol=1e-5, rtol=1e-6)


def test_evaluate_reuses_heap_pages_once_for_the_whole_loop(glibc_calls: list) -> None:
    """Scoring loops run inside eval_mode, which serves them from reused heap pages (kernels.alloc):
    one raise before the first window, one restore and trim after the last."""
    from types import SimpleNamespace

    import torch

    from bitsmith.eval.perplexity import evaluate
    from bitsmith.kernels import alloc

    calls = glibc_calls

    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(11, 11)

        def forward(self, input_ids, use_cache=False):
            calls.append(("forward",))
            return SimpleNamespace(logits=self.emb(input_ids))

    wins = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(0))
    result = evaluate(Toy(), wins)
    assert result.tokens == 3 * 5
    assert [c[0] for c in calls] == ["mallopt", "mallopt", "forward", "forward", "forward", "mallopt", "mallopt", "trim"]
    assert calls[0][2] == alloc.REUSE_THRESHOLD and calls[-2][2] == alloc.LEAN_THRESHOLD
