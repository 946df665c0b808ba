"""The HTTP side of ``bitsmith probe``: ask an OpenAI-compatible server for top-k log-probabilities at
chosen positions of a token sequence.

Two ways, tried in this order:

- **echo** (teacher-forced, one request per window): ``POST /v1/completions`` with the window's token ids
  as the prompt, ``echo=true``, ``logprobs=k``, ``max_tokens=0`` (OpenAI's legacy completions, vLLM,
  ``bitsmith serve``). Every prompt position comes back with its top k;
- **stepwise** (teacher-forced, one request per position): the window's first ``t`` ids as the prompt,
  ``max_tokens=1``, ``logprobs=k``, ``temperature=0``; the top k of the one generated token is the
  endpoint's distribution after those ``t`` tokens. llama.cpp's ``llama-server`` refuses ``echo`` ("Only
  no echo is supported") but returns pre-sampling top-k with token ids here, and, asked with
  ``cache_prompt`` (sent only when ``/props`` says it is llama.cpp), re-uses its KV cache for the shared
  prefix so each request costs about one token.

Three response shapes are understood: the legacy completions object (``tokens``, ``top_logprobs`` as
``{token: logprob}`` maps), the chat-style ``content`` list (``token``, ``logprob``, ``top_logprobs``
lists, with ``id`` on llama.cpp), and both with or without ids. Parsing is pure (:func:`parse_logprobs`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

__all__ = ["Endpoint", "EndpointError", "TopK", "parse_logprobs"]

log = logging.getLogger(__name__)


class EndpointError(ValueError):
    """The endpoint cannot be reached, refuses the request, or answers without log-probabilities."""


@dataclass(frozen=True)
class TopK:
    """One position as the endpoint reported it: token strings, their log-probabilities and, where the
    server gives them, their token ids (else ``None``)."""

    tokens: tuple[str, ...]
    logprobs: tuple[float, ...]
    ids: tuple[int | None, ...]


def _entry_list(top: Any) -> TopK | None:
    """A position's top k from ``{token: logprob}`` or ``[{"token", "logprob", "id"?}, ...]``; None if absent."""
    if top is None:
        return None
    if isinstance(top, dict):
        items = [(str(t), float(lp), None) for t, lp in top.items()]
    elif isinstance(top, list):
        items = []
        for e in top:
            if not isinstance(e, dict) or "logprob" not in e:
                raise EndpointError(f"a top_logprobs entry is not {{token, logprob}}: {str(e)[:120]}")
            ident = e.get("id")
            items.append((str(e.get("token", "")), float(e["logprob"]), int(ident) if isinstance(ident, int) else None))
    else:
        raise EndpointError(f"top_logprobs is neither a map nor a list: {str(top)[:120]}")
    items = [it for it in items if math.isfinite(it[1])]  # -inf: a token the server's sampler removed
    items.sort(key=lambda it: -it[1])
    return TopK(tuple(t for t, _, _ in items), tuple(lp for _, lp, _ in items), tuple(i for _, _, i in items))


def parse_logprobs(choice: dict[str, Any]) -> list[TopK | None]:
    """Per-token top k of one completion choice (None where the server gives none, such as an echoed first
    token), in token order."""
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        raise EndpointError("the endpoint returned no log-probabilities (choices[0].logprobs is missing); probe needs "
                            "a server that answers logprobs=K on /v1/completions")
    if isinstance(lp.get("content"), list):  # chat-style shape (llama.cpp uses it for completions too)
        return [_entry_list(tok.get("top_logprobs")) for tok in lp["content"]]
    if isinstance(lp.get("top_logprobs"), list):  # legacy completions shape
        return [_entry_list(top) for top in lp["top_logprobs"]]
    raise EndpointError(f"unrecognised logprobs object with keys {sorted(lp)}; expected 'content' or 'top_logprobs'")


