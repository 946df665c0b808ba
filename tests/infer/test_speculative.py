"""Speculative decoding (infer/speculative.py, infer/draft.py): the rejection sampler's output law is
exactly the target's on small vocabularies (computed, then sampled), greedy output is token for token
plain decoding's with a poor draft (rejections, so the KV-cache rollback is exercised) and with a perfect
one, and the CLI refuses impossible requests before building anything."""

from __future__ import annotations

import json

import pytest
import torch

from tests.tiny import make_tiny_model

from bitsmith.infer.draft import load_draft, quantized_copy
from bitsmith.infer.generate import generate
from bitsmith.infer.speculative import (
    acceptance_probability, residual_distribution, speculative_choice, speculative_generate,
)
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.spec import QuantSpec

OPTIONS = RuntimeOptions()
PROMPTS = ["the cat sat on the mat", "a dog ran far and", "w1 w2 w3 . big small", "the"]


def _random_pair(vocab: int, seed: int, zeros: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(vocab, generator=g, dtype=torch.float64) ** 3
    q = torch.rand(vocab, generator=g, dtype=torch.float64) ** 3
    if zeros:  # tokens one side never produces: the ratio and the residual must still come out right
        p[0] = 0.0
        q[1] = 0.0
    return p / p.sum(), q / q.sum()


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("zeros", [False, True])
def test_output_law_is_the_target_exactly(seed: int, zeros: bool) -> None:
    """P(emit y) = q(y) a(y) + (1 - sum_x q(x) a(x)) r(y) = p(y), summed over every draft token."""
    p, q = _random_pair(5, seed, zeros)
    accepted = torch.zeros(5, dtype=torch.float64)
    for x in range(5):
        if q[x] > 0:
            accepted[x] = q[x] * acceptance_probability(p, q, x)
    law = accepted + (1.0 - accepted.sum()) * residual_distribution(p, q)
    torch.testing.assert_close(law, p, atol=1e-12, rtol=0)


def test_identical_distributions_accept_everything() -> None:
    p, _ = _random_pair(7, 3, False)
    assert all(acceptance_probability(p, p, x) == pytest.approx(1.0) for x in range(7))
    torch.testing.assert_close(residual_distribution(p, p), p)  # never used, but still a distribution


def test_sampled_law_matches_the_target() -> None:
    """The sampler itself (draft draw, accept test, residual draw) over 40,000 trials: every token's
    frequency within 5 standard errors of p (fixed seed: deterministic)."""
    p, q = _random_pair(4, 11, False)
    g = torch.Generator().manual_seed(0)
    n = 40_000
    drafts = torch.multinomial(q.float(), n, replacement=True, generator=g)
    counts = torch.zeros(4, dtype=torch.float64)
    rejected = 0
    for x in drafts.tolist():
        ok, y = speculative_choice(p, q, x, g)
        counts[y] += 1
        rejected += not ok
    freq = counts / n
    stderr = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * stderr).all(), (freq, p)
    expected_rejection = 1.0 - float(torch.minimum(p, q).sum())  # total variation distance
    assert rejected / n == pytest.approx(expected_rejection, abs=0.01)


def test_a_draft_token_of_probability_zero_is_refused() -> None:
    p, q = _random_pair(5, 1, True)
    with pytest.raises(ValueError, match="probability 0"):
        acceptance_probability(p, q, 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from bitsmith.runtime.load import load_model

    folder = make_tiny_model(tmp_path_factory.mktemp("spec") / "m", "llama", seed=3)
    loaded = load_model(folder, options=OPTIONS)
    return folder, loaded


@pytest.mark.parametrize("k", [1, 3, 7])
def test_greedy_output_is_plain_decoding(tiny, k: int) -> None:
    folder, loaded = tiny
    draft = quantized_copy(str(folder), QuantSpec.parse("w2g64"), OPTIONS, QuantSpec.parse("w4g32"))
    proposed = accepted = 0
    for prompt in PROMPTS:
        plain = generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=24, stop_at_eos=False, options=OPTIONS)
        out = speculative_generate(loaded.model, draft, loaded.tokenizer, prompt, k=k, max_new_tokens=24,
                                   stop_at_eos=False, options=OPTIONS)
        assert out.generation.token_ids == plain.token_ids, prompt
        assert out.generation.text == plain.text
        proposed, accepted = proposed + out.stats.proposed, accepted + out.stats.accepted
    assert 0 < accepted < proposed  # some drafts kept, some rolled back: both paths ran


