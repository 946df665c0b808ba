"""Continuous batching: one thread owns the model and advances every active request together.

Requests arrive as :class:`Job` objects from the HTTP handlers (any thread). The scheduler thread
loops over steps:

1. admit: while fewer than ``max_batch`` sequences are prefilling or decoding, take the oldest waiting
   job and give it a fresh lean runner (its own KV cache, sized for prompt + ``max_tokens``);
2. step: one :func:`bitsmith.serve.batch.ragged_step` forward over every decoding sequence's next
   token **and** up to ``prefill_chunk`` prompt tokens of the sequences still prefilling, oldest first
   (chunked prefill: the linears read each weight once for all rows, several new prompts are prefilled
   in one forward, and a long prompt is spread over steps instead of stalling every stream for its
   whole length); then per decoding sequence: sample, log-probabilities, text, stop checks, and per
   prefilling sequence whose prompt is now complete: its prompt log-probabilities (echo, gathered
   chunk by chunk) and its first token;
3. retire finished and cancelled sequences (a cancelled job is dropped at the next boundary, whether
   it was waiting, prefilling or decoding).

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
from bitsmith.infer.speculative import MAX_DRAFT_TOKENS, DraftCursor, speculate
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.serve.batch import ragged_step
from bitsmith.serve.sampling import SamplingParams, TextTail, TokenLogprob, choose, logprobs_of

__all__ = ["DEFAULT_PREFILL_CHUNK", "Finished", "Job", "Prompt", "QueueFull", "Scheduler", "SchedulerStopped", "Token"]

# Prompt tokens per step, shared by all prefilling sequences: the lean runner's slice (256), so a long
# prompt stalls the decoding streams for at most a 256-token step
DEFAULT_PREFILL_CHUNK = PREFILL_CHUNK

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
    fed: int = 0  # prompt tokens already in the KV cache
    generated: list[int] = field(default_factory=list)  # tokens committed after the prompt
    cursor: DraftCursor | None = None  # the draft's runner, once this sequence has been decoded speculatively
    echo: list[TokenLogprob | None] = field(default_factory=lambda: [None])  # prompt logprobs so far

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.job.prompt_ids)


class Scheduler:
    """The model's only user once started; see the module docstring."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, eos_ids: frozenset[int], *, max_batch: int = 8,
                 max_queue: int = 32, options: RuntimeOptions = RuntimeOptions(),
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, draft: torch.nn.Module | None = None,
                 draft_k: int = 4) -> None:
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be >= 1 and max_queue >= 0, got {max_batch}, "
                             f"{prefill_chunk} and {max_queue}")
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
        self.max_batch, self.max_queue, self.options = max_batch, max_queue, options
        self.prefill_chunk = prefill_chunk
        self.draft, self.draft_k = draft, draft_k
        if draft is not None:
            _check_draft(model, draft, draft_k, options)
        if lean_runner(model, 1, options) is None:
            raise ValueError(f"{type(model).__name__} is outside bitsmith's lean inference path (see "
                             "`bitsmith -v generate`), which serving needs for its KV caches; offloaded models "
                             "(--max-memory) cannot be served")
        self._waiting: deque[Job] = deque()
        self._active: list[_Sequence] = []  # prefilling (oldest first) and decoding sequences
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # batched decode steps run
        self.stepped_tokens = 0  # tokens those steps produced (steps * mean batch)
        self.cancelled = 0  # requests dropped because their client went away (or at shutdown)
        self.prefill_steps = 0  # steps that carried prompt tokens
        self.spec_rounds = self.spec_proposed = self.spec_accepted = 0  # speculative rounds (lone sequences)

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
                "decode_steps": self.steps, "mean_batch": round(mean, 3), "cancelled": self.cancelled,
                "prefill_steps": self.prefill_steps, "prefill_chunk": self.prefill_chunk,
                **({"draft_k": self.draft_k, "speculative_rounds": self.spec_rounds,
                    "draft_acceptance": round(self.spec_accepted / self.spec_proposed, 4) if self.spec_proposed else None}
                   if self.draft is not None else {})}

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
        # Admission is cheap now (a runner and its empty cache); the prompt is fed in chunks by _step, so
        # a burst of arrivals no longer stalls the decoding streams for the sum of its prefills.
        while len(self._active) < self.max_batch:
            with self._cond:
                if not self._waiting or self._stopping:
                    return
                job = self._waiting.popleft()
            if job.cancelled.is_set():
                self.cancelled += 1
                job.send(Finished("cancelled", len(job.prompt_ids), 0))
                continue
            try:
                if not job.prompt_ids:
                    raise ValueError("the prompt has no tokens")
                spare = self.draft_k + 1 if self.draft is not None else 0  # a last round verifies past the end
                runner = lean_runner(self.model, len(job.prompt_ids) + max(job.params.max_tokens, 1) + spare,
                                     self.options)
            except Exception as exc:  # out of memory for the cache: this request fails, the server goes on
                log.exception("admission failed")
                job.send(Finished("error", len(job.prompt_ids), 0, error=f"{type(exc).__name__}: {exc}"))
                continue
            tail = TextTail(self.tokenizer, job.params.stop)
            self._active.append(_Sequence(job, runner, seeded_generator(job.params.seed), tail))

    def _plan(self) -> tuple[list[_Sequence], list[list[int]]]:
        """This step's rows: every decoding sequence's next token, then prompt slices of the prefilling
        ones, oldest first, up to ``prefill_chunk`` prompt tokens in all."""
        seqs, tokens = [], []
        budget = self.prefill_chunk
        for seq in self._active:
            if not seq.prefilling:
                seqs.append(seq)
                tokens.append([seq.next_id])
            elif budget > 0:
                ids = seq.job.prompt_ids[seq.fed : seq.fed + budget]
                budget -= len(ids)
                seqs.append(seq)
                tokens.append(ids)
        return seqs, tokens

    def _prompt_done(self, seq: _Sequence, logits: torch.Tensor, fed: int) -> bool:
        """Book a prompt slice's logits (all rows when echoing, else the last); at the prompt's end send
        the echo and sample the first token. False when the sequence is finished."""
        params, prompt = seq.job.params, seq.job.prompt_ids
        start, seq.fed = seq.fed, seq.fed + fed
        if params.echo_logprobs:  # row j predicts prompt[start + j + 1]
            targets = torch.tensor(prompt[start + 1 : seq.fed + 1], dtype=torch.long)
            seq.echo += logprobs_of(logits[: len(targets)], targets, params.logprobs or 0)
            logits = logits[-1]
        if seq.prefilling:
            return True
        if params.echo_logprobs:
            seq.job.send(Prompt(seq.echo))
        if params.max_tokens == 0:
            self._finish(seq, "length")
            return False
        return self._accept(seq, logits)

    def _accept(self, seq: _Sequence, logits: torch.Tensor) -> bool:
        """Sample from ``logits`` [V], report the token; False when the sequence is finished."""
        params = seq.job.params
        token = choose(logits, params, seq.generator)
        lp = None if params.logprobs is None else logprobs_of(logits[None], torch.tensor([token]), params.logprobs)[0]
        return self._commit(seq, token, lp)

    def _commit(self, seq: _Sequence, token: int, lp: TokenLogprob | None) -> bool:
        """Report a chosen token; False when the sequence is finished (EOS, stop string, max_tokens)."""
        if token in self.eos_ids:
            self._finish(seq, "stop")
            return False
        seq.produced += 1
        seq.generated.append(token)
        seq.job.send(Token(token, seq.tail.push(token), lp))
        if seq.tail.stopped:
            self._finish(seq, "stop")
            return False
        if seq.produced >= seq.job.params.max_tokens:
            self._finish(seq, "length")
            return False
        seq.next_id = token
        if seq.cursor is not None:  # the target moves on without the draft: the draft catches up later
            seq.cursor.backlog.append(token)
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

    def _speculative(self) -> _Sequence | None:
        """The sequence to decode speculatively this step: with a draft, a lone decoding sequence that asks
        for no log-probabilities, and nobody waiting (a batch already reads each weight once for all its
        rows, which is where a draft's saving comes from)."""
        if self.draft is None or len(self._active) != 1 or self._waiting:
            return None
        seq = self._active[0]
        return None if seq.prefilling or seq.job.params.logprobs is not None else seq

    def _step_speculative(self, seq: _Sequence) -> None:
        params = seq.job.params
        try:
            if seq.cursor is None:  # the draft reads everything committed so far in its first round
                runner = lean_runner(self.draft, seq.runner.max_len, self.options)
                seq.cursor = DraftCursor(runner, [*seq.job.prompt_ids, *seq.generated])
            emitted, kept = speculate(seq.runner, seq.cursor, self.draft_k, params.temperature, params.top_p,
                                      seq.generator)
        except Exception as exc:
            log.exception("speculative step failed")
            self._finish(seq, "error", f"{type(exc).__name__}: {exc}")
            self._active = []
            return
        self.spec_rounds, self.spec_proposed, self.spec_accepted = (
            self.spec_rounds + 1, self.spec_proposed + self.draft_k, self.spec_accepted + kept)
        backlog = list(seq.cursor.backlog)
        for token in emitted:
            if not self._commit(seq, token, None):
                self._active = []
                return
        seq.cursor.backlog = backlog  # _commit appended what speculate had already put there

    def _step(self) -> None:
        lone = self._speculative()
        if lone is not None:
            self._step_speculative(lone)
            return
        seqs, tokens = self._plan()
        if not seqs:
            return
        echo = [s.prefilling and s.job.params.echo_logprobs for s in seqs]
        try:
            rows = ragged_step([s.runner for s in seqs], tokens, echo)
        except Exception as exc:
            log.exception("batched step failed")
            for seq in seqs:
                self._finish(seq, "error", f"{type(exc).__name__}: {exc}")
            failed = {id(s) for s in seqs}
            self._active = [s for s in self._active if id(s) not in failed]
            return
        decoding = sum(len(t) == 1 and not s.prefilling for s, t in zip(seqs, tokens))
        self.steps += decoding > 0
        self.stepped_tokens += decoding
        self.prefill_steps += decoding < len(seqs)
        done = set()
        for seq, ids, row in zip(seqs, tokens, rows):
            try:
                alive = self._prompt_done(seq, row, len(ids)) if seq.prefilling else self._accept(seq, row)
            except Exception as exc:
                log.exception("sampling failed")
                self._finish(seq, "error", f"{type(exc).__name__}: {exc}")
                alive = False
            if not alive:
                done.add(id(seq))
        self._active = [s for s in self._active if id(s) not in done]


def _check_draft(model: torch.nn.Module, draft: torch.nn.Module, k: int, options: RuntimeOptions) -> None:
    if not 1 <= k <= MAX_DRAFT_TOKENS:
        raise ValueError(f"the draft proposes 1 to {MAX_DRAFT_TOKENS} tokens per step (--draft-k), got {k}")
    vocab = [getattr(getattr(m, "config", None), "vocab_size", None) for m in (model, draft)]
    if vocab[0] != vocab[1]:
        raise ValueError(f"the draft's vocabulary ({vocab[1]} tokens) is not the model's ({vocab[0]}); a draft "
                         "must be a quantized copy of the same model")
    if lean_runner(draft, 1, options) is None:
        raise ValueError(f"the draft ({type(draft).__name__}) is outside bitsmith's lean inference path")
