"""How many positions a model can attend over, and the one check that refuses work beyond it.

A model asked for positions past its ``max_position_embeddings`` does not fail: rotary models
extrapolate into garbage and learned-position models index past their table, so a perplexity or a
continuation comes back that means nothing. Every command that feeds a model a sequence (eval and
compare windows, generate's prompt plus new tokens, a server's request) calls :func:`check_context`
first, before any weights run. Torch-free.
"""
from __future__ import annotations

from typing import Any

__all__ = ["ContextLengthError", "check_context", "check_generation_fits", "context_length"]


class ContextLengthError(ValueError):
    """A request for more positions than the model's context holds; the message names both numbers
    and the fix."""


def context_length(config: Any) -> int | None:
    """The model's context in tokens: ``max_position_embeddings`` of its config (gpt2's
    ``n_positions`` answers to that name too); None when the config does not say."""
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def check_context(config: Any, needed: int, what: str, fix: str) -> None:
    """Refuse ``needed`` positions beyond the context of the model ``config`` describes.

    ``what`` says what asks for them (``"--ctx 9000"``), ``fix`` what to do instead; ``{limit}`` in
    ``fix`` is replaced by the context length. A config without a context length is not checked.
    """
    limit = context_length(config)
    if limit is not None and needed > limit:
        raise ContextLengthError(
            f"{what} needs {needed:,} positions but the model's context is {limit:,} tokens "
            f"(max_position_embeddings in its config); {fix.replace('{limit}', str(limit))}"
        )


def check_generation_fits(config: Any, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a generation whose prompt plus new tokens would run past the model's context, saying
    how many new tokens fit after this prompt (none: the prompt alone is too long)."""
    limit = context_length(config)
    if limit is None or prompt_tokens + max_new_tokens <= limit:
        return
    room = limit - prompt_tokens
    fix = (f"at most {room:,} new tokens fit after this prompt: pass --max-new-tokens {room} or less, "
           "or shorten the prompt") if room > 0 else "the prompt alone fills it: shorten the prompt"
    check_context(config, prompt_tokens + max_new_tokens,
                  f"the prompt ({prompt_tokens:,} tokens) plus {max_new_tokens:,} new tokens", fix)
