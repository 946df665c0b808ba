"""Greedy generation of many prompts at once, with continuous batching: what code tasks need.

HumanEval asks for 164 independent greedy continuations. Generated one after another, every decode
step reads all the packed weights for a single token; here up to ``max_batch`` sequences decode
together, so each weight is read once per step for all of them (:func:`bitsmith.serve.batch.decode_step`,
the server's batched step, reused as is). A sequence that finishes (EOS, its stop condition, its token
budget) leaves the batch at once and the next waiting prompt is prefilled into its place, so the batch
stays full until the queue runs dry. The token prefix all prompts share (HumanEval's chat template
header and instruction: about 40% of its prompt tokens) is prefilled once and its KV cache copied into
each new row, so only the rest of each prompt is computed.

Each sequence has its own lean runner (its own KV cache and position), so a sequence's tokens depend
only on its own prompt: the result equals generating each prompt alone, greedy, up to float rounding.
The one difference in arithmetic: with two or more active rows the linears run on a ``[B, hidden]``
activation (the native multi-row gemv, or torch for float layers) where a lone sequence takes the
runner's own step (the fused native decode when the model has one); the two sum in different orders,
so logits differ by float rounding (the serve tests bound it) and greedy tokens can differ only where
two logits tie to within that rounding. The shared prefix is the same kind of difference: its keys and
values come from a prefill of the prefix alone rather than of the whole prompt (as a prompt longer than
the lean runner's prefill slice is prefilled in slices anyway). ``tests/infer/test_batching.py`` checks token equality.

Models outside the lean path (no KV-cache runner) are not handled here: :func:`generate_many` returns
``None`` and callers fall back to one-at-a-time :func:`bitsmith.infer.generate.generate`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from bitsmith.infer.lean import LeanRunner, lean_runner
from bitsmith.kernels.cpu import GEMV_MAX_ROWS
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.serve.batch import decode_step

__all__ = ["BatchStats", "common_prefix", "generate_many"]

log = logging.getLogger(__name__)

# Stop test of one sequence: (prompt index, generated ids so far) -> finished?
Stopped = Callable[[int, list[int]], bool]
# Called once per prompt as soon as its sequence finishes: (prompt index, generated ids).
OnDone = Callable[[int, list[int]], None]


@dataclass
class BatchStats:
    """What a :func:`generate_many` run did: ``steps`` batched decode steps producing
    ``stepped_tokens`` tokens (their mean batch is the ratio), ``prefill_tokens`` prompt tokens run
    through the model, of which ``shared_prefix_tokens`` once for the prefix all prompts share."""

    steps: int = 0
    stepped_tokens: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    shared_prefix_tokens: int = 0

    @property
    def mean_batch(self) -> float:
        return self.stepped_tokens / self.steps if self.steps else 0.0


@dataclass
class _Row:
    index: int
    runner: LeanRunner
    ids: list[int] = field(default_factory=list)


def common_prefix(prompts: Sequence[Sequence[int]]) -> list[int]:
    """The longest token prefix every prompt starts with (empty for fewer than two prompts)."""
    if len(prompts) < 2:
        return []
    first, n = prompts[0], min(len(p) for p in prompts)
    for other in prompts[1:]:
        n = next((i for i in range(n) if other[i] != first[i]), n)
    return list(first[:n])


def _prefill(model: torch.nn.Module, prompt: Sequence[int], max_new_tokens: int, options: RuntimeOptions,
             prefix: LeanRunner | None) -> tuple[LeanRunner, int, int]:
    """A runner with ``prompt`` prefilled (cache sized for prompt + budget), its greedy first token and
    the number of prompt tokens computed. ``prefix``: a runner holding the KV cache of a prefix all
    prompts share; its positions are copied, not recomputed (the last GEMV_MAX_ROWS + 1 prompt tokens
    at least are run)."""
    runner = lean_runner(model, len(prompt) + max(max_new_tokens, 1), options)
    assert runner is not None  # generate_many checked the model once before any work
    # The rest of the prompt must be more rows than the decode gemv takes, as the whole prompt would be:
    # up to GEMV_MAX_ROWS rows (one row: the fused step) compute with int8 activations, not as a prefill.
    shared = 0 if prefix is None else min(prefix.pos, len(prompt) - GEMV_MAX_ROWS - 1)
    if shared > 0:
        for mine, theirs in zip(runner.keys + runner.values, prefix.keys + prefix.values):
            mine[:, :shared] = theirs[:, :shared]
        runner.pos = shared
    logits = runner(torch.tensor(list(prompt[shared:]), dtype=torch.long))
    return runner, int(logits.argmax()), len(prompt) - shared  # argmax: the first index on ties, as sample_next


@dataclass
class _Batch:
    """The queue, the active rows and the finished results of one :func:`generate_many` call."""

    model: torch.nn.Module
    prompts: Sequence[Sequence[int]]
    max_new_tokens: int
    eos: frozenset[int]
    stopped: Stopped | None
    on_done: OnDone | None
    max_batch: int
    options: RuntimeOptions
    stats: BatchStats

    def __post_init__(self) -> None:
        self.results: list[list[int] | None] = [None] * len(self.prompts)
        self.waiting = deque(range(len(self.prompts)))
        self.active: list[_Row] = []
        # HumanEval's prompts share the chat template's header and the instruction: computed once
        shared = common_prefix(self.prompts)
        self.prefix: LeanRunner | None = None
        if len(shared) > GEMV_MAX_ROWS:  # a shorter prefix would take the decode gemv, not the prefill path
            self.prefix = lean_runner(self.model, len(shared), self.options)
            assert self.prefix is not None
            self.prefix(torch.tensor(shared, dtype=torch.long))
            self.stats.prefill_tokens += len(shared)
            self.stats.shared_prefix_tokens += len(shared)

    def accept(self, row: _Row, token: int) -> bool:
        """Record ``token``; False (and the row reported) when the sequence is finished."""
        row.ids.append(token)
        self.stats.generated_tokens += 1
        done = (token in self.eos or len(row.ids) >= self.max_new_tokens
                or (self.stopped is not None and self.stopped(row.index, row.ids)))
        if done:
            self.results[row.index] = row.ids
            if self.on_done is not None:
                self.on_done(row.index, row.ids)
        return not done

    def refill(self) -> None:
        """Prefill waiting prompts into free rows (all of them at once: throughput, not latency, matters)."""
        while self.waiting and len(self.active) < self.max_batch:
            index = self.waiting.popleft()
            runner, token, computed = _prefill(self.model, self.prompts[index], self.max_new_tokens, self.options,
                                               self.prefix)
            self.stats.prefill_tokens += computed
            row = _Row(index, runner)
            if self.accept(row, token):
                self.active.append(row)

    def step(self) -> None:
        """One batched decode step for every active row; finished rows leave."""
        logits = decode_step([r.runner for r in self.active], [r.ids[-1] for r in self.active])  # [B, V]
        self.stats.steps += 1
        self.stats.stepped_tokens += len(self.active)
        tokens = logits.argmax(-1).tolist()  # greedy, first index on ties
        self.active = [row for row, token in zip(self.active, tokens) if self.accept(row, int(token))]


def generate_many(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos: frozenset[int] = frozenset(),
    stopped: Stopped | None = None,
    on_done: OnDone | None = None,
    max_batch: int = 8,
    options: RuntimeOptions | None = None,
    stats: BatchStats | None = None,
) -> list[list[int]] | None:
    """Greedy continuations of every prompt (token ids, prompt excluded), in prompt order.

    A sequence ends after its EOS token (kept, as :func:`bitsmith.infer.generate.generate` keeps it),
    after ``max_new_tokens`` tokens, or as soon as ``stopped(index, ids)`` is true after a new token;
    ``on_done(index, ids)`` is then called at once. Prompts are admitted in order as rows free up, at
    most ``max_batch`` decoding at a time. ``stats``, if given, is filled in.
    Returns ``None`` when the model is outside the lean inference path (nothing was run).
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    options = RuntimeOptions.from_env() if options is None else options
    if lean_runner(model, 1, options) is None:
        return None
    batch = _Batch(model, prompts, max_new_tokens, eos, stopped, on_done, max_batch, options,
                   BatchStats() if stats is None else stats)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            while batch.waiting or batch.active:
                batch.refill()
                if batch.active:
                    batch.step()
    finally:
        model.train(was_training)
    log.info("generated %d sequences: %d decode steps, mean batch %.2f", len(prompts), batch.stats.steps,
             batch.stats.mean_batch)
    return [r if r is not None else [] for r in batch.results]
