"""Calibration windows written by the reference model itself (LLM-QAT's data-free distillation,
Liu et al. 2023): ``samples`` sequences of ``seq_len`` tokens sampled from the unquantized model.

Why: distilling on one calibration text fits that text. On SmolLM2-135M at 2 bits the end-to-end
stage cut the calibration KL by 64% but the held-out prose KL by 30% (bench/results/low-bit, sessions
13-16); drawing the windows across the whole text did not change that, so the genre, not the
window, limits. The model's own samples follow the distribution the KL is taken against.

Each sequence starts at the tokenizer's BOS token (else its EOS, as a document separator) and every
later token is drawn from the model's full next-token distribution at temperature 1 (no top-k or
top-p: a truncated sampler would under-represent the tail the KL also counts), with the
end-of-sequence ids masked so every window is full length. Seeded, one generator per sequence, so the
windows do not depend on how many are sampled together (:func:`sample_windows`).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

GENERATED = "generated"  # the --calib value that selects this source


def start_token(tokenizer: Any) -> int:
    """The first token of every generated window: BOS, else EOS (a document boundary)."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start generated calibration text from; "
                     "pass --calib with a text file instead")


def cache_keyword(model: torch.nn.Module) -> str:
    """The name transformers gives the KV cache, in and out: ``cache`` from 5.x, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


SAMPLE_BATCH = 64  # sequences sampled together: the draws do not depend on it (one generator per sequence);
# SmolLM2-135M at 2 threads: 64 x 512 tokens in 189 s; 16 at a time, 16 x 512 took 76 s (so ~304 s for 64)
# (bench/results/low-bit, session 30)


@torch.no_grad()
def sample_windows(model: torch.nn.Module, tokenizer: Any, samples: int, seq_len: int, seed: int = 0,
                   batch: int = SAMPLE_BATCH, banned: frozenset[int] = frozenset()) -> torch.Tensor:
    """``samples`` x ``seq_len`` token ids sampled from ``model`` (a causal LM returning ``.logits``
    and taking a KV cache), ``batch`` sequences at a time; ``banned`` ids (the end-of-sequence ones)
    are never drawn. Sequence ``i`` draws from its own generator seeded with ``(seed, i)``, so the
    windows do not depend on ``batch`` (only on the model's logits). long [samples, seq_len]."""
    if samples < 1 or seq_len < 2:
        raise ValueError(f"need at least 1 generated window of at least 2 tokens, got {samples} x {seq_len}")
    first = start_token(tokenizer)
    key = cache_keyword(model)
    out = torch.empty(samples, seq_len, dtype=torch.long)
    out[:, 0] = first
    masked = torch.tensor(sorted(banned), dtype=torch.long)  # once, not per sampled token
    for lo in range(0, samples, batch):
        log.info("sampling calibration windows %d-%d of %d (%d tokens each) from the reference", lo + 1,
                 min(lo + batch, samples), samples, seq_len)
        gens = [torch.Generator().manual_seed(sequence_seed(seed, i)) for i in range(lo, min(lo + batch, samples))]
        ids = torch.full((len(gens), 1), first, dtype=torch.long)
        past = None
        for pos in range(1, seq_len):
            result = model(input_ids=ids, use_cache=True, **{key: past})
            logits = result.logits[:, -1, :].float()
            if masked.numel():
                logits[:, masked] = float("-inf")
            probs = torch.softmax(logits, dim=-1)
            ids = torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, gens)])[:, None]
            out[lo : lo + len(gens), pos] = ids[:, 0]
            past = getattr(result, key)
    return out


def sequence_seed(seed: int, index: int) -> int:
    """The seed of generated sequence ``index`` under the run's ``seed`` (distinct pairs give distinct seeds
    while index < 1,000,003)."""
    return (seed * 1_000_003 + index) % (2**63)
