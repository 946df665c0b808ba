"""A tiny OpenAI-compatible completions server over a tiny random model, started in-process on an
ephemeral port (the standard library's threading HTTP server), for testing ``bitsmith probe`` without
anyone's real server. Two dialects:

- ``openai``: ``/v1/completions`` honours ``echo`` with prompt log-probabilities in the legacy shape
  (``tokens`` / ``top_logprobs`` as ``{token: logprob}`` maps, no ids); no ``/props``;
- ``llama``: like llama.cpp's ``llama-server``: ``echo`` answered with a 400 error, ``/props`` present,
  log-probabilities of the generated token in the ``content`` shape with token ids;
- ``text``: as ``openai`` but refusing token-id prompts with a 422 (a server typed ``prompt: str``).

``rename`` rewrites every token string (a different tokenizer behind the endpoint); ``api_key`` makes
it answer 401 without ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch


class _State:
    def __init__(self, model: Any, tokenizer: Any, dialect: str, rename: Callable[[str], str] | None,
                 api_key: str | None) -> None:
        self.model, self.tokenizer, self.dialect, self.api_key = model.eval(), tokenizer, dialect, api_key
        self.rename = rename or (lambda s: s)
        self.lock = threading.Lock()
        self.requests = 0

    def piece(self, ident: int) -> str:
        return self.rename(self.tokenizer.decode([ident], skip_special_tokens=False, clean_up_tokenization_spaces=False))

    def logp(self, ids: list[int]) -> torch.Tensor:
        with self.lock, torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        return torch.log_softmax(logits.double(), -1)  # [T, V]: row t predicts token t + 1

    def top(self, row: torch.Tensor, k: int) -> list[tuple[int, str, float]]:
        values, ids = row.topk(k)
        return [(int(i), self.piece(int(i)), float(v)) for v, i in zip(values, ids)]

    def complete(self, body: dict) -> tuple[int, dict]:
        prompt, k = body.get("prompt"), int(body.get("logprobs") or 0)
        if self.dialect == "text":
            if not isinstance(prompt, str):
                return 422, {"detail": [{"loc": ["body", "prompt"], "msg": "Input should be a valid string"}]}
            prompt = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt) or not prompt:
            return 400, {"error": {"message": "this fake takes token-id prompts only"}}
        logp = self.logp(prompt)
        if body.get("echo"):
            if self.dialect == "llama":
                return 400, {"error": {"code": 400, "message": "Only no echo is supported", "type": "invalid_request_error"}}
            tops = [None] + [{s: lp for _, s, lp in self.top(logp[t - 1], k)} for t in range(1, len(prompt))]
            return 200, {"choices": [{"text": "", "index": 0, "logprobs": {
                "tokens": [self.piece(t) for t in prompt], "token_logprobs": [None] * len(prompt), "top_logprobs": tops}}]}
        top = self.top(logp[-1], k)
        if self.dialect == "llama":
            content = [{"id": top[0][0], "token": top[0][1], "logprob": top[0][2],
                        "top_logprobs": [{"id": i, "token": s, "logprob": lp} for i, s, lp in top]}]
            return 200, {"choices": [{"text": top[0][1], "index": 0, "logprobs": {"content": content}}]}
        return 200, {"choices": [{"text": top[0][1], "index": 0, "logprobs": {
            "tokens": [top[0][1]], "token_logprobs": [top[0][2]], "top_logprobs": [{s: lp for _, s, lp in top}]}}]}


def send_json(handler: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
    """Answer a request with ``payload`` as JSON (the fake servers' one reply shape)."""
    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _handler(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, status: int, payload: dict) -> None:
            send_json(self, status, payload)

        def _authorised(self) -> bool:
            if state.api_key and self.headers.get("Authorization") != f"Bearer {state.api_key}":
                self._send(401, {"error": {"message": "invalid api key"}})
                return False
            return True

        def do_GET(self) -> None:  # noqa: N802
            if not self._authorised():
                return
            if self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})
            elif self.path == "/props" and state.dialect == "llama":
                self._send(200, {"default_generation_settings": {}})
            else:
                self._send(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:  # noqa: N802
            if not self._authorised():
                return
            state.requests += 1
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path != "/v1/completions":
                self._send(404, {"error": {"message": "not found"}})
                return
            self._send(*state.complete(body))

    return Handler


@contextmanager
def serve(model: Any, tokenizer: Any, dialect: str = "openai", rename: Callable[[str], str] | None = None,
          api_key: str | None = None) -> Iterator[tuple[str, _State]]:
    """(base URL, server state) of a running fake endpoint; stopped on exit."""
    state = _State(model, tokenizer, dialect, rename, api_key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
