"""What distillation keeps of the reference model's predictions on the calibration tokens.

Over a vocabulary up to ``DistillConfig.ref_topk_above`` wide: every log-probability, float16
(``logp`` [S, T, V]); the loss is the exact KL(p_ref || q). Over a wider one (Gemma-3's 262,144
tokens: 512 KB a token in float16, 8.6 GB for 32 x 512 calibration tokens) only the reference's
``ref_topk`` largest log-probabilities, their ids and the log of the mass outside them (``logp``
[S, T, k], ``ids``, ``rest`` [S, T]: ~1.5 KB a token at k = 256), the same statistics and the same
estimator as ``bitsmith eval --reference-cache`` (:mod:`bitsmith.eval.refcache`): KL~ treats the k
tokens as singletons and the rest as one bucket, a lower bound of the KL (the log-sum inequality),
exact when k = V. Its gradient pulls the k tokens' probabilities and the tail's total towards the
reference's, and leaves how the tail's mass is split among its tokens free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bitsmith.eval.refcache import kl_from_top, topk_and_rest

REF_LOGP_DTYPE = torch.float16


def kl_loss(logits: Tensor, ref_logp: Tensor) -> Tensor:
    """Mean over positions of KL(p_ref || q), from quantized logits [.., V] and reference log-probs
    (any float dtype; the sum is in float32)."""
    logq = F.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])
    ref = ref_logp.reshape(-1, ref_logp.shape[-1]).float()
    return F.kl_div(logq, ref, log_target=True, reduction="sum") / ref.shape[0]


def topk_kl_loss(logits: Tensor, top_logp: Tensor, top_ids: Tensor, rest_logp: Tensor) -> Tensor:
    """Mean over positions of KL~(p_ref || q) (module docstring) from quantized logits [.., V] and the
    reference's top-k log-probs, ids [.., k] and rest mass [..]. The model's log-probabilities are
    ``logit - logsumexp`` at the k ids only: no [.., V] log-softmax is kept for the backward pass."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    lse = torch.logsumexp(flat, dim=-1, keepdim=True)  # [N, 1]
    ids = top_ids.reshape(flat.shape[0], -1).long()
    logq_top = (flat.gather(-1, ids) - lse).double()  # [N, k]
    per_position = kl_from_top(logq_top, top_logp.reshape(ids.shape), rest_logp.reshape(-1))
    return per_position.sum() / flat.shape[0]


@dataclass(frozen=True)
class ReferenceTargets:
    """The reference's log-probabilities per calibration token: the whole vocabulary (``ids`` None)
    or its top k with the rest mass (module docstring). Sliced along the samples like a tensor."""

    logp: Tensor  # [S, T, V] or [S, T, k], float16
    ids: Tensor | None = None  # [S, T, k] int32 with top k
    rest: Tensor | None = None  # [S, T] float32 log(1 - sum_k p_i) with top k

    def __getitem__(self, rows: slice) -> ReferenceTargets:
        return ReferenceTargets(self.logp[rows], None if self.ids is None else self.ids[rows],
                                None if self.rest is None else self.rest[rows])

    def kl(self, logits: Tensor) -> Tensor:
        """The distillation loss of quantized ``logits`` [B, T, V] against these targets."""
        if self.ids is None:
            return kl_loss(logits, self.logp)
        return topk_kl_loss(logits, self.logp, self.ids, self.rest)


class TargetStore:
    """Fills :class:`ReferenceTargets` in place, one batch of reference logits at a time (no
    ``torch.cat`` copy); ``topk`` None keeps the whole vocabulary."""

    def __init__(self, shape: tuple[int, int], topk: int | None) -> None:
        self.shape, self.topk, self.targets = shape, topk, None

    def add(self, start: int, logits: Tensor) -> None:
        logp = F.log_softmax(logits.float(), dim=-1)  # [B, T, V]
        if self.targets is None:
            self.targets = self._empty(logp.shape[-1])
        stop = start + logp.shape[0]
        if self.targets.ids is None:
            self.targets.logp[start:stop] = logp
            return
        values, ids, rest = topk_and_rest(logp, self.topk)
        self.targets.logp[start:stop], self.targets.ids[start:stop], self.targets.rest[start:stop] = values, ids, rest

    def _empty(self, vocab: int) -> ReferenceTargets:
        if self.topk is None or self.topk >= vocab:
            self.topk = None
            return ReferenceTargets(torch.empty(*self.shape, vocab, dtype=REF_LOGP_DTYPE))
        return ReferenceTargets(torch.empty(*self.shape, self.topk, dtype=REF_LOGP_DTYPE),
                                torch.empty(*self.shape, self.topk, dtype=torch.int32),
                                torch.empty(*self.shape, dtype=torch.float32))