class Endpoint:
    """One OpenAI-compatible server at ``url`` (``http://host:port`` or ``.../v1``)."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, timeout: float = 120.0,
                 detokenize: Callable[[list[int]], str] | None = None) -> None:
        import httpx

        base = url.rstrip("/")
        if base.endswith("/v1"):
            base = base[: -len("/v1")]
        if not base.startswith(("http://", "https://")):
            raise EndpointError(f"{url!r} is not an http(s) URL; give the server's address, e.g. http://127.0.0.1:8080")
        self.base = base
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=base, headers=headers, timeout=timeout)
        self.model = model
        self.llama_cpp = False
        self.requests = 0
        self.detokenize = detokenize  # for servers that refuse token-id prompts
        self.text_prompts = False  # set once such a server refused ids and took the decoded text
        self.ids_ok = False  # an id prompt has been answered: refusals after that are not about ids

    def close(self) -> None:
        self.client.close()

    def _call(self, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
        import httpx

        try:
            r = self.client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise EndpointError(f"cannot reach {self.base}{path}: {exc or type(exc).__name__}; is the server running "
                                "at that address?") from None
        self.requests += 1
        if r.status_code in (401, 403):
            raise EndpointError(f"{self.base} refused the request ({r.status_code}): it needs an API key; pass --api-key")
        try:
            data = r.json()
        except ValueError:
            data = None
        return r.status_code, data

    def connect(self) -> str:
        """Check the server answers, learn its model name (unless given) and whether it is llama.cpp."""
        status, data = self._call("GET", "/v1/models")
        if status != 200 or not isinstance(data, dict):
            raise EndpointError(f"{self.base}/v1/models answered {status}; is this an OpenAI-compatible server?")
        names = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]
        if self.model is None:
            if not names:
                raise EndpointError(f"{self.base} lists no models; name one with --model")
            self.model = str(names[0])
        status, props = self._call("GET", "/props")
        self.llama_cpp = status == 200 and isinstance(props, dict) and "default_generation_settings" in props
        return self.model

    def _complete(self, prompt: list[int], k: int, echo: bool) -> tuple[int, Any]:
        """One completions request with ``prompt`` as token ids, or as its decoded text for a server that
        refused ids (422/400 on the first request; its own tokenizer then re-encodes the text, the same ids
        when it is the reference's tokenizer, except where a text boundary re-merges)."""
        body: dict[str, Any] = {"model": self.model, "logprobs": k, "temperature": 0.0, "max_tokens": 0 if echo else 1}
        if echo:
            body["echo"] = True
        if self.llama_cpp:
            body["cache_prompt"] = True  # reuse the KV cache of the shared prefix (llama.cpp only)
        if not self.text_prompts:
            status, data = self._call("POST", "/v1/completions", {**body, "prompt": prompt})
            self.ids_ok = self.ids_ok or status == 200
            if status not in (400, 422) or self.ids_ok or self.detokenize is None:
                return status, data
            retry = self._call("POST", "/v1/completions", {**body, "prompt": self.detokenize(prompt)})
            if retry[0] != 200:
                return status, data
            log.info("the server refused token-id prompts (%s); sending text", status)
            self.text_prompts = True
            return retry
        return self._call("POST", "/v1/completions", {**body, "prompt": self.detokenize(prompt)})

    def echo_positions(self, ids: list[int], k: int) -> list[TopK | None] | None:
        """Top k at every position of ``ids`` from one echo request, or None when the server does not echo
        prompt log-probabilities."""
        status, data = self._complete(ids, k, echo=True)
        if status != 200 or not isinstance(data, dict) or not data.get("choices"):
            log.info("echo refused (%s): %s", status, str(data)[:200])
            return None
        rows = parse_logprobs(data["choices"][0]) if data["choices"][0].get("logprobs") else []
        if self.text_prompts and len(rows) != len(ids):
            log.info("the server tokenized the text into %d tokens, not %d: positions cannot be aligned", len(rows), len(ids))
            return None
        if len(rows) < len(ids) or all(r is None for r in rows[1 : len(ids)]):
            log.info("echo answered without prompt log-probabilities (%d rows for %d tokens)", len(rows), len(ids))
            return None
        return rows[: len(ids)]

    def next_token(self, prefix: list[int], k: int) -> TopK:
        """The endpoint's top k after ``prefix``."""
        status, data = self._complete(prefix, k, echo=False)
        if status != 200 or not isinstance(data, dict) or not data.get("choices"):
            detail = data.get("error", data) if isinstance(data, dict) else data
            raise EndpointError(f"{self.base}/v1/completions answered {status}: {str(detail)[:200]}")
        rows = parse_logprobs(data["choices"][0])
        if not rows or rows[0] is None or not rows[0].tokens:
            raise EndpointError("the endpoint generated a token but returned no top log-probabilities for it; probe "
                                "needs logprobs=K on /v1/completions")
        return rows[0]
