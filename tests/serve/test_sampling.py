"""Text assembly with stop strings, log-probabilities against a direct computation, request checks
that need no server (a model without a chat template), and the scheduler's batching at step level."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.tiny import make_tiny_model, tiny_tokenizer

from bitsmith.serve.requests import ApiError, chat_prompt_ids
from bitsmith.serve.sampling import SamplingParams, TextTail, logprobs_of


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_text_pieces_concatenate_and_stop_strings_cut(tok) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        ids = torch.randint(3, len(tok), (12,), generator=g).tolist()
        full = tok.decode(ids, skip_special_tokens=True)
        words = full.split()
        stop = " ".join(words[4:6]) if torch.rand(1, generator=g) < 0.7 else "no-such-text"
        tail = TextTail(tok, (stop, "zz-unused"))
        pieces = [tail.push(i) for i in ids] + [tail.finish()]
        assert "".join(pieces) == tail.text
        if stop in full:
            assert tail.stopped and tail.text == full[: full.index(stop)]
        else:
            assert not tail.stopped and tail.text == full


def test_held_back_prefix_of_a_stop_string_is_released_at_the_end(tok) -> None:
    ids = tok("the cat sat")["input_ids"]
    tail = TextTail(tok, ("sat on",))
    assert "".join(tail.push(i) for i in ids) == "the cat "  # "sat" may still become "sat on"
    assert tail.finish() == "sat" and tail.text == "the cat sat"


def test_logprobs_of_against_direct_computation() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 40, generator=g) * 3
    tokens = torch.randint(0, 40, (5,), generator=g)
    out = logprobs_of(logits, tokens, 3)
    for row, t, e in zip(logits, tokens.tolist(), out):
        lp = row.double().log_softmax(-1)
        assert e.token == t and e.logprob == pytest.approx(float(lp[t]), abs=1e-5)
        order = sorted(range(40), key=lambda i: -float(lp[i]))[:3]
        assert [i for i, _ in e.top] == order
    assert all(e.top == () for e in logprobs_of(logits, tokens, 0))


def test_chat_without_template_is_a_clear_400(tok) -> None:
    tok.chat_template = None
    with pytest.raises(ApiError, match="no chat template") as err:
        chat_prompt_ids(tok, [{"role": "user", "content": "hi"}])
    assert err.value.status == 400


def test_scheduler_batches_queued_jobs_and_matches_generate(tmp_path) -> None:
    """Jobs queued before the thread starts join one per step boundary and then decode together; each
    greedy continuation equals ``generate`` alone."""
    from bitsmith.infer.generate import generate
    from bitsmith.runtime.load import load_model
    from bitsmith.serve.scheduler import Finished, Job, Scheduler, Token

    loaded = load_model(make_tiny_model(tmp_path / "m", seed=5))
    scheduler = Scheduler(loaded.model.eval(), loaded.tokenizer, frozenset(), max_batch=4, max_queue=4)
    prompts = ["the cat", "a dog ran far", "small , big", "the"]
    tokens: dict[int, list[int]] = {i: [] for i in range(4)}
    finished: list[str] = []
    all_done = threading.Event()

    def emitter(i: int):
        def emit(event):
            if isinstance(event, Token):
                tokens[i].append(event.token)
            elif isinstance(event, Finished):
                finished.append(event.reason)
                if len(finished) == 4:
                    all_done.set()
        return emit

    for i, p in enumerate(prompts):
        ids = loaded.tokenizer(p)["input_ids"]
        scheduler.submit(Job(ids, SamplingParams(max_tokens=10, temperature=0), emitter(i)))
    scheduler.start()
    assert all_done.wait(timeout=120)
    scheduler.stop()
    assert finished == ["length"] * 4
    # one admission per boundary: steps of 1, 2, 3, then 4 sequences until A (9 steps) ... D (12) finish;
    # every token after each first one comes from a batched step
    assert scheduler.steps == 12 and scheduler.stepped_tokens == 36
    for i, p in enumerate(prompts):
        want = generate(loaded.model, loaded.tokenizer, p, max_new_tokens=10, stop_at_eos=False).token_ids
        assert tuple(tokens[i]) == want
