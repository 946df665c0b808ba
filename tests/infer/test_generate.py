"""Generation loop: KV cache == naive recompute, seeded sampling, streaming, chat, EOS."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from bitsmith.infer.generate import GenerationResult, generate, sample_next

CORPUS = (
    "The quick brown fox jumps over the lazy dog. Café, naïve, déjà vu! "
    "def add(a, b):\n    return a + b\n"
) * 20


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """A byte-level BPE tokenizer (258 base tokens + merges, 300 in all), trained in-process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, bos_token_id=0, eos_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


class ScriptedModel(torch.nn.Module):
    """Emits a fixed token script; the 'cache' is just the number of tokens seen."""

    def __init__(self, script: list[int], vocab: int = 300, eos: Any = 1) -> None:
        super().__init__()
        self.script = script
        self.vocab = vocab
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(eos_token_id=eos)
        self.generation_config = SimpleNamespace(eos_token_id=eos)

    def forward(self, input_ids: torch.Tensor, past_key_values: Any = None,
                use_cache: bool = True) -> SimpleNamespace:
        seen = (past_key_values or 0) + input_ids.shape[1]
        step = seen - self.prompt_len
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)
        logits[0, -1, self.script[min(step, len(self.script) - 1)]] = 10.0
        return SimpleNamespace(logits=logits, past_key_values=seen)

    prompt_len = 0


def _naive_greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    """Re-run the full sequence without a cache at every step."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out


# ---------------------------------------------------------------- sample_next


def test_sample_next_greedy_and_nucleus() -> None:
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    assert sample_next(logits, 0.0, 1.0, None) == 0
    gen = torch.Generator().manual_seed(0)
    draws = [sample_next(logits, 1.0, 0.6, gen) for _ in range(300)]
    assert set(draws) == {0, 1}  # 0.5 + 0.3 reaches 0.6; token 2 is outside the nucleus
    assert {sample_next(logits, 1.0, 0.4, gen) for _ in range(50)} == {0}


def test_sample_next_follows_the_distribution() -> None:
    p = torch.tensor([0.6, 0.3, 0.1])
    gen = torch.Generator().manual_seed(1)
    draws = torch.tensor([sample_next(p.log(), 1.0, 1.0, gen) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=3).float() / 4000
    assert torch.allclose(freq, p, atol=0.03)


def test_sample_next_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="temperature"):
        sample_next(torch.zeros(3), -1.0, 1.0, None)
    with pytest.raises(ValueError, match="top_p"):
        sample_next(torch.zeros(3), 1.0, 0.0, None)


# ---------------------------------------------------------------- generate on a tiny Llama


def test_greedy_with_cache_equals_naive_recompute(model: Any, tokenizer: Any) -> None:
    prompt = "The quick brown fox"
    result = generate(model, tokenizer, prompt, max_new_tokens=20, stop_at_eos=False)
    ids = tokenizer(prompt)["input_ids"]
    assert result.prompt_tokens == len(ids)
    assert list(result.token_ids) == _naive_greedy(model, ids, 20)
    assert result.new_tokens == 20
    assert result.text == tokenizer.decode(list(result.token_ids), skip_special_tokens=True)
    assert result.prefill_tok_s > 0 and result.decode_tok_s > 0


def test_seeded_sampling_is_reproducible_and_local(model: Any, tokenizer: Any) -> None:
    state = torch.get_rng_state()
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, stop_at_eos=False)
    a = generate(model, tokenizer, "def add", seed=7, **kw)
    b = generate(model, tokenizer, "def add", seed=7, **kw)
    c = generate(model, tokenizer, "def add", seed=8, **kw)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not touched


def test_tiny_top_p_equals_greedy(model: Any, tokenizer: Any) -> None:
    greedy = generate(model, tokenizer, "Café", max_new_tokens=12, stop_at_eos=False)
    nucleus = generate(model, tokenizer, "Café", max_new_tokens=12, temperature=1.3,
                       top_p=1e-6, seed=3, stop_at_eos=False)
    assert nucleus.token_ids == greedy.token_ids


def test_streamed_pieces_concatenate_to_text(model: Any, tokenizer: Any) -> None:
    pieces: list[str] = []
    result = generate(model, tokenizer, "naïve", max_new_tokens=30, temperature=1.0,
                      seed=0, on_token=pieces.append, stop_at_eos=False)
    assert "".join(pieces) == result.text
    assert all(pieces)


def test_chat_without_template_errors_clearly(model: Any, tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="no chat template.*without --chat"):
        generate(model, tokenizer, "hi", chat=True)


def test_chat_applies_the_template(model: Any, tokenizer: Any) -> None:
    tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    try:
        result = generate(model, tokenizer, "hi", chat=True, max_new_tokens=3)
        expected = tokenizer("<s>user: hi\nassistant:", add_special_tokens=False)["input_ids"]
        assert result.prompt_tokens == len(expected)
    finally:
        tokenizer.chat_template = None


def test_as_json_contract(model: Any, tokenizer: Any) -> None:
    result = generate(model, tokenizer, "The", max_new_tokens=4, stop_at_eos=False)
    assert isinstance(result, GenerationResult)
    d = result.as_json()
    assert set(d) == {"new_tokens", "prefill_tok_s", "decode_tok_s", "text"}
    assert d["new_tokens"] == 4 and isinstance(d["decode_tok_s"], float)
    with pytest.raises(AttributeError):
        result.text = "x"  # type: ignore[misc]


# ---------------------------------------------------------------- streaming and EOS, scripted


def _ids(tokenizer: Any, tokens: list[str]) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(tokens)
    assert tokenizer.unk_token_id not in ids
    return ids


def test_multibyte_character_is_streamed_whole(tokenizer: Any) -> None:
    # 'é' is the two bytes C3 A9, byte-level tokens 'Ã' and '©': the first alone is U+FFFD.
    script = _ids(tokenizer, ["h", "Ã", "©", "!"])
    scripted = ScriptedModel(script)
    scripted.prompt_len = len(tokenizer("x")["input_ids"])
    pieces: list[str] = []
    result = generate(scripted, tokenizer, "x", max_new_tokens=4, on_token=pieces.append)
    assert pieces == ["h", "é", "!"]
    assert result.text == "hé!"


def test_stops_at_any_eos_id(tokenizer: Any) -> None:
    a, b = _ids(tokenizer, ["a", "b"])
    scripted = ScriptedModel([a, b, a, a], eos=[1, b])
    scripted.prompt_len = len(tokenizer("x")["input_ids"])
    result = generate(scripted, tokenizer, "x", max_new_tokens=10)
    assert list(result.token_ids) == [a, b] and result.text == "ab"
    eos = tokenizer.eos_token_id
    scripted = ScriptedModel([a, eos, a], eos=eos)
    scripted.prompt_len = len(tokenizer("x")["input_ids"])
    result = generate(scripted, tokenizer, "x", max_new_tokens=10)
    assert result.new_tokens == 2 and result.text == "a"  # EOS counted, not printed
    result = generate(scripted, tokenizer, "x", max_new_tokens=3, stop_at_eos=False)
    assert result.new_tokens == 3


def test_zero_new_tokens(tokenizer: Any) -> None:
    scripted = ScriptedModel([5])
    result = generate(scripted, tokenizer, "x", max_new_tokens=0)
    assert result.new_tokens == 0 and result.text == "" and result.token_ids == ()
