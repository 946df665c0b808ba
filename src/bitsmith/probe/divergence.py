"""Distances between the reference's full next-token distribution and a model seen only through its top k.

An endpoint returns, per position, the log-probabilities of its own k most likely tokens. With ``S`` those
tokens (the ones the reference tokenizer can name), the reference ``p`` and the endpoint ``q``:

    KL~ = sum_{i in S} p_i (log p_i - log q_i) + p_R (log p_R - log q_R),
    p_R = 1 - sum_S p_i,  q_R = 1 - sum_S q_i,

KL(p || q) with every token outside ``S`` merged into one bucket. Merging outcomes never increases a KL
divergence (log-sum inequality), so KL~ is a **lower bound** of the true KL, equal to it when ``S`` is the
whole vocabulary. The ladder's rungs go through exactly the same truncation (their own top k), so the
endpoint and the rungs are compared like for like, and the bound's slack (largest, relatively, for the
best quantizations; see :mod:`bitsmith.eval.refcache`) affects both sides alike.

Everything here is pure tensor arithmetic in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["MISSING", "bootstrap_means", "topk_kl", "topk_of"]

MISSING = -1  # a top-k slot whose token the reference tokenizer cannot name (its mass joins the rest)
_TINY = 1e-12  # floor of a rest mass that rounding pushed to zero or below


def topk_of(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """A model's own top ``k``: (ids [N, k] int64, log-probs [N, k] float64) from logits [N, V]."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return ids, values


def topk_kl(ref_logp: Tensor, ids: Tensor, logq: Tensor) -> Tensor:
    """Per-position KL~ [N] (module docstring) of reference log-probs ``ref_logp`` [N, V] against the
    top-k ``ids`` [N, k] (``MISSING`` for unnamed slots; no id twice in a row) with log-probs ``logq`` [N, k]."""
    if ids.shape != logq.shape or ids.dim() != 2 or ids.shape[0] != ref_logp.shape[0]:
        raise ValueError(f"shapes do not match: reference {tuple(ref_logp.shape)}, ids {tuple(ids.shape)}, "
                         f"log-probs {tuple(logq.shape)}")
    known = ids != MISSING  # [N, k]
    ref = torch.log_softmax(ref_logp.double(), dim=-1)  # normalised whatever was passed
    logp_s = ref.gather(1, ids.clamp_min(0).long())  # [N, k]
    logq = logq.double()
    p_s = torch.where(known, logp_s.exp(), 0.0)
    head = torch.where(known, p_s * (logp_s - logq), 0.0).sum(1)  # [N]
    # the reference's mass outside S summed directly (not 1 - sum_S p: that cancels when S covers nearly all)
    in_s = torch.zeros_like(ref, dtype=torch.bool).scatter_(1, torch.where(known, ids, 0).long(), known)
    p_rest = ref.exp().masked_fill(in_s, 0.0).sum(1)
    covered = torch.logsumexp(torch.where(known, logq, -torch.inf), dim=1)  # log sum_S q
    q_rest = (-torch.expm1(covered.clamp(max=0.0))).clamp_min(_TINY)  # 1 - sum_S q without cancellation
    tail = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(_TINY).log() - q_rest.log()), 0.0)
    return (head + tail).clamp_min(0.0)  # rounding of the returned log-probs can dip a hair below 0


def bootstrap_means(columns: Sequence[Tensor], resamples: int = 1000, seed: int = 0) -> Tensor:
    """Means of each per-position column [N] over ``resamples`` resamplings of the positions, the same
    resampled positions for every column (paired): [resamples, len(columns)] float64."""
    if not columns:
        raise ValueError("bootstrap needs at least one column")
    data = torch.stack([c.double() for c in columns], dim=1)  # [N, C]
    n = data.shape[0]
    if n == 0:
        raise ValueError("bootstrap needs at least one position")
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, resamples, 100):  # 100 resamples at a time: [100, N, C] floats alive at most
        idx = torch.randint(0, n, (min(100, resamples - start), n), generator=g)  # [b, N]
        out.append(data[idx].mean(dim=1))  # [b, C]
    return torch.cat(out)
