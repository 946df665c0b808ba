"""make_complete_many (batched greedy replies for code tasks) against make_complete, prompt by prompt."""

from __future__ import annotations

import pytest

from tests.tiny import make_tiny_model, sample_text

from bitsmith.eval.tasks import make_complete, make_complete_many
from bitsmith.runtime.load import load_model


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(make_tiny_model(tmp_path_factory.mktemp("tasks") / "m", seed=2))


@pytest.mark.parametrize("chat", [False, True])
def test_batched_replies_equal_one_at_a_time(loaded, chat: bool) -> None:
    one = make_complete(loaded.model, loaded.tokenizer, chat=chat)
    many = make_complete_many(loaded.model, loaded.tokenizer, chat=chat, max_batch=3)
    prompts = [sample_text(n, seed=s) for s, n in enumerate((3, 7, 1, 12, 5, 9))]
    free = [one(p, 10, []) for p in prompts]
    stop = sorted({f.split()[2] for f in free if len(f.split()) > 2})[:2]  # words some greedy replies produce
    assert stop
    want = [one(p, 10, stop) for p in prompts]
    reported: dict[int, str] = {}
    got = many(prompts, 10, stop, lambda i, text: reported.setdefault(i, text))
    assert got == want and reported == dict(enumerate(want))
    assert any(w != f for w, f in zip(want, free))  # some replies really were cut at a stop
    assert many(prompts, 10, [], None) == free


def test_batched_replies_refuse_what_cannot_fit(loaded) -> None:
    many = make_complete_many(loaded.model, loaded.tokenizer)
    with pytest.raises(ValueError):
        many(["the cat"], 10_000, [], None)  # past the tiny model's 256 positions
