"""Run the model-agnostic task suites (HumanEval pass@1, the reasoning probe) on a loaded model.

:mod:`bitsmith.eval.humaneval` and :mod:`bitsmith.eval.reasoning` take a
``complete(prompt, max_new_tokens, stop) -> str`` callable; this module builds it from a model and
its tokenizer with :func:`bitsmith.infer.generate.generate` (greedy, KV cache): the prompt is sent
as is, or for instruct models (``chat=True``) as one user message in the tokenizer's chat template.
Stop strings are checked on the decoded text after every new token, and the reply is cut at the
first one, so a base model stops at the next top-level ``def`` instead of running to the budget.
:func:`make_complete_many` answers many prompts at once (HumanEval's 164): they decode together through
:func:`bitsmith.infer.batching.generate_many`, with the same replies as one at a time.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["make_complete", "make_complete_many", "TasksResult", "run_tasks", "has_chat_template"]

log = logging.getLogger(__name__)

Complete = Callable[[str, int, list[str]], str]
# complete_many(prompts, max_new_tokens, stop, on_done) -> replies in prompt order; on_done(index, reply) is
# called as each reply is ready (possibly out of order), so its tests can run while others still generate.
CompleteMany = Callable[[list[str], int, list[str], Callable[[int, str], None] | None], list[str]]


class _StopReached(Exception):
    """Raised from the token callback to end generation early at a stop string."""


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _find_stop(text: str, stop: str) -> int:
    """Where ``stop`` first occurs in ``text`` (-1: nowhere); the closing-fence stop of chat
    replies (:data:`bitsmith.eval.humaneval.FENCE_END`) counts only after an opening fence."""
    from bitsmith.eval.humaneval import FENCE_END

    if stop != FENCE_END:
        return text.find(stop)
    opening = text.find("```")
    return -1 if opening == -1 else text.find(stop, opening + 3)


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` up to its first stop string, and whether one was found."""
    hits = [i for i in (_find_stop(text, s) for s in stop if s) if i != -1]
    return (text[: min(hits)], True) if hits else (text, False)


def make_complete(model: Any, tokenizer: Any, chat: bool = False) -> Complete:
    """A greedy ``complete(prompt, max_new_tokens, stop) -> str`` for ``model``.

    The returned text excludes the prompt and ends before the first stop string. Generation
    ends at EOS, at ``max_new_tokens``, or as soon as the decoded reply contains a stop string.
    """
    from bitsmith.infer.generate import generate

    def complete(prompt: str, max_new_tokens: int, stop: list[str]) -> str:
        pieces: list[str] = []

        def on_token(piece: str) -> None:
            pieces.append(piece)
            if stop and cut_at_stop("".join(pieces), stop)[1]:
                raise _StopReached

        try:
            text = generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, chat=chat,
                            on_token=on_token if stop else None).text
        except _StopReached:
            text = "".join(pieces)
        return cut_at_stop(text, stop)[0]

    return complete


def make_complete_many(model: Any, tokenizer: Any, chat: bool = False, max_batch: int = 8,
                       options: Any | None = None, stats: Any | None = None) -> CompleteMany:
    """A greedy ``complete_many`` for ``model``: the prompts decode together with continuous batching
    (:func:`bitsmith.infer.batching.generate_many`), each reply cut at its first stop string as
    :func:`make_complete` cuts it. A model outside the lean inference path generates one prompt at a
    time through :func:`make_complete` instead (same replies, no batching). ``stats``: a
    :class:`bitsmith.infer.batching.BatchStats` that every call adds its counts to."""
    from bitsmith.infer.batching import generate_many
    from bitsmith.infer.generate import eos_ids, prompt_token_ids
    from bitsmith.models.context import check_generation_fits

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    def complete_many(prompts: list[str], max_new_tokens: int, stop: list[str],
                      on_done: Callable[[int, str], None] | None = None) -> list[str]:
        encoded = [prompt_token_ids(tokenizer, p, chat) for p in prompts]
        for ids in encoded:  # refuse a prompt that cannot fit before generating anything
            check_generation_fits(getattr(model, "config", None), len(ids), max_new_tokens)

        def stopped(_index: int, ids: list[int]) -> bool:
            return bool(stop) and cut_at_stop(decode(ids), stop)[1]

        def done(index: int, ids: list[int]) -> None:
            if on_done is not None:
                on_done(index, cut_at_stop(decode(ids), stop)[0])

        out = generate_many(model, encoded, max_new_tokens, eos=eos_ids(model, tokenizer), stopped=stopped,
                            on_done=done, max_batch=max_batch, options=options, stats=stats) if max_new_tokens > 0 else None
        if out is not None:
            return [cut_at_stop(decode(ids), stop)[0] for ids in out]
        one = make_complete(model, tokenizer, chat=chat)
        replies = []
        for index, prompt in enumerate(prompts):
            replies.append(one(prompt, max_new_tokens, stop))
            if on_done is not None:
                on_done(index, replies[-1])
        return replies

    return complete_many


@dataclass(frozen=True)
class TasksResult:
    """What ``bitsmith tasks`` measured; either suite may be absent."""

    model: str
    chat: bool
    humaneval: Any | None = None  # bitsmith.eval.humaneval.HumanEvalResult
    reasoning: Any | None = None  # bitsmith.eval.reasoning.ProbeResult

    def as_dict(self) -> dict[str, Any]:
        """The JSON contract of ``bitsmith tasks --json``."""
        out: dict[str, Any] = {"model": self.model, "chat": self.chat}
        if self.humaneval is not None:
            h = self.humaneval
            out["humaneval"] = {
                "n": h.n, "passed": h.passed, "pass_at_1": h.pass_at_1,
                "status": {s: sum(o.outcome.status == s for o in h.outcomes) for s in ("passed", "failed", "error", "timeout")},
            }
        if self.reasoning is not None:
            r = self.reasoning
            out["reasoning"] = {"n": r.n, "correct": r.correct, "accuracy": r.accuracy,
                                "by_family": dict(r.by_family), "by_level": {str(k): v for k, v in r.by_level.items()}}
        return out


def run_tasks(
    complete: Complete,
    model_name: str,
    chat: bool,
    humaneval_limit: int | None = None,
    n_per_family: int | None = None,
    max_new_tokens: int = 512,
    progress: Callable[[str, int, int], None] | None = None,
    complete_many: CompleteMany | None = None,
) -> TasksResult:
    """HumanEval pass@1 on the first ``humaneval_limit`` problems (skipped when ``None``; 0 means
    all 164) and the reasoning probe with ``n_per_family`` tasks per family and level (skipped
    when ``None``). ``progress(suite, done, total)`` after each problem or task. With ``complete_many``
    (:func:`make_complete_many`) HumanEval's problems decode together; the probe uses ``complete``."""
    from bitsmith.eval import humaneval, reasoning

    he = probe = None
    if humaneval_limit is not None:
        problems = humaneval.load_problems(humaneval_limit or None)
        he = humaneval.pass_at_1(None if complete_many else complete, problems, chat=chat, max_new_tokens=max_new_tokens,
                                 complete_many=complete_many,
                                 progress=(lambda d, t: progress("humaneval", d, t)) if progress else None)
    if n_per_family is not None:
        tasks = reasoning.make_tasks(n_per_family)
        probe = reasoning.run_probe(complete, tasks, progress=(lambda d, t: progress("reasoning", d, t)) if progress else None)
    return TasksResult(model_name, chat, he, probe)
