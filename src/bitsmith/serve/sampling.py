"""Per-request sampling, log-probabilities and text assembly for the server, as pure functions and
small value types; the scheduler (serve/scheduler.py) drives them once per token.

- token choice is :func:`bitsmith.infer.generate.sample_next` (greedy at temperature 0, else
  temperature + nucleus from a per-request generator), so the server samples exactly as ``generate``;
- log-probabilities are those of the model's distribution (``log_softmax`` of the raw logits, before
  temperature and nucleus), as OpenAI's API reports them; with ``top`` alternatives most likely first;
- :class:`TextTail` turns token ids into text pieces that concatenate to the final text, ends at the
  first stop string (which is not part of the text, as in OpenAI's API), and holds back any tail that
  may still grow into a stop string or into a multi-byte character.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bitsmith.infer.generate import sample_next

__all__ = ["SamplingParams", "TextTail", "TokenLogprob", "choose", "logprobs_of"]


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of generation (already validated by the schemas)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: no log-probabilities; k >= 0: the chosen token and k alternatives
    echo_logprobs: bool = False  # also the prompt's tokens (completions with echo and logprobs)


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token there, its log-probability, and the ``top`` most likely tokens."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def choose(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token from one row of logits [V]."""
    return sample_next(logits, params.temperature, params.top_p, generator)


def logprobs_of(logits: Tensor, tokens: Tensor, top: int) -> list[TokenLogprob]:
    """logits [T, V] predicting ``tokens`` [T] -> one :class:`TokenLogprob` per row, with ``top``
    alternatives (most likely first, ties by lower id)."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
    chosen = lp.gather(1, tokens.view(-1, 1).to(lp.device))[:, 0].tolist()  # [T]
    if top > 0:
        values, ids = torch.topk(lp, min(top, lp.shape[-1]), dim=-1, sorted=True)  # [T, k]
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(chosen)
    return [TokenLogprob(int(t), c, k) for t, c, k in zip(tokens.tolist(), chosen, tops)]


class TextTail:
    """Incremental detokenizer with stop strings.

    ``push(id)`` returns the text that became final with this token (possibly empty); ``stopped``
    turns True when the text reached a stop string, and ``text`` is then cut before it. The pieces
    concatenate to ``text``; call ``finish()`` after the last token for any held-back tail.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self.stopped = False

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        full = self._decoded()
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._advance(full[:cut])
        end = len(full)
        if full.endswith("\ufffd"):
            end = len(full.rstrip("\ufffd"))  # a character split across tokens: wait for the rest
        end -= self._stop_prefix(full[:end])
        return self._advance(full[:end])

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _advance(self, text: str) -> str:
        if not text.startswith(self.text) or len(text) <= len(self.text):
            return ""  # a later token rewrote emitted text (rare merges) or nothing new: hold
        piece = text[len(self.text) :]
        self.text = text
        return piece

    def finish(self) -> str:
        """The held-back tail once no token follows (a partial stop string is plain text then)."""
        if self.stopped:
            return ""
        return self._advance(self._decoded())
