"""Speculative decoding: a cheap draft of the same model proposes ``k`` tokens, the target checks all of
them in one batched forward, and the target's KV cache is rolled back past the first token it rejects.

When it pays: a decode step reads every weight once whatever the number of rows, so where decode is
bound by memory bandwidth the target verifying ``k + 1`` positions costs little more than decoding one,
while a 2- or 3-bit draft reads a fraction of the bytes. On the shared 2-core CPU this was measured on
(bench/results/speculative), decode is bound by arithmetic instead: a 4-row verify costs ~1.5 one-row
steps even at int8, and a 2- or 3-bit draft of the same model is hardly cheaper per token than its
4-bit target, so speculation is slower there.

Correctness (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding";
Chen et al. 2023, "Accelerating LLM decoding with speculative sampling"):

- greedy (``temperature == 0``): a drafted token is kept iff it is the target's argmax at that position;
  the first mismatch is replaced by the target's argmax. The output is the target's greedy sequence;
- sampling: draft token ``x ~ q`` is accepted with probability ``min(1, p(x) / q(x))``; on rejection the
  token is drawn from ``norm(max(0, p - q))``. Each emitted token is then distributed exactly as ``p``, the
  target's own sampling distribution (temperature and nucleus applied, :func:`sampling_probs`), so the
  sampled text is distributed as without a draft (the random stream differs, so not token for token).

Both models run through :class:`bitsmith.infer.lean.LeanRunner`; rolling back is moving its position
(positions past it are overwritten before any attention reads them).

Exactness (greedy output equal to plain decoding's, token for token):

- with the default int8-activation decode, when the target decodes with the fused native step and its head
  runs in it (bitsmith's default head), the verify is the fused verify step (:mod:`bitsmith.infer.verify`,
  csrc/verify.cpp): every one of its ``k + 1`` rows' logits is bit for bit what plain decoding's one-token
  step computes (tests/infer/test_verify.py), so greedy output is plain decoding's exactly;
- with exact float decode (``RuntimeOptions(int8_decode=False)``) the verify is the runner's batched
  forward, whose matrix products (csrc/smallbatch.cpp) compute every row bit for bit as the one-row gemv;
  only the small ops around them (norms, rotary, attention: torch there, the fused step in plain decoding)
  differ by float32 rounding (~1e-6 relative), so only a near-exact tie of the top two logits could flip;
- otherwise (torch decode, a float head at int8) the verify is the batched forward with int8 activations
  rounded at slightly different values than plain decoding's, and near-ties can flip (11/20 prompts
  identical on SmolLM2 in bench/results/speculative, session 9).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bitsmith.infer.generate import (
    GenerationResult, TextStream, check_sampling, eos_ids, eval_mode, generation_result, prompt_token_ids,
    sampling_probs, seeded_generator,
)
from bitsmith.infer.verify import fused_verifier
from bitsmith.models.context import check_generation_fits
from bitsmith.runtime.options import RuntimeOptions

__all__ = ["DraftCursor", "SpeculativeResult", "SpeculativeStats", "acceptance_probability", "residual_distribution",
           "speculate", "speculative_choice", "speculative_generate", "MAX_DRAFT_TOKENS"]

MAX_DRAFT_TOKENS = 7  # k + 1 verified rows stay within one small-batch pass (GEMV_MAX_ROWS = 8)


@dataclass(frozen=True)
class SpeculativeStats:
    """How the draft fared: ``proposed`` draft tokens, of which ``accepted`` were kept, over ``rounds``
    verify steps; ``draft_s`` and ``verify_s`` split the decode time."""

    k: int
    rounds: int
    proposed: int
    accepted: int
    draft_s: float
    verify_s: float

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens emitted per target forward (accepted drafts plus the target's own token)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    def as_json(self) -> dict[str, Any]:
        return {"k": self.k, "rounds": self.rounds, "proposed": self.proposed, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "tokens_per_round": self.tokens_per_round,
                "draft_s": self.draft_s, "verify_s": self.verify_s}


@dataclass(frozen=True)
class SpeculativeResult:
    generation: GenerationResult
    stats: SpeculativeStats


# ----------------------------------------------------------------------------- the sampler (pure)


def acceptance_probability(p: Tensor, q: Tensor, token: int) -> float:
    """min(1, p(token) / q(token)) for target ``p`` and draft ``q`` [V] (weights, normalised here)."""
    pt = float(p[token]) / float(p.sum())
    qt = float(q[token]) / float(q.sum())
    if qt <= 0.0:
        raise ValueError(f"the draft proposed token {token}, to which it gives probability 0")
    return min(1.0, pt / qt)


def residual_distribution(p: Tensor, q: Tensor) -> Tensor:
    """norm(max(0, p - q)) in float64 [V]: what a rejection resamples from. When p == q nothing is ever
    rejected; should rounding leave no mass, p itself is returned."""
    p64 = p.double() / p.double().sum()
    q64 = q.double() / q.double().sum()
    rest = (p64 - q64).clamp_min(0.0)
    total = float(rest.sum())
    return rest / total if total > 0.0 else p64


def speculative_choice(p: Tensor, q: Tensor, token: int, generator: torch.Generator) -> tuple[bool, int]:
    """(accepted, emitted token) for a draft ``token ~ q`` checked against the target's ``p``."""
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    if u < acceptance_probability(p, q, token):
        return True, token
    return False, int(torch.multinomial(residual_distribution(p, q), 1, generator=generator))


