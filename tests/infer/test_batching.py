"""Greedy continuous batching (infer/batching.py) against its oracle: each prompt generated alone, greedy,
by bitsmith.infer.generate on the same model; float and packed (native multi-row gemv) models."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import make_tiny_model, tiny_tokenizer

from bitsmith.infer.batching import BatchStats, common_prefix, generate_many
from bitsmith.infer.generate import eos_ids, generate
from bitsmith.kernels.cpu import GEMV_MAX_ROWS
from bitsmith.runtime.load import load_model
from bitsmith.runtime.options import RuntimeOptions

EXACT = RuntimeOptions(int8_decode=False, kv_cache="fp32", prefill="exact")


def random_prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts of the w0..w99 words only: punctuation would not survive a decode-encode round trip."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(17, 117, (int(torch.randint(1, 14, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def alone(model, tokenizer, prompt: list[int], max_new: int, options: RuntimeOptions) -> list[int]:
    text = tokenizer.decode(prompt)  # the tiny word-level tokenizer round-trips its ids
    assert tokenizer(text)["input_ids"] == prompt
    return list(generate(model, tokenizer, text, max_new_tokens=max_new, options=options).token_ids)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize
    from bitsmith.spec import QuantSpec

    root = tmp_path_factory.mktemp("batching")
    src = make_tiny_model(root / "m", seed=5)
    ckpt = quantize(src, root / "q", QuantizePlan(QuantSpec.parse("w4g32")))
    return {"float": (load_model(src, options=EXACT).model, EXACT),
            "w4g32": (load_model(ckpt, options=RuntimeOptions()).model, RuntimeOptions())}


@pytest.mark.parametrize("kind", ["float", "w4g32"])
@pytest.mark.parametrize("seed", [0, 1])
def test_batched_tokens_equal_each_prompt_alone(tiny_models, kind: str, seed: int) -> None:
    """More prompts than rows, so rows finish and refill; every prompt's tokens equal its batch-1 greedy run."""
    model, options = tiny_models[kind]
    tokenizer = tiny_tokenizer()
    prompts = random_prompts(7, seed)
    g = torch.Generator().manual_seed(seed + 10)
    budgets = {i: int(torch.randint(1, 12, (1,), generator=g)) for i in range(len(prompts))}
    # A per-prompt stop: prompt i stops after budgets[i] tokens, so rows leave the batch at different steps.
    stats = BatchStats()
    done: dict[int, list[int]] = {}
    got = generate_many(model, prompts, 12, eos=eos_ids(model, tokenizer), stopped=lambda i, ids: len(ids) >= budgets[i],
                        on_done=lambda i, ids: done.setdefault(i, list(ids)), max_batch=3, options=options, stats=stats)
    assert got is not None and sorted(done) == list(range(len(prompts)))
    for i, prompt in enumerate(prompts):
        want = alone(model, tokenizer, prompt, budgets[i], options)
        assert got[i] == want == done[i], f"prompt {i}"
    assert stats.steps > 0 and 1.0 < stats.mean_batch <= 3.0  # the steps really were batched
    assert stats.generated_tokens == sum(len(t) for t in got)
    assert stats.prefill_tokens == sum(len(p) for p in prompts) - stats.shared_prefix_tokens * (len(prompts) - 1)


@pytest.mark.parametrize("kind", ["float", "w4g32"])
def test_a_shared_prefix_is_prefilled_once(tiny_models, kind: str) -> None:
    """Prompts sharing a prefix (one of them is the prefix itself): the prefix runs once, its cache is
    copied into each row, and every prompt's tokens still equal its batch-1 greedy run."""
    model, options = tiny_models[kind]
    tokenizer = tiny_tokenizer()
    head = sum(random_prompts(3, 7), [])[:20]
    tails = [t * 2 for t in random_prompts(5, 9)]  # 2 to 26 tokens: shorter and longer than one gemv pass
    prompts = [head + tail for tail in tails] + [list(head)]
    stats = BatchStats()
    got = generate_many(model, prompts, 8, eos=eos_ids(model, tokenizer), max_batch=4, options=options, stats=stats)
    for i, prompt in enumerate(prompts):
        assert got[i] == alone(model, tokenizer, prompt, 8, options), f"prompt {i}"
    assert len(head) == 20 and stats.shared_prefix_tokens == len(head)
    # the prefix once, then each prompt's tail, but never fewer than GEMV_MAX_ROWS + 1 rows (a prefill)
    assert stats.prefill_tokens == len(head) + sum(max(len(t), GEMV_MAX_ROWS + 1) for t in tails + [[]])


def test_common_prefix() -> None:
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == [1, 2]
    assert common_prefix([[1, 2], [3]]) == [] and common_prefix([[1, 2]]) == []


def test_eos_ends_a_row_and_is_kept(tiny_models) -> None:
    """A row whose greedy token is EOS stops there (EOS kept, as generate keeps it); others go on."""
    model, options = tiny_models["float"]
    tokenizer = tiny_tokenizer()
    prompts = random_prompts(4, 3)
    free = generate_many(model, prompts, 6, options=options)
    assert free is not None
    eos_token = free[0][2]  # pretend prompt 0's third token is the end of sequence
    got = generate_many(model, prompts, 6, eos=frozenset({eos_token}), max_batch=4, options=options)
    for want, ids in zip(free, got):
        cut = want.index(eos_token) + 1 if eos_token in want else len(want)
        assert ids == want[:cut]
    assert got[0][-1] == eos_token and len(got[0]) <= 3


def test_refusals_and_the_fallback(tiny_models) -> None:
    model, options = tiny_models["float"]
    with pytest.raises(ValueError, match="max_batch"):
        generate_many(model, [[3]], 4, max_batch=0, options=options)
    with pytest.raises(ValueError, match="at least one token"):
        generate_many(model, [[3], []], 4, options=options)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_many(model, [[3]], 0, options=options)
    hooked = model.model.layers[0].register_forward_hook(lambda *a: None)  # hooks: outside the lean path
    try:
        assert generate_many(model, [[3]], 2, options=options) is None
    finally:
        hooked.remove()
