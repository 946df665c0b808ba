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


def event_sink(jobs: int):
    """Per-job event lists, an Event set once all ``jobs`` have finished, and ``emitter(i)``: the callback
    that files job i's scheduler events."""
    from bitsmith.serve.scheduler import Finished

    events: dict[int, list] = {i: [] for i in range(jobs)}
    done = threading.Event()

    def emitter(i: int):
        def emit(event):
            events[i].append(event)
            if sum(isinstance(e, Finished) for ev in events.values() for e in ev) == jobs:
                done.set()
        return emit

    return events, done, emitter


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
    """Jobs queued before the thread starts are prefilled together in one forward (their prompts fit one
    prefill chunk) and then decode together; each greedy continuation equals ``generate`` alone."""
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
    # one step prefills all four prompts and samples their first tokens; the other 9 tokens of each come
    # from 9 decode steps of all four sequences
    assert scheduler.prefill_steps == 1
    assert scheduler.steps == 9 and scheduler.stepped_tokens == 36
    for i, p in enumerate(prompts):
        want = generate(loaded.model, loaded.tokenizer, p, max_new_tokens=10, stop_at_eos=False).token_ids
        assert tuple(tokens[i]) == want


def test_chunked_prefill_interleaves_with_decoding_and_matches_generate(tmp_path) -> None:
    """A prompt longer than the prefill chunk is fed over several steps while another sequence keeps
    decoding in the same forwards; echo logprobs are gathered across the chunks; a cancelled prefill is
    dropped. Every greedy continuation equals ``generate`` alone and the echo equals the model's."""
    from bitsmith.infer.generate import generate
    from bitsmith.runtime.load import load_model
    from bitsmith.serve.scheduler import Job, Prompt, Scheduler, Token

    loaded = load_model(make_tiny_model(tmp_path / "m", seed=6))
    model, tok = loaded.model.eval(), loaded.tokenizer
    scheduler = Scheduler(model, tok, frozenset(), max_batch=4, max_queue=4, prefill_chunk=5)
    texts = ["the", "the cat sat on the mat , a dog ran far and the big cat sat", "a dog ran far and small"]
    events, done, emitter = event_sink(4)

    params = [SamplingParams(max_tokens=12, temperature=0), SamplingParams(max_tokens=6, temperature=0, logprobs=2,
              echo_logprobs=True), SamplingParams(max_tokens=6, temperature=0)]
    for i, text in enumerate(texts):
        scheduler.submit(Job(tok(text)["input_ids"], params[i], emitter(i)))
    doomed = Job(tok(texts[1])["input_ids"], params[2], emitter(3))
    doomed.cancel()
    scheduler.submit(doomed)
    scheduler.start()
    assert done.wait(timeout=120)
    scheduler.stop()
    assert scheduler.prefill_steps >= 4  # 1 + 15 + 7 prompt tokens at 5 per step
    assert [e.reason for e in events[3]] == ["cancelled"]
    for i, text in enumerate(texts):
        want = generate(model, tok, text, max_new_tokens=params[i].max_tokens, stop_at_eos=False).token_ids
        assert tuple(e.token for e in events[i] if isinstance(e, Token)) == want
        assert events[i][-1].reason == "length"
    ids = tok(texts[1])["input_ids"]
    (echo,) = [e for e in events[1] if isinstance(e, Prompt)]
    assert echo.logprobs[0] is None and len(echo.logprobs) == len(ids)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    for j in range(1, len(ids)):
        assert abs(echo.logprobs[j].logprob - float(ref[j - 1, ids[j]])) < 1e-3


@pytest.mark.parametrize("draft_seed", [6, 9])
def test_speculative_serving_equals_generate(tmp_path, draft_seed: int) -> None:
    """With a draft, a lone sequence decodes speculatively; while two are active they decode batched and the
    draft catches up afterwards. Greedy tokens equal ``generate`` alone either way: with the model as its
    own draft (every proposal kept, bonus tokens) and with an unrelated draft of the same vocabulary
    (rejections, cache rollbacks)."""
    from bitsmith.infer.generate import generate
    from bitsmith.runtime.load import load_model
    from bitsmith.serve.scheduler import Job, Scheduler, Token

    loaded = load_model(make_tiny_model(tmp_path / "m", seed=6))
    model, tok = loaded.model.eval(), loaded.tokenizer
    draft = model if draft_seed == 6 else load_model(make_tiny_model(tmp_path / "d", seed=draft_seed)).model.eval()
    scheduler = Scheduler(model, tok, frozenset(), max_batch=4, max_queue=4, draft=draft, draft_k=3)
    texts, lengths = ["the cat sat", "a dog"], [30, 5]
    events, done, emitter = event_sink(2)

    for i, text in enumerate(texts):
        scheduler.submit(Job(tok(text)["input_ids"], SamplingParams(max_tokens=lengths[i], temperature=0), emitter(i)))
    scheduler.start()
    assert done.wait(timeout=120)
    scheduler.stop()
    assert scheduler.steps >= 4 and scheduler.spec_rounds > 0  # both kinds of step ran
    accepted = scheduler.spec_accepted / scheduler.spec_proposed
    assert accepted == 1.0 if draft_seed == 6 else accepted < 1.0
    for i, text in enumerate(texts):
        want = generate(model, tok, text, max_new_tokens=lengths[i], stop_at_eos=False).token_ids
        assert tuple(e.token for e in events[i] if isinstance(e, Token)) == want
        assert events[i][-1].reason == "length" and events[i][-1].completion_tokens == lengths[i]


def test_a_draft_of_another_vocabulary_is_refused(tmp_path) -> None:
    from bitsmith.runtime.load import load_model
    from bitsmith.serve.scheduler import Scheduler

    loaded = load_model(make_tiny_model(tmp_path / "m", seed=6))
    other = load_model(make_tiny_model(tmp_path / "d", seed=1, vocab_size=77)).model
    with pytest.raises(ValueError, match="vocabulary"):
        Scheduler(loaded.model, loaded.tokenizer, frozenset(), draft=other)
    with pytest.raises(ValueError, match="1 to 7"):
        Scheduler(loaded.model, loaded.tokenizer, frozenset(), draft=loaded.model, draft_k=9)