# ----------------------------------------------------------------------------- the loop


@dataclass
class _Sampler:
    """Greedy or sampled choices over logits, one generator for the whole run."""

    temperature: float
    top_p: float
    generator: torch.Generator

    def probs(self, logits: Tensor) -> Tensor | None:
        return None if self.temperature == 0 else sampling_probs(logits, self.temperature, self.top_p)

    def draw(self, logits: Tensor, probs: Tensor | None) -> int:
        if probs is None:
            return int(logits.argmax())
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def check(self, target_logits: Tensor, draft_probs: Tensor | None, token: int) -> tuple[bool, int]:
        if draft_probs is None:
            best = int(target_logits.argmax())
            return best == token, best
        return speculative_choice(self.probs(target_logits), draft_probs, token, self.generator)


def _runner(model: Any, max_len: int, options: RuntimeOptions, role: str) -> Any:
    from bitsmith.infer.lean import lean_runner

    runner = lean_runner(model, max_len, options)
    if runner is None:
        raise ValueError(f"speculative decoding needs bitsmith's lean KV-cache path for the {role} model, and "
                         f"{type(model).__name__} is outside it (run with -v for the reason); generate without --draft")
    return runner


def _check_pair(target: Any, draft: Any) -> None:
    vt = getattr(getattr(target, "config", None), "vocab_size", None)
    vd = getattr(getattr(draft, "config", None), "vocab_size", None)
    if vt != vd:
        raise ValueError(f"the draft's vocabulary ({vd} tokens) is not the target's ({vt}); a draft must be "
                         "a quantized copy of the same model")


def _round(target: Any, draft: Any, backlog: list[int], k: int, sampler: _Sampler,
           verify: Any = None, catch_up: Any = None) -> tuple[list[int], int, float]:
    """One draft-then-verify round. ``backlog``: committed tokens the draft has not yet seen (the last of
    them is also unseen by the target). ``verify`` / ``catch_up``: the fused verify step
    (:mod:`bitsmith.infer.verify`) of the target / the draft, or None for the runner's batched forward.
    Returns the tokens emitted (accepted drafts + one from the target), how many drafts were accepted,
    and the seconds spent drafting."""
    start = time.perf_counter()
    proposals: list[int] = []
    draft_probs: list[Tensor | None] = []
    if catch_up is not None and 1 < len(backlog) <= catch_up.max_rows:  # after a round with every draft kept
        logits = catch_up(draft, backlog)[-1]
    else:
        logits = draft(backlog)
    for i in range(k):
        probs = sampler.probs(logits)
        proposals.append(sampler.draw(logits, probs))
        draft_probs.append(probs)
        if i + 1 < k:
            logits = draft([proposals[-1]])
    draft_s = time.perf_counter() - start
    checked = [backlog[-1], *proposals]
    rows = target(checked, all_logits=True) if verify is None else verify(target, checked)  # [k + 1, V]
    emitted: list[int] = []
    for i, token in enumerate(proposals):
        ok, chosen = sampler.check(rows[i], draft_probs[i], token)
        emitted.append(chosen)
        if not ok:
            break
    else:
        emitted.append(sampler.draw(rows[k], sampler.probs(rows[k])))  # every draft kept: the bonus token
    return emitted, len(emitted) - 1, draft_s


@dataclass
class DraftCursor:
    """A draft runner beside a target runner. ``backlog``: committed tokens the draft has not seen yet; its
    last one is the newest committed token, which the target has not seen either (the target's cache holds
    every committed token but that one). A caller that advances the target without the draft (a plain
    decode step) appends the token it produced to ``backlog``."""

    runner: Any
    backlog: list[int]
    verifier: Any = None  # the target's fused verify step, looked up in the first round (False: none)
    catch_up: Any = None  # the draft's, for its backlog of 2 tokens after a round with every draft kept


