"""make_server_complete_many (HumanEval over llama-server's /completion) against a fake llama-server in
this process: greedy over a tiny random model, token ids in and out, its own stop strings. The replies
must equal the local make_complete_many's on the same model, in prompt order, whatever order the server
finishes them in."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch

from tests.probe.fake_endpoint import send_json
from tests.tiny import make_tiny_model, sample_text

from bitsmith.eval.humaneval import FENCE_END
from bitsmith.eval.remote import ServerError, ServerStats, check_prompts, make_server_complete_many, server_stops
from bitsmith.eval.tasks import make_complete_many
from bitsmith.runtime.load import load_model


class FakeLlamaServer:
    """llama-server's /completion, as far as the harness uses it. ``early``: the first request of each
    prompt stops after that many tokens claiming a stop word (the harness must continue it); ``fail``:
    every request answers 500; ``drop_first``: the server loses the prompt's first token;
    ``no_tokens``: the answer lacks the token ids."""

    def __init__(self, model: Any, tokenizer: Any, early: int = 0, fail: bool = False, drop_first: bool = False,
                 no_tokens: bool = False) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.early, self.fail, self.drop_first, self.no_tokens = early, fail, drop_first, no_tokens
        self.lock, self.count_lock = threading.Lock(), threading.Lock()
        self.generated = 0
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.seen: set[tuple[int, ...]] = set()

    def greedy(self, ids: list[int], n: int, stop: list[str]) -> tuple[list[int], str]:
        out: list[int] = []
        with self.lock, torch.inference_mode():
            for _ in range(n):
                logits = self.model(input_ids=torch.tensor([ids + out]), use_cache=False).logits[0, -1]
                out.append(int(logits.argmax()))
                if out[-1] == self.tokenizer.eos_token_id:
                    return out, "eos"
                if any(s in self.tokenizer.decode(out, skip_special_tokens=True) for s in stop):
                    return out, "word"
        return out, "limit"

    def answer(self, body: dict) -> tuple[int, dict]:
        if self.fail:
            return 500, {"error": {"code": 500, "message": "slot crashed", "type": "server_error"}}
        ids = body["prompt"][1:] if self.drop_first else body["prompt"]
        n = body["n_predict"]
        first = tuple(ids) not in self.seen and self.early > 0
        self.seen.add(tuple(ids))
        if first:
            n = min(n, self.early)
        tokens, stop_type = self.greedy(ids, n, body["stop"])
        if first and stop_type == "limit":
            stop_type = "word"
        with self.count_lock:
            self.generated += len(tokens)
        time.sleep(0.2 if len(ids) % 2 else 0.02)  # finish out of prompt order
        reply = {"content": "", "tokens": tokens, "stop": True, "stop_type": stop_type, "tokens_evaluated": len(ids),
                 "tokens_predicted": len(tokens), "prompt": self.tokenizer.decode(ids, skip_special_tokens=False),
                 "timings": {"cache_n": 0, "prompt_n": len(ids)}}
        if self.no_tokens:
            del reply["tokens"]
        return 200, reply


@contextmanager
def fake_server(state: FakeLlamaServer) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            state.bodies.append(body)
            with state.count_lock:
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                status, payload = state.answer(body) if self.path == "/completion" else (404, {"error": {"message": "?"}})
            finally:
                with state.count_lock:
                    state.in_flight -= 1
            send_json(self, status, payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(make_tiny_model(tmp_path_factory.mktemp("remote") / "m", seed=3))


def _prompts() -> list[str]:
    return [sample_text(n, seed=s) for s, n in enumerate((3, 8, 1, 12, 5, 9, 4))]


def _stops(local, prompts: list[str]) -> list[str]:
    """Words some greedy replies produce, so some replies really are cut."""
    free = local(prompts, 10, [], None)
    stop = sorted({f.split()[2] for f in free if len(f.split()) > 2})[:2]
    assert stop
    return stop


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("early", [0, 2])
def test_server_replies_equal_local_ones(loaded, chat: bool, early: int) -> None:
    local = make_complete_many(loaded.model, loaded.tokenizer, chat=chat, max_batch=3)
    prompts = _prompts()
    stop = _stops(local, prompts)
    want = local(prompts, 10, stop, None)
    state = FakeLlamaServer(loaded.model, loaded.tokenizer, early=early)
    stats = ServerStats()
    order: list[int] = []
    reported: dict[int, str] = {}
    with fake_server(state) as url:
        many = make_server_complete_many(url, loaded.tokenizer, chat=chat, parallel=3, stats=stats)
        got = many(prompts, 10, stop, lambda i, text: (order.append(i), reported.setdefault(i, text)))
    assert got == want and reported == dict(enumerate(want))
    assert order != sorted(order)  # the server finished out of order; the replies are still in prompt order
    assert 1 < state.max_in_flight <= 3
    from bitsmith.infer.generate import prompt_token_ids

    sent = [b["prompt"] for b in state.bodies if b["prompt"] in [prompt_token_ids(loaded.tokenizer, p, chat) for p in prompts]]
    assert len(sent) == len(prompts)  # every prompt went as bitsmith's own token ids
    assert all(b["top_k"] == 1 and b["temperature"] == 0 and b["repeat_penalty"] == 1 and b["return_tokens"] for b in state.bodies)
    assert stats.requests == len(state.bodies) and stats.continued == (stats.requests - len(prompts))
    assert (stats.continued > 0) == (early > 0)
    assert stats.generated_tokens == state.generated > 0
    assert stats.prompt_tokens == sum(len(b["prompt"]) for b in state.bodies)


def test_fence_stop_is_sent_so_the_server_cannot_stop_at_an_opening_fence() -> None:
    assert server_stops([FENCE_END]) == [FENCE_END + "\n"]
    assert server_stops(["\ndef ", "", "\n#"]) == ["\ndef ", "\n#"]


def test_server_errors_are_clear(loaded) -> None:
    prompts = _prompts()[:3]
    with fake_server(FakeLlamaServer(loaded.model, loaded.tokenizer, fail=True)) as url:
        many = make_server_complete_many(url, loaded.tokenizer, chat=False)
        with pytest.raises(ServerError, match="answered 500: 'slot crashed'"):
            many(prompts, 5, [], None)
    with fake_server(FakeLlamaServer(loaded.model, loaded.tokenizer, no_tokens=True)) as url:
        with pytest.raises(ServerError, match="return_tokens"):
            make_server_complete_many(url, loaded.tokenizer, chat=False)(prompts, 5, [], None)
    with pytest.raises(ServerError, match="cannot reach .* is llama-server running"):
        make_server_complete_many(url, loaded.tokenizer, chat=False)(prompts, 5, [], None)  # that server is gone
    with pytest.raises(ValueError, match="parallel"):
        make_server_complete_many(url, loaded.tokenizer, chat=False, parallel=0)


@pytest.mark.parametrize("drop_first", [False, True])
def test_check_prompts_sees_what_the_server_received(loaded, drop_first: bool) -> None:
    prompts = [p for p in _prompts() if len(p.split()) > 1][:3]
    with fake_server(FakeLlamaServer(loaded.model, loaded.tokenizer, drop_first=drop_first)) as url:
        checks = check_prompts(url, loaded.tokenizer, prompts, chat=True)
    assert len(checks) == 3
    assert all(c.ok for c in checks) != drop_first
    assert all((c.server_tokens == c.sent_tokens - 1) == drop_first for c in checks)
