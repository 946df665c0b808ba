"""Running the server: an :class:`~bitsmith.serve.requests.Engine` built from a loaded model, uvicorn in
the foreground (the CLI; SIGINT/SIGTERM stop it gracefully: no new connections, open requests finish
within the grace period, then the scheduler stops) or in a background thread on an ephemeral port
(tests and benchmarks)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from bitsmith.models.context import context_length
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.serve.requests import FALLBACK_CONTEXT, Engine
from bitsmith.serve.scheduler import Scheduler

__all__ = ["BackgroundServer", "ServeSettings", "build_engine", "eos_ids", "run_foreground"]

GRACE_S = 30  # seconds open requests get to finish on shutdown


@dataclass(frozen=True)
class ServeSettings:
    """How a model is served (the CLI's flags)."""

    model_id: str
    max_batch: int = 8
    max_queue: int = 32
    max_tokens_default: int = 256
    api_key: str | None = None
    prefill_chunk: int = 256  # prompt tokens per scheduler step (chunked prefill, see serve/scheduler.py)
    draft_k: int = 4  # tokens a draft proposes per round, when build_engine is given one


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every end-of-sequence id the generation config, model config or tokenizer names."""
    ids: set[int] = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(getattr(model, "config", None), "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def build_engine(model: Any, tokenizer: Any, settings: ServeSettings, options: RuntimeOptions = RuntimeOptions(),
                 draft: Any = None) -> Engine:
    """The engine serving ``model`` (raises ValueError when the model cannot be served); with ``draft`` (a
    quantized copy of the same model), a lone request decodes speculatively (serve/scheduler.py)."""
    if settings.max_batch < 1 or settings.max_queue < 0 or settings.max_tokens_default < 1 or settings.prefill_chunk < 1:
        raise ValueError("--max-batch, --max-tokens-default and --prefill-chunk must be >= 1 and --max-queue >= 0")
    model.eval()
    scheduler = Scheduler(model, tokenizer, eos_ids(model, tokenizer), max_batch=settings.max_batch,
                          max_queue=settings.max_queue, options=options, prefill_chunk=settings.prefill_chunk,
                          draft=None if draft is None else draft.eval(), draft_k=settings.draft_k)
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or len(tokenizer))
    return Engine(scheduler, tokenizer, settings.model_id, context_length(config) or FALLBACK_CONTEXT, vocab,
                  settings.max_tokens_default, settings.api_key)


def _config(engine: Engine, host: str, port: int, log_level: str) -> Any:
    import uvicorn

    from bitsmith.serve.app import create_app

    return uvicorn.Config(create_app(engine), host=host, port=port, log_level=log_level, lifespan="on",
                          timeout_graceful_shutdown=GRACE_S, access_log=False)


def run_foreground(engine: Engine, host: str, port: int, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully and return.

    uvicorn catches the signal, drains open requests, and re-raises it to the handler that was installed
    before it started; a no-op handler there makes a requested stop a normal return (exit code 0)
    instead of a death by signal or a KeyboardInterrupt after a clean shutdown."""
    import signal

    import uvicorn

    stops = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.signal(s, lambda *_: None) for s in stops}
    try:
        uvicorn.Server(_config(engine, host, port, log_level)).run()
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


class BackgroundServer:
    """The app served from a thread on ``host`` and an ephemeral port; ``url`` once started."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", log_level: str = "warning") -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(_config(engine, host, 0, log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(GRACE_S + 5)
        self.sock.close()
