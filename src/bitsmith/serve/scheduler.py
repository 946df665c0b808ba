"""Continuous batching: one thread owns the model and advances every active request together.

Requests arrive as :class:`Job` objects from the HTTP handlers (any thread). The scheduler thread
loops over step boundaries:

1. admit: while fewer than ``max_batch`` sequences are active, take the oldest waiting job (one per
   boundary, so a burst of arrivals does not stall the streams already decoding), prefill its
   prompt into a fresh lean runner (its own KV cache, sized for prompt + ``max_tokens``), report prompt
   log-probabilities when asked, and sample its first token;
2. step: one :func:`bitsmith.serve.batch.decode_step` over all active sequences (each weight read once for
   the batch), then per sequence: sample, log-probabilities, text, stop checks;
3. retire finished and cancelled sequences (a cancelled job is dropped at the next boundary).

Waiting jobs are bounded by ``max_queue``: :meth:`Scheduler.submit` raises :class:`QueueFull` beyond it
(the server answers 429) rather than letting latency grow without bound. Results flow back through each
job's ``emit`` callback as :class:`Prompt`, :class:`Token` and one final :class:`Finished` event; a failure
inside a step fails the affected requests with a message and the loop goes on.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bitsmith.infer.generate import seeded_generator
from bitsmith.infer.lean import PREFILL_CHUNK, LeanRunner, lean_runner
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.serve.batch import decode_step
from bitsmith.serve.sampling import SamplingParams, TextTail, TokenLogprob, choose, logprobs_of

__all__ = ["Finished", "Job", "Prompt", "QueueFull", "Scheduler", "SchedulerStopped", "Token"]

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More requests wait than the queue holds; the client should retry later."""


class SchedulerStopped(RuntimeError):
    """The server is shutting down and takes no new requests."""


@dataclass(frozen=True)
class Prompt:
    """The prompt's log-probabilities (echo): None for the first token, which nothing predicts."""

    logprobs: list[TokenLogprob | None]


@dataclass(frozen=True)
class Token:
    """One generated token: the text it made final (may be empty) and its log-probabilities."""

    token: int
    text: str
    logprob: TokenLogprob | None


@dataclass(frozen=True)
class Finished:
    """The end of a request. ``reason``: stop (EOS or a stop string), length (max_tokens), cancelled or
    error (``error`` says what); ``text`` is the held-back tail not yet sent in a :class:`Token`."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    text: str = ""
    error: str | None = None


@dataclass
class Job:
    """One request for the scheduler. ``emit`` is called from the scheduler thread."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Any], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    def send(self, event: Any) -> None:
        """Deliver an event; a failing receiver cancels its own job, never the scheduler thread."""
        try:
            self.emit(event)
        except Exception:
            log.exception("a request's event receiver failed; cancelling the request")
            self.cancel()


@dataclass
class _Sequence:
    job: Job
    runner: LeanRunner
    generator: torch.Generator
    tail: TextTail
    produced: int = 0
    next_id: int = -1