def speculate(t_run: Any, cursor: DraftCursor, k: int, temperature: float, top_p: float,
              generator: torch.Generator) -> tuple[list[int], int]:
    """One draft-then-verify round on a target runner and its draft cursor; both caches are rolled back
    past the first rejected draft. Returns the committed tokens (1 to k + 1; the last is again unseen by
    the target) and how many drafts were accepted. The target's cache needs k + 1 free positions."""
    emitted, kept, _ = _advance(t_run, cursor, k, _Sampler(temperature, top_p, generator))
    return emitted, kept


def _advance(t_run: Any, cursor: DraftCursor, k: int, sampler: _Sampler) -> tuple[list[int], int, float]:
    """:func:`speculate` with the sampler given; also returns the seconds spent drafting."""
    t_pos, d_pos = t_run.pos, cursor.runner.pos
    if cursor.verifier is None:
        cursor.verifier = fused_verifier(t_run) or False
        cursor.catch_up = fused_verifier(cursor.runner) or False
    emitted, kept, draft_s = _round(t_run, cursor.runner, cursor.backlog, k, sampler, cursor.verifier or None,
                                    cursor.catch_up or None)
    t_run.pos = t_pos + 1 + kept  # roll back: drop the rejected drafts' cache rows
    if kept < k:
        cursor.runner.pos = d_pos + len(cursor.backlog) + kept
        cursor.backlog = [emitted[-1]]
    else:  # the draft never saw its own last proposal
        cursor.backlog = emitted[-2:]
    return emitted, kept, draft_s


def speculative_generate(
    target: Any,
    draft: Any,
    tokenizer: Any,
    prompt: str,
    *,
    k: int = 4,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat: bool = False,
    on_token: Callable[[str], None] | None = None,
    stop_at_eos: bool = True,
    options: RuntimeOptions | None = None,
) -> SpeculativeResult:
    """Continue ``prompt`` as :func:`bitsmith.infer.generate.generate` would with ``target`` (same
    arguments and result), the ``draft`` proposing ``k`` tokens per target forward. Greedy output is the
    target's own; sampled output has the target's distribution (module docstring)."""
    if not 1 <= k <= MAX_DRAFT_TOKENS:
        raise ValueError(f"the draft proposes 1 to {MAX_DRAFT_TOKENS} tokens per step (--draft-k), got {k}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 with a draft, got {max_new_tokens}")
    check_sampling(temperature, top_p)
    _check_pair(target, draft)
    ids = prompt_token_ids(tokenizer, prompt, chat)
    if not ids:
        raise ValueError("the prompt encodes to no tokens (and the tokenizer adds no BOS); give a non-empty prompt")
    check_generation_fits(getattr(target, "config", None), len(ids), max_new_tokens)  # before any work
    eos = eos_ids(target, tokenizer) if stop_at_eos else frozenset()
    sampler = _Sampler(temperature, top_p, seeded_generator(seed))
    stream = TextStream(tokenizer, on_token)
    options = RuntimeOptions.from_env() if options is None else options
    max_len = len(ids) + max_new_tokens + k + 1  # a last round may verify k tokens past the end
    with torch.inference_mode(), eval_mode(target), eval_mode(draft):
        t_run = _runner(target, max_len, options, "target")
        d_run = _runner(draft, max_len, options, "draft")
        start = time.perf_counter()
        logits = t_run(ids)  # the first new token comes from the target's prefill, as without a draft
        first = sampler.draw(logits, sampler.probs(logits))
        d_run(ids)
        prefill_s = time.perf_counter() - start
        stats = _decode(t_run, d_run, stream, first, k, max_new_tokens, eos, sampler)
    decode_s = max(stats.draft_s + stats.verify_s - stream.callback_s, 0.0)
    return SpeculativeResult(generation_result(stream, len(ids), prefill_s, decode_s), stats)


def _decode(t_run: Any, d_run: Any, stream: TextStream, first: int, k: int, max_new: int,
            eos: frozenset[int], sampler: _Sampler) -> SpeculativeStats:
    """Rounds until ``max_new`` tokens or an EOS. Invariant at each round's start: the target's cache
    holds every committed token but the last; the draft's all but ``backlog``."""
    stream.push(first)
    done, cursor = first in eos or max_new == 1, DraftCursor(d_run, [first])
    rounds = proposed = accepted = 0
    draft_s = 0.0
    start = time.perf_counter()
    while not done:
        emitted, kept, spent = _advance(t_run, cursor, k, sampler)
        rounds, proposed, accepted, draft_s = rounds + 1, proposed + k, accepted + kept, draft_s + spent
        for token in emitted:
            stream.push(token)
            if token in eos or len(stream.ids) == max_new:
                done = True
                break
    total = time.perf_counter() - start
    return SpeculativeStats(k, rounds, proposed, accepted, draft_s, max(total - draft_s, 0.0))
