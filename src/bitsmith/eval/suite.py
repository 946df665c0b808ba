"""Evaluate several variants of one model against its reference in a single pass over the windows:
the reference runs once per window and every variant is scored against those logits."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any, Callable

import torch

from bitsmith.eval.metrics import EvalResult, TokenStats, summarize, token_stats
from bitsmith.eval.perplexity import convention_adds_bos, eval_mode, tokenize_text, window_logits, windows
from bitsmith.io.textfile import read_text_file

DEFAULT_TEXT = "pride_and_prejudice_60k.txt"


def shipped_text(name: str = DEFAULT_TEXT) -> str:
    """A public-domain text that ships inside the package (see bitsmith/data/README.md)."""
    return files("bitsmith").joinpath("data", name).read_text(encoding="utf-8")


def read_text(path: str | Path | None) -> str:
    if path is None:
        return shipped_text()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {p} does not exist; pass --text with a readable file")
    return read_text_file(p)


def text_windows(tokenizer: Any, text: str, ctx: int, max_windows: int | None = None) -> torch.Tensor:
    """Evaluation windows [n, ctx] of ``text``; for tokenizers whose convention starts with BOS,
    every window starts with BOS (docs/PROTOCOL.md: "no extra BOS unless the model's convention needs it")."""
    bos = tokenizer.bos_token_id if convention_adds_bos(tokenizer) else None
    w = windows(tokenize_text(tokenizer, text, add_bos=False), ctx, bos=bos)  # [n, ctx]
    return w[:max_windows] if max_windows else w


def evaluate_variants(
    reference: Any | None,
    variants: dict[str, Any],
    wins: torch.Tensor,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, EvalResult]:
    """Score each variant on ``wins`` [n, ctx]; with a reference, KL/top-1 against it too, and the
    reference itself under the key ``"reference"``. One window's logits per model are alive at a time."""
    stats: dict[str, list[TokenStats]] = {name: [] for name in variants}
    if reference is not None:
        stats["reference"] = []
    n, ctx = wins.shape
    with torch.inference_mode(), eval_mode(reference, *variants.values()):
        for i, window in enumerate(wins):
            targets = window[1:]
            ref_logits = None
            if reference is not None:
                ref_logits = window_logits(reference, window)[:-1]  # [ctx-1, V]
                stats["reference"].append(token_stats(None, ref_logits, targets))
            for name, model in variants.items():
                logits = window_logits(model, window)[:-1]
                stats[name].append(token_stats(ref_logits, logits, targets))
                del logits
            if progress:
                progress((i + 1) * ctx, n * ctx)
    return {name: summarize(s) for name, s in stats.items()}
