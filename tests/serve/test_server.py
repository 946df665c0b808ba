"""bitsmith serve over real HTTP on localhost (ephemeral port), driven by the official ``openai``
client, unmodified, and by raw httpx for what a client library would refuse to send."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch

from tests.tiny import make_tiny_model

from bitsmith.infer.generate import generate
from bitsmith.runtime.load import load_model
from bitsmith.serve.server import BackgroundServer, ServeSettings, build_engine

PROMPTS = ["the cat sat on", "a dog ran far and", "small", "the big mat , the cat and the dog sat on a"]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(make_tiny_model(tmp_path_factory.mktemp("serve") / "m", seed=2))


@pytest.fixture(scope="module")
def engine(loaded):
    return build_engine(loaded.model, loaded.tokenizer, ServeSettings("tiny", max_batch=4, max_queue=8))


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(loaded, prompt: str, max_tokens: int) -> str:
    return generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=max_tokens).text


def teacher_forced_logprobs(loaded, ids: list[int]) -> torch.Tensor:
    """The Hugging Face forward's log-probabilities [T, V] (row t predicts token t + 1)."""
    with torch.no_grad():
        return torch.log_softmax(loaded.model(torch.tensor([ids])).logits[0].float(), -1)


def test_models_and_health(client, server) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 4


def test_completion_greedy_equals_generate(client, loaded) -> None:
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert r.choices[0].text == reference(loaded, PROMPTS[0], 10)
    assert r.usage.completion_tokens == 10 and r.choices[0].finish_reason == "length"


def test_chat_uses_the_template(client, loaded) -> None:
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the dog"}],
                                       max_tokens=6, temperature=0)
    want = generate(loaded.model, loaded.tokenizer, "the dog", max_new_tokens=6, chat=True).text
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"


def test_streaming_concatenates_to_the_whole_answer(client) -> None:
    whole = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0)
    pieces = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0, stream=True)]
    assert len(pieces) > 2 and "".join(pieces) == whole.choices[0].text
    chat = dict(model="tiny", messages=[{"role": "user", "content": "a cat"}], max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**chat).choices[0].message.content
    chunks = list(client.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 8


def test_completion_logprobs_match_the_model(client, loaded) -> None:
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    ids = loaded.tokenizer(PROMPTS[0])["input_ids"]
    gen = [loaded.tokenizer.convert_tokens_to_ids(t) for t in lp.tokens]
    ref = teacher_forced_logprobs(loaded, ids + gen)
    for k, (tok, got, top) in enumerate(zip(gen, lp.token_logprobs, lp.top_logprobs)):
        row = ref[len(ids) - 1 + k]
        assert got == pytest.approx(float(row[tok]), abs=2e-3)
        want = row.topk(3)
        assert list(top) == [loaded.tokenizer.decode([i]) for i in want.indices.tolist()]
        assert list(top.values()) == pytest.approx(want.values.tolist(), abs=2e-3)


def test_echo_returns_prompt_logprobs_with_alternatives(client, loaded) -> None:
    """What `bitsmith probe` asks: echo=True, logprobs=K, max_tokens=0 -> teacher-forced prompt logprobs."""
    prompt = PROMPTS[3]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=4)
    c = r.choices[0]
    ids = loaded.tokenizer(prompt)["input_ids"]
    ref = teacher_forced_logprobs(loaded, ids)
    assert c.text == prompt and r.usage.completion_tokens == 0
    assert c.logprobs.tokens == [loaded.tokenizer.decode([i]) for i in ids]
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    for t in range(1, len(ids)):
        assert c.logprobs.token_logprobs[t] == pytest.approx(float(ref[t - 1, ids[t]]), abs=2e-3)
        top = c.logprobs.top_logprobs[t]
        assert len(top) == 4
        assert list(top.values()) == pytest.approx(ref[t - 1].topk(4).values.tolist(), abs=2e-3)
    streamed = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=4,
                                              stream=True))
    assert streamed[0].choices[0].logprobs.token_logprobs == c.logprobs.token_logprobs


def test_seed_reproduces_sampling_and_stop_cuts_the_text(client, loaded) -> None:
    args = dict(model="tiny", prompt=PROMPTS[2], max_tokens=12, temperature=1.0, top_p=0.9, seed=11)
    texts = {client.completions.create(**args).choices[0].text for _ in range(2)}
    assert len(texts) == 1
    full = reference(loaded, PROMPTS[1], 12)
    stop = full.split()[3]
    r = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full[: full.index(stop)]


