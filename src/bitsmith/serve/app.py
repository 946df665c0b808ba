"""The OpenAI-compatible HTTP API (FastAPI): ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions`` (whole or streamed as server-sent events) and ``/health``.

Handlers validate and tokenize a request (refusing what cannot run before any model work: an unknown
model, a prompt that does not fit the context, a model without a chat template), hand it to the
:class:`~bitsmith.serve.scheduler.Scheduler` as a job, and turn the job's events into the response.
Every error is a JSON body in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``):
400 for invalid requests (malformed JSON and wrong types included), 401 without the API key, 404 for
an unknown model, 429 when the queue is full, 500 if a step failed. A client that disconnects cancels
its job at the next step boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from bitsmith.serve.requests import ApiError, Engine, chat_job, completion_job
from bitsmith.serve.responses import (Collected, chat_body, chat_chunk, chat_logprobs, completion_body,
                                      completion_chunk, completion_logprobs, new_id, sse, usage)
from bitsmith.serve.scheduler import Finished, Job, Prompt, QueueFull, SchedulerStopped, Token
from bitsmith.serve.schemas import ChatRequest, CompletionRequest, error_body

__all__ = ["create_app"]

log = logging.getLogger(__name__)
POLL_S = 0.5  # how often a non-streamed request checks whether its client is still there


class _ApiKey:
    """ASGI middleware: /v1 routes need ``Authorization: Bearer <key>``; checked before the body is read,
    so an unauthenticated client learns nothing about its request."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"")
            token = given[7:].strip() if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                body = error_body("missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                                  "with the key the server was started with (--api-key)",
                                  "authentication_error", code="invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors()[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return "the request body is not valid JSON: " + str(err.get("msg", "")), None
        where = ".".join(loc) or "body"
        param = param or where
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts), param


@dataclass
class _Submitted:
    job: Job
    events: asyncio.Queue


def _submit(engine: Engine, job_of: Any) -> _Submitted:
    """Queue a job whose events land on an asyncio queue of this loop; 429 when the queue is full."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(event: Any) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is gone (shutdown): nobody will read this job
            job.cancel()

    job = job_of(emit)
    try:
        engine.scheduler.submit(job)
    except QueueFull as exc:
        raise ApiError(429, str(exc), "rate_limit_error", code="queue_full") from None
    except SchedulerStopped as exc:
        raise ApiError(503, str(exc), "server_error", code="shutting_down") from None
    return _Submitted(job, events)


async def _collect(request: Request, sub: _Submitted) -> Collected | None:
    """Gather a job's events until it finishes; None when the client went away (job cancelled)."""
    c = Collected()
    try:
        while True:
            try:
                event = await asyncio.wait_for(sub.events.get(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    sub.job.cancel()
                    return None
                continue
            if isinstance(event, Prompt):
                c.prompt_logprobs = event.logprobs
            elif isinstance(event, Token):
                c.text += event.text
                if event.logprob is not None:
                    c.logprobs.append(event.logprob)
            elif isinstance(event, Finished):
                if event.reason == "error":
                    raise ApiError(500, f"generation failed: {event.error}", "server_error")
                c.text += event.text
                c.finish_reason, c.prompt_tokens, c.completion_tokens = event.reason, event.prompt_tokens, event.completion_tokens
                return c
    finally:
        sub.job.cancel()  # no-op once finished; stops the work if this handler was cancelled


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI application serving ``engine``; the scheduler thread starts and stops with the app."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.scheduler.start()
        try:
            yield
        finally:
            engine.scheduler.stop()

    app = FastAPI(title="bitsmith serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    _errors(app)
    _routes(app, engine)
    if engine.api_key:
        app.add_middleware(_ApiKey, key=engine.api_key)
    return app


def _errors(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"no route {request.url.path}; see /v1/models, /v1/completions, "
                                       "/v1/chat/completions, /health", code="not_found"), status_code=404)

    @app.exception_handler(405)
    async def wrong_method(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"{request.method} is not allowed on {request.url.path}"), status_code=405)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), status_code=500)


def _routes(app: FastAPI, engine: Engine) -> None:
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_id, **engine.scheduler.load}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": engine.created,
                                             "owned_by": "bitsmith", "context_length": engine.context}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request, body: CompletionRequest) -> Any:
        prep = completion_job(engine, body)
        sub = _submit(engine, prep.job_of)
        want = body.logprobs is not None
        if body.stream:
            return StreamingResponse(_completion_stream(engine, body, prep, sub), media_type="text/event-stream")
        c = await _collect(request, sub)
        if c is None:
            return Response(status_code=499)
        return completion_body(engine.model_id, c, engine.token_text, prep.echo_text, prep.prompt_ids, want)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request, body: ChatRequest) -> Any:
        prep = chat_job(engine, body)
        sub = _submit(engine, prep.job_of)
        if body.stream:
            return StreamingResponse(_chat_stream(engine, body, sub), media_type="text/event-stream")
        c = await _collect(request, sub)
        if c is None:
            return Response(status_code=499)
        return chat_body(engine.model_id, c, engine.token_text, body.logprobs)


async def _completion_stream(engine: Engine, body: CompletionRequest, prep: Any, sub: _Submitted) -> AsyncIterator[str]:
    cid, model, text = new_id("cmpl"), engine.model_id, engine.token_text
    offset = len(prep.echo_text or "")
    try:
        if body.echo and body.logprobs is None:
            yield sse(completion_chunk(cid, model, prep.echo_text, None, None))
        while True:
            event = await sub.events.get()
            if isinstance(event, Prompt):
                lp = completion_logprobs(event.logprobs, prep.prompt_ids, text)
                yield sse(completion_chunk(cid, model, prep.echo_text, lp, None))
            elif isinstance(event, Token):
                lp = None
                if event.logprob is not None:
                    lp = completion_logprobs([event.logprob], [event.token], text, offset)
                    offset += len(text(event.token))
                if event.text or lp is not None:
                    yield sse(completion_chunk(cid, model, event.text, lp, None))
            elif isinstance(event, Finished):
                for chunk in _ending(event, completion_chunk(cid, model, event.text, None, event.reason), body):
                    yield chunk
                return
    finally:
        sub.job.cancel()  # the client went away (the generator is closed) or the job ended


async def _chat_stream(engine: Engine, body: ChatRequest, sub: _Submitted) -> AsyncIterator[str]:
    cid, model, text = new_id("chatcmpl"), engine.model_id, engine.token_text
    try:
        yield sse(chat_chunk(cid, model, {"role": "assistant", "content": ""}, None, None))
        while True:
            event = await sub.events.get()
            if isinstance(event, Token):
                lp = chat_logprobs([event.logprob], text) if body.logprobs and event.logprob is not None else None
                if event.text or lp is not None:
                    yield sse(chat_chunk(cid, model, {"content": event.text}, lp, None))
            elif isinstance(event, Finished):
                delta = {"content": event.text} if event.text else {}
                for chunk in _ending(event, chat_chunk(cid, model, delta, None, event.reason), body):
                    yield chunk
                return
    finally:
        sub.job.cancel()


def _ending(event: Finished, last: dict[str, Any], body: Any) -> list[str]:
    """The closing events of a stream: the finish chunk (or an error event), usage if asked, [DONE]."""
    if event.reason == "error":
        return [sse(error_body(f"generation failed: {event.error}", "server_error")), sse("[DONE]")]
    out = [sse(last)]
    if body.include_usage():
        out.append(sse({**{k: v for k, v in last.items() if k != "choices"}, "choices": [],
                        "usage": usage(event.prompt_tokens, event.completion_tokens)}))
    return out + [sse("[DONE]")]
