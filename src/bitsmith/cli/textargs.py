"""Arguments that `bitsmith eval` and `bitsmith compare` share: the reference cache, the window
length and how much of each text to score. Torch-free, so ``--help`` stays fast."""

from __future__ import annotations

import argparse

from bitsmith.eval.protocol import MAX_CHARS

CACHE_HELP = (
    "score against a top-k reference cache in folder DIR (one file per domain): built from --reference "
    "when absent, reused when present (the reference is then not loaded at all), refused with an error "
    "when it was built for another reference, tokenizer, text or ctx. KL from the cache is a lower bound: "
    "at top-k 256 it measured -7.6%% (w8) and -4.7%% (w3g128) of the exact mean KLD on SmolLM2-135M prose, "
    "-4.2%% / -1.9%% on code; ppl and top-1 are exact"
)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_cache_arguments(p: argparse.ArgumentParser) -> None:
    """--reference-cache and --cache-topk."""
    p.add_argument("--reference-cache", metavar="DIR", help=CACHE_HELP)
    p.add_argument("--cache-topk", type=positive_int, default=256, metavar="K",
                   help="reference log-probs kept per position when building a cache (default 256, ~1.5 KB/token)")


def add_window_arguments(p: argparse.ArgumentParser, unit: str) -> None:
    """--ctx, --max-windows (counted per ``unit``: "text" or "domain") and --max-chars."""
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--max-windows", type=positive_int, default=None, help=f"score only the first N windows of each {unit}")
    p.add_argument("--max-chars", type=int, default=MAX_CHARS, help=f"use the first N characters of each text (default {MAX_CHARS:,}, as docs/PROTOCOL.md)")