def test_concurrent_requests_each_equal_generate(client, loaded, server) -> None:
    steps = httpx.get(server.url + "/health").json()["decode_steps"]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        results[i] = client.completions.create(model="tiny", prompt=PROMPTS[i % 4], max_tokens=16,
                                               temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        assert results[i] == reference(loaded, PROMPTS[i % 4], 16)
    assert httpx.get(server.url + "/health").json()["decode_steps"] > steps


MALFORMED = [
    (b"{not json", "/v1/completions"),
    (b"", "/v1/completions"),
    (b"[1, 2]", "/v1/completions"),
    (json.dumps({"model": "tiny"}), "/v1/completions"),
    (json.dumps({"model": "tiny", "prompt": 5}), "/v1/completions"),
    (json.dumps({"model": "tiny", "prompt": "a", "max_tokens": "ten"}), "/v1/completions"),
    (json.dumps({"model": "tiny", "prompt": "a", "max_tokens": -1}), "/v1/completions"),
    (json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 10**12}), "/v1/completions"),
    (json.dumps({"model": "tiny", "prompt": "a", "temperature": -1}), "/v1/completions"),
    (json.dumps({"model": "tiny", "prompt": "a", "top_p": 0}), "/v1/completions"),
    (json.dumps({"model": "tiny", "prompt": "a", "logprobs": 1000}), "/v1/completions"),
    (json.dumps({"model": "tiny", "prompt": "a", "n": 3}), "/v1/completions"),
    (json.dumps({"model": "tiny", "prompt": [10**9]}), "/v1/completions"),
    (json.dumps({"model": "tiny", "prompt": ""}), "/v1/completions"),
    (json.dumps({"model": "tiny", "prompt": "the " * 400}), "/v1/completions"),
    (json.dumps({"model": "nope", "prompt": "a"}), "/v1/completions"),
    (json.dumps({"model": "tiny", "messages": []}), "/v1/chat/completions"),
    (json.dumps({"model": "tiny", "messages": [{"role": "wizard", "content": "a"}]}), "/v1/chat/completions"),
    (json.dumps({"model": "tiny", "messages": "hello"}), "/v1/chat/completions"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}), "/v1/chat/completions"),
]


def test_malformed_requests_get_json_errors_and_the_server_stays_up(server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for body, path in MALFORMED:
            r = http.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code in (400, 404), (body, r.status_code, r.text)
            err = r.json()["error"]
            assert err["message"] and "Traceback" not in err["message"], body
        assert http.get("/v1/nothing").json()["error"]["code"] == "not_found"
        assert http.get("/v1/completions").status_code == 405
        assert http.get("/health").json()["status"] == "ok"
        ok = http.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


def test_client_disconnect_cancels_the_request(server, engine, monkeypatch) -> None:
    monkeypatch.setattr(engine.scheduler, "eos_ids", frozenset())  # no early EOS: only the disconnect ends it
    before = httpx.get(server.url + "/health").json()["cancelled"]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        body = {"model": "tiny", "prompt": "the", "max_tokens": 250, "stream": True, "temperature": 1.0,
                "stop": ["never-produced"]}
        with http.stream("POST", "/v1/completions", json=body) as r:
            next(r.iter_lines())
    deadline = time.monotonic() + 20
    while httpx.get(server.url + "/health").json()["cancelled"] == before:
        assert time.monotonic() < deadline, "the abandoned request was never cancelled"
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json()["active"] == 0


def test_full_queue_answers_429(loaded, monkeypatch) -> None:
    engine = build_engine(loaded.model, loaded.tokenizer, ServeSettings("tiny", max_batch=1, max_queue=2))
    scheduler = engine.scheduler
    monkeypatch.setattr(scheduler, "start", lambda: None)  # hold the queue: nothing is admitted yet
    with BackgroundServer(engine) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        body = {"model": "tiny", "prompt": "a cat", "max_tokens": 3}
        codes: list[int] = []
        waiting = [threading.Thread(target=lambda: codes.append(http.post("/v1/completions", json=body).status_code))
                   for _ in range(2)]
        for t in waiting:
            t.start()
        while http.get("/health").json()["waiting"] < 2:
            time.sleep(0.02)
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        type(scheduler).start(scheduler)  # now serve the queued ones
        for t in waiting:
            t.join(60)
        assert codes == [200, 200]


def test_api_key_is_enforced(loaded) -> None:
    from openai import AuthenticationError, OpenAI

    engine = build_engine(loaded.model, loaded.tokenizer, ServeSettings("tiny", api_key="sekrit"))
    with BackgroundServer(engine) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        r = httpx.post(srv.url + "/v1/completions", content=b"{bad json")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        wrong = OpenAI(base_url=srv.url + "/v1", api_key="guess", max_retries=0)
        with pytest.raises(AuthenticationError):
            wrong.models.list()
        right = OpenAI(base_url=srv.url + "/v1", api_key="sekrit", max_retries=0)
        assert right.completions.create(model="tiny", prompt="a", max_tokens=2).usage.completion_tokens <= 2
