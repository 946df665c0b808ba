"""Response bodies of the OpenAI-compatible API, built from the scheduler's events: completions
(legacy, with ``echo`` and the ``tokens / token_logprobs / top_logprobs / text_offset`` logprobs) and
chat completions (``logprobs.content`` entries), whole or as server-sent-event chunks."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from bitsmith.serve.sampling import TokenLogprob

__all__ = ["Collected", "TokenText", "chat_body", "chat_chunk", "chat_logprobs", "completion_body",
           "completion_chunk", "completion_logprobs", "sse", "usage"]


class TokenText:
    """Token id -> its text as a single token (what OpenAI's logprobs show), cached per id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self._cache.get(token)
        if text is None:
            text = self._cache[token] = self.tokenizer.decode([token])
        return text


@dataclass
class Collected:
    """Everything a non-streamed response needs, gathered from the events."""

    text: str = ""
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: Any) -> str:
    """One server-sent event carrying a JSON payload (or the literal ``[DONE]``)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def completion_logprobs(entries: list[TokenLogprob | None], tokens: list[int], text: TokenText,
                        offset: int = 0) -> dict[str, Any]:
    """The legacy completions logprobs object for ``tokens``; an entry of None (the prompt's first
    token) has a null logprob and null alternatives. ``text_offset`` counts characters from ``offset``."""
    strings = [text(t) for t in tokens]
    offsets = []
    for s in strings:
        offsets.append(offset)
        offset += len(s)
    return {
        "tokens": strings,
        "token_logprobs": [None if e is None else e.logprob for e in entries],
        "top_logprobs": [None if e is None else {text(t): lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def completion_body(model: str, c: Collected, text: TokenText, echo_text: str | None,
                    prompt_ids: list[int], want_logprobs: bool) -> dict[str, Any]:
    logprobs = None
    if want_logprobs:
        entries = list(c.prompt_logprobs) + list(c.logprobs)
        tokens = (prompt_ids if c.prompt_logprobs else []) + [e.token for e in c.logprobs]
        start = 0 if c.prompt_logprobs else len(echo_text or "")
        logprobs = completion_logprobs(entries, tokens, text, start)
    return {
        "id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"text": (echo_text or "") + c.text, "index": 0, "logprobs": logprobs,
                     "finish_reason": c.finish_reason}],
        "usage": usage(c.prompt_tokens, c.completion_tokens),
    }


def completion_chunk(cid: str, model: str, piece: str, logprobs: dict[str, Any] | None,
                     finish_reason: str | None) -> dict[str, Any]:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"text": piece, "index": 0, "logprobs": logprobs, "finish_reason": finish_reason}]}


def _bytes(s: str) -> list[int]:
    return list(s.encode("utf-8"))


def chat_logprobs(entries: list[TokenLogprob], text: TokenText) -> dict[str, Any]:
    """The chat API's ``logprobs`` object: ``content``, one entry per generated token."""
    content = []
    for e in entries:
        s = text(e.token)
        content.append({"token": s, "logprob": e.logprob, "bytes": _bytes(s),
                        "top_logprobs": [{"token": text(t), "logprob": lp, "bytes": _bytes(text(t))} for t, lp in e.top]})
    return {"content": content}


def chat_body(model: str, c: Collected, text: TokenText, want_logprobs: bool) -> dict[str, Any]:
    return {
        "id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                     "logprobs": chat_logprobs(c.logprobs, text) if want_logprobs else None,
                     "finish_reason": c.finish_reason}],
        "usage": usage(c.prompt_tokens, c.completion_tokens),
    }


def chat_chunk(cid: str, model: str, delta: dict[str, Any], logprobs: dict[str, Any] | None,
               finish_reason: str | None) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