class Scheduler:
    """The model's only user once started; see the module docstring."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, eos_ids: frozenset[int], *, max_batch: int = 8,
                 max_queue: int = 32, options: RuntimeOptions = RuntimeOptions()) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
        self.max_batch, self.max_queue, self.options = max_batch, max_queue, options
        if lean_runner(model, 1, options) is None:
            raise ValueError(f"{type(model).__name__} is outside bitsmith's lean inference path (see "
                             "`bitsmith -v generate`), which serving needs for its KV caches; offloaded models "
                             "(--max-memory) cannot be served")
        self._waiting: deque[Job] = deque()
        self._active: list[_Sequence] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # batched decode steps run
        self.stepped_tokens = 0  # tokens those steps produced (steps * mean batch)
        self.cancelled = 0  # requests dropped because their client went away (or at shutdown)

    # ------------------------------------------------------------------ control (any thread)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="bitsmith-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything still waiting or running and join the thread."""
        with self._cond:
            self._stopping = True  # the thread cancels what is active or waiting on its way out
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise SchedulerStopped("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue}); retry later")
            self._waiting.append(job)
            self._cond.notify()

    @property
    def load(self) -> dict[str, Any]:
        with self._cond:
            active, waiting = len(self._active), len(self._waiting)
        mean = self.stepped_tokens / self.steps if self.steps else 0.0
        return {"active": active, "waiting": waiting, "max_batch": self.max_batch, "max_queue": self.max_queue,
                "decode_steps": self.steps, "mean_batch": round(mean, 3), "cancelled": self.cancelled}

    # ------------------------------------------------------------------ the thread

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not self._active:
                        self._cond.wait()
                    if self._stopping:
                        break
                self._admit()
                self._retire_cancelled()
                if self._active:
                    self._step()
        for seq in self._active:
            self._finish(seq, "cancelled")
        self._active.clear()
        for job in self._waiting:
            job.send(Finished("cancelled", len(job.prompt_ids), 0, error="the server shut down"))

    def _admit(self) -> None:
        # One new prefill per step boundary: a prefill stalls every active stream, and admitting a burst of
        # N at once stalled them N prefills long (p99 per-token latency 3.7 s at 4 clients and 15 s at 16
        # in bench/results/serve); the first of a burst decodes while the next one prefills.
        budget = 1
        while budget > 0 and len(self._active) < self.max_batch:
            with self._cond:
                if not self._waiting or self._stopping:
                    return
                job = self._waiting.popleft()
            if job.cancelled.is_set():
                self.cancelled += 1
                job.send(Finished("cancelled", len(job.prompt_ids), 0))
                continue
            budget -= 1
            try:
                self._prefill(job)
            except Exception as exc:  # a bug or out of memory: this request fails, the server goes on
                log.exception("prefill failed")
                job.send(Finished("error", len(job.prompt_ids), 0, error=f"{type(exc).__name__}: {exc}"))

    def _prefill(self, job: Job) -> None:
        params = job.params
        runner = lean_runner(self.model, len(job.prompt_ids) + max(params.max_tokens, 1), self.options)
        ids = torch.tensor(job.prompt_ids, dtype=torch.long)
        if params.echo_logprobs:
            entries: list[TokenLogprob | None] = [None]
            for lo in range(0, len(ids), PREFILL_CHUNK):  # all-position logits a slice at a time (memory)
                logits = runner(ids[lo : lo + PREFILL_CHUNK], all_logits=True)  # row j predicts ids[lo + j + 1]
                targets = ids[lo + 1 : lo + PREFILL_CHUNK + 1]
                entries += logprobs_of(logits[: len(targets)], targets, params.logprobs or 0)
            last = logits[-1]
            job.send(Prompt(entries))
        else:
            last = runner(ids)
        seq = _Sequence(job, runner, seeded_generator(params.seed), TextTail(self.tokenizer, params.stop))
        if params.max_tokens == 0:
            self._finish(seq, "length")
            return
        if self._accept(seq, last):
            self._active.append(seq)

    def _accept(self, seq: _Sequence, logits: torch.Tensor) -> bool:
        """Sample from ``logits`` [V], report the token; False when the sequence is finished."""
        params = seq.job.params
        token = choose(logits, params, seq.generator)
        if token in self.eos_ids:
            self._finish(seq, "stop")
            return False
        lp = None if params.logprobs is None else logprobs_of(logits[None], torch.tensor([token]), params.logprobs)[0]
        seq.produced += 1
        seq.job.send(Token(token, seq.tail.push(token), lp))
        if seq.tail.stopped:
            self._finish(seq, "stop")
            return False
        if seq.produced >= params.max_tokens:
            self._finish(seq, "length")
            return False
        seq.next_id = token
        return True

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        tail = seq.tail.finish() if reason in ("stop", "length") else ""
        self.cancelled += reason == "cancelled"
        seq.job.send(Finished(reason, len(seq.job.prompt_ids), seq.produced, tail, error))

    def _retire_cancelled(self) -> None:
        keep = []
        for seq in self._active:
            if seq.job.cancelled.is_set():
                self._finish(seq, "cancelled")
            else:
                keep.append(seq)
        self._active = keep

    def _step(self) -> None:
        active = self._active
        try:
            logits = decode_step([s.runner for s in active], [s.next_id for s in active])  # [B, V]
        except Exception as exc:
            log.exception("decode step failed")
            for seq in active:
                self._finish(seq, "error", f"{type(exc).__name__}: {exc}")
            self._active = []
            return
        self.steps += 1
        self.stepped_tokens += len(active)
        keep = []
        for seq, row in zip(active, logits):
            try:
                alive = self._accept(seq, row)
            except Exception as exc:
                log.exception("sampling failed")
                self._finish(seq, "error", f"{type(exc).__name__}: {exc}")
                alive = False
            if alive:
                keep.append(seq)
        self._active = keep