def test_greedy_with_a_quantized_target_on_the_fused_path(tiny) -> None:
    """A packed w4 target (plain decode takes the fused native step, the verify the torch lean path), exact
    float decode: still token for token. (With the default int8-activation decode the two paths round
    differently and a near-tie can flip: see the module docstring.)"""
    folder, loaded = tiny
    exact = RuntimeOptions(int8_decode=False, prefill="exact")
    target = quantized_copy(str(folder), QuantSpec.parse("w4g32"), exact)
    draft = quantized_copy(str(folder), QuantSpec.parse("w2g64"), exact)
    for prompt in PROMPTS:
        plain = generate(target, loaded.tokenizer, prompt, max_new_tokens=24, stop_at_eos=False, options=exact)
        out = speculative_generate(target, draft, loaded.tokenizer, prompt, k=4, max_new_tokens=24,
                                   stop_at_eos=False, options=exact)
        assert out.generation.token_ids == plain.token_ids, prompt


def test_a_perfect_draft_is_always_accepted(tiny) -> None:
    """The target as its own draft: greedy and sampled, every proposal is kept."""
    _, loaded = tiny
    for temperature in (0.0, 0.8):
        out = speculative_generate(loaded.model, loaded.model, loaded.tokenizer, PROMPTS[0], k=4, max_new_tokens=21,
                                   temperature=temperature, seed=5, stop_at_eos=False, options=OPTIONS)
        assert out.stats.acceptance_rate == 1.0
        assert out.generation.new_tokens == 21
        assert out.stats.rounds == 4  # 1 token from the prefill + 4 rounds of 4 drafts + 1 bonus


def test_sampled_run_is_reproducible_and_stops_at_eos(tiny) -> None:
    folder, loaded = tiny
    draft = quantized_copy(str(folder), QuantSpec.parse("w3g64"), OPTIONS)
    runs = [speculative_generate(loaded.model, draft, loaded.tokenizer, PROMPTS[1], k=3, max_new_tokens=30,
                                 temperature=1.0, top_p=0.9, seed=7, options=OPTIONS) for _ in range(2)]
    assert runs[0].generation.token_ids == runs[1].generation.token_ids
    ids = runs[0].generation.token_ids
    assert len(ids) <= 30 and all(t != 2 for t in ids[:-1])  # an EOS (id 2) can only be the last token


def test_bad_requests_are_refused(tiny, tmp_path) -> None:
    folder, loaded = tiny
    with pytest.raises(ValueError, match="1 to 7"):
        speculative_generate(loaded.model, loaded.model, loaded.tokenizer, "the", k=8)
    other = make_tiny_model(tmp_path / "other", "llama", seed=1, vocab_size=200)
    from bitsmith.runtime.load import load_model

    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(loaded.model, load_model(other).model, loaded.tokenizer, "the")
    with pytest.raises(ValueError, match="neither an existing checkpoint"):
        load_draft("w2-not-a-spec", loaded, OPTIONS)


def test_cli_reports_acceptance(tiny, capsys) -> None:
    from bitsmith.cli import main

    folder, _ = tiny
    assert main(["generate", str(folder), "the cat sat", "--draft", "w3g64", "--draft-k", "3",
                 "--max-new-tokens", "12", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["new_tokens"] <= 12 and line["k"] == 3 and 0.0 <= line["acceptance_rate"] <= 1.0
    assert line["proposed"] == 3 * line["rounds"]


def test_cli_refuses_bad_k_before_building(tiny, capsys) -> None:
    from bitsmith.cli import main

    folder, _ = tiny
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(folder), "the", "--draft", "w2g64", "--draft-k", "0"])
    assert exc.value.code == 1
    assert "--draft-k must be 1 to 7" in capsys.readouterr().err
