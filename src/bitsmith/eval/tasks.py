"""Run the model-agnostic task suites (HumanEval pass@1, the reasoning probe) on a loaded model.

:mod:`bitsmith.eval.humaneval` and :mod:`bitsmith.eval.reasoning` take a
``complete(prompt, max_new_tokens, stop) -> str`` callable; this module builds it from a model and
its tokenizer with :func:`bitsmith.infer.generate.generate` (greedy, KV cache): the prompt is sent
as is, or for instruct models (``chat=True``) as one user message in the tokenizer's chat template.
Stop strings are checked on the decoded text after every new token, and the reply is cut at the
first one, so a base model stops at the next top-level ``def`` instead of running to the budget.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["make_complete", "TasksResult", "run_tasks", "has_chat_template"]

log = logging.getLogger(__name__)

Complete = Callable[[str, int, list[str]], str]


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
) -> TasksResult:
    """HumanEval pass@1 on the first ``humaneval_limit`` problems (skipped when ``None``; 0 means
    all 164) and the reasoning probe with ``n_per_family`` tasks per family and level (skipped
    when ``None``). ``progress(suite, done, total)`` after each problem or task."""
    from bitsmith.eval import humaneval, reasoning

    he = probe = None
    if humaneval_limit is not None:
        problems = humaneval.load_problems(humaneval_limit or None)
        he = humaneval.pass_at_1(complete, problems, chat=chat, max_new_tokens=max_new_tokens,
                                 progress=(lambda d, t: progress("humaneval", d, t)) if progress else None)
    if n_per_family is not None:
        tasks = reasoning.make_tasks(n_per_family)
        probe = reasoning.run_probe(complete, tasks, progress=(lambda d, t: progress("reasoning", d, t)) if progress else None)
    return TasksResult(model_name, chat, he, probe)
