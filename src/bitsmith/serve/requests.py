"""From a validated request body to a scheduler job: the served model's :class:`Engine`, the checks
that refuse a request before any model work (unknown model, empty or out-of-vocabulary prompt, prompt
plus ``max_tokens`` beyond the context, no chat template), tokenization and sampling parameters.
The HTTP layer (serve/app.py) maps :class:`ApiError` to its status and JSON body."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bitsmith.serve.responses import TokenText
from bitsmith.serve.sampling import SamplingParams
from bitsmith.serve.scheduler import Job, Scheduler
from bitsmith.serve.schemas import ChatRequest, CompletionRequest

__all__ = ["ApiError", "Engine", "Prepared", "chat_job", "completion_job"]

FALLBACK_CONTEXT = 32768  # positions allowed when the model's config names no context length


class ApiError(Exception):
    """A request the server refuses: HTTP status, message (what is wrong and how to fix it), OpenAI type."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


@dataclass
class Engine:
    """What the handlers share: the scheduler, the tokenizer, the served name and limits."""

    scheduler: Scheduler
    tokenizer: Any
    model_id: str
    context: int  # positions one request may use (prompt + max_tokens)
    vocab: int
    max_tokens_default: int = 256  # new tokens when a request sets no max_tokens (bounded by the context)
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    token_text: TokenText = field(init=False)

    def __post_init__(self) -> None:
        self.token_text = TokenText(self.tokenizer)


@dataclass(frozen=True)
class Prepared:
    """A checked request: its prompt ids, the text ``echo`` repeats, and a job factory taking ``emit``."""

    prompt_ids: list[int]
    echo_text: str | None
    job_of: Callable[[Callable[[Any], None]], Job]


def _check_model(engine: Engine, name: str) -> None:
    if name != engine.model_id:
        raise ApiError(404, f"model {name!r} is not served here; this server serves {engine.model_id!r} "
                            "(see /v1/models)", param="model", code="model_not_found")


def _budget(engine: Engine, prompt_tokens: int, asked: int | None) -> int:
    """The request's new-token budget; refuses a prompt + max_tokens beyond the context."""
    if prompt_tokens == 0:
        raise ApiError(400, "the prompt encodes to no tokens; send a non-empty prompt", param="prompt")
    room = engine.context - prompt_tokens
    if asked is None:
        if room < 1:
            raise ApiError(400, f"the prompt ({prompt_tokens:,} tokens) fills the model's context of "
                                f"{engine.context:,} tokens; shorten it", param="prompt", code="context_length_exceeded")
        return min(room, engine.max_tokens_default)
    if asked > room:
        fix = (f"at most {room:,} new tokens fit after this prompt: lower max_tokens or shorten the prompt"
               if room > 0 else "the prompt alone fills it: shorten the prompt")
        raise ApiError(400, f"the prompt ({prompt_tokens:,} tokens) plus max_tokens ({asked:,}) needs "
                            f"{prompt_tokens + asked:,} positions but the model's context is {engine.context:,} "
                            f"tokens; {fix}", param="max_tokens", code="context_length_exceeded")
    return asked


def _prepared(engine: Engine, ids: list[int], echo: str | None, params: SamplingParams) -> Prepared:
    def job_of(emit: Callable[[Any], None]) -> Job:
        return Job(ids, params, emit)

    return Prepared(ids, echo, job_of)


def completion_job(engine: Engine, body: CompletionRequest) -> Prepared:
    _check_model(engine, body.model)
    prompt = body.prompt[0] if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str) else body.prompt
    if isinstance(prompt, str):
        ids = [int(i) for i in engine.tokenizer(prompt)["input_ids"]]
        echo = prompt
    else:
        bad = [i for i in prompt if not 0 <= i < engine.vocab]
        if bad:
            raise ApiError(400, f"prompt token ids must be in [0, {engine.vocab}); got {bad[:3]}", param="prompt")
        ids = list(prompt)
        echo = engine.tokenizer.decode(ids)
    budget = _budget(engine, len(ids), body.max_tokens)
    params = SamplingParams(max_tokens=budget, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                            stop=body.stop_strings(), logprobs=body.logprobs,
                            echo_logprobs=body.echo and body.logprobs is not None)
    return _prepared(engine, ids, echo if body.echo else None, params)


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The chat template applied to ``messages`` with the assistant's turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template (no chat_template in its tokenizer files), so "
                            "/v1/chat/completions cannot format messages; use /v1/completions with a plain "
                            "prompt, or serve an instruct model that ships a template", code="no_chat_template")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as exc:  # the template itself refuses (e.g. roles that must alternate)
        raise ApiError(400, f"the model's chat template rejected these messages: {exc}", param="messages") from None
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def chat_job(engine: Engine, body: ChatRequest) -> Prepared:
    _check_model(engine, body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    ids = chat_prompt_ids(engine.tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages])
    budget = _budget(engine, len(ids), body.wanted_tokens())
    params = SamplingParams(max_tokens=budget, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                            stop=body.stop_strings(), logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    return _prepared(engine, ids, None, params)
