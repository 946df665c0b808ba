"""Per-token quality metrics of a (quantized) model against a reference model.

Pure maths on logits; no models, files or printing here. The definitions follow
``docs/PROTOCOL.md`` so that every number in the project compares with every other:

- NLL of the true next token ``y_t``:           ``-log q(y_t)``  (q = model softmax);
- perplexity:                                   ``exp(mean_t NLL_t)``;
- KL divergence of the reference p from q:      ``KL(p || q) = sum_v p_v (log p_v - log q_v)``,
  natural log, one value per position;
- top-1 agreement:                              ``argmax p == argmax q`` per position;
- change in the probability of the true token:  ``q(y_t) - p(y_t)`` (negative: the model
  became less sure of the right answer), from the two NLLs.

Logits may span a 152k vocabulary, so every quantity is computed over blocks of ``chunk``
rows: at most ``chunk x V`` float32 log-probabilities are alive per model at a time, beyond the
input logits themselves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bitsmith.kernels.score import row_lse_argmax

__all__ = ["TokenStats", "EvalResult", "kl_rows", "token_stats", "summarize"]


@dataclass(frozen=True)
class TokenStats:
    """Per-position statistics of one scored sequence (T positions).

    ``nll`` is always present; the three reference fields are ``None`` when no reference
    logits were given.
    """

    nll: Tensor  # [T] float64, -log q(target)
    kld: Tensor | None = None  # [T] float64, KL(ref || model)
    top1: Tensor | None = None  # [T] bool, argmax(ref) == argmax(model)
    ref_nll: Tensor | None = None  # [T] float64, -log p(target)

    @property
    def tokens(self) -> int:
        return int(self.nll.numel())


@dataclass(frozen=True)
class EvalResult:
    """Summary of a whole evaluation (all windows).

    KL, top-1 and reference-ppl fields are ``None`` when no reference model was used.
    """

    ppl: float
    tokens: int
    kld_mean: float | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    top1: float | None = None
    ref_ppl: float | None = None
    dprob_mean: float | None = None  # mean of q(target) - p(target)

    def as_dict(self) -> dict[str, Any]:
        """The JSON contract: ``ppl`` and ``tokens`` always; reference metrics when present."""
        out: dict[str, Any] = {"ppl": self.ppl, "tokens": self.tokens}
        for key in ("kld_mean", "kld_median", "kld_p99", "top1", "ref_ppl", "dprob_mean"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


def _check_shapes(ref_logits: Tensor | None, logits: Tensor, targets: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(
            f"logits must be [positions, vocab], got shape {tuple(logits.shape)}; "
            "drop the batch dimension (logits[0]) before scoring"
        )
    if targets.shape != logits.shape[:1]:
        raise ValueError(
            f"targets have shape {tuple(targets.shape)} but logits have {logits.shape[0]} "
            "positions; pass one target token id per logits row"
        )
    if ref_logits is not None and ref_logits.shape != logits.shape:
        raise ValueError(
            f"reference logits {tuple(ref_logits.shape)} and model logits "
            f"{tuple(logits.shape)} differ; both models must share the tokenizer and windows"
        )


def kl_rows(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) per row [c] (float64) from log-probabilities [c, V], with 0 * log 0 = 0.

    ``sum p * (log p - log q)`` in four passes over the rows (exp, subtract, multiply in place, sum):
    the float32 sum is torch's cascade summation (error ~1e-7 of the sum of |terms|), where summing
    float64 copies cost as much as everything else (PROTOCOL's KL over a 152k vocabulary is a
    third of a window's scoring time otherwise). A row where the reference gives a token no mass
    (log p = -inf, so 0 * -inf = nan) is summed again with those terms set to zero explicitly.
    """
    p = logp.exp()  # [c, V]
    kl = (logp - logq).mul_(p).sum(-1)  # [c] float32
    bad = torch.isnan(kl)
    if bool(bad.any()):
        lp, lq = logp[bad], logq[bad]  # [b, V]: the rows with masked tokens only
        terms = (lp - lq).mul_(lp.exp()).masked_fill_(torch.isneginf(lp), 0.0)
        kl = kl.double()
        kl[bad] = terms.sum(-1, dtype=torch.float64)
    return kl.double()


def token_stats(
    ref_logits: Tensor | None, logits: Tensor, targets: Tensor, chunk: int = 128
) -> TokenStats:
    """Score ``logits`` [T, V] against ``targets`` [T] (and ``ref_logits`` [T, V] if given).

    Rows are processed ``chunk`` at a time, with log-softmax in float32; the per-position KL is
    summed over the vocabulary as :func:`kl_rows` says, and everything is returned in float64.
    """
    _check_shapes(ref_logits, logits, targets)
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}")
    targets = targets.to(device=logits.device, dtype=torch.long)
    if ref_logits is None and logits.shape[0]:
        native = row_lse_argmax(logits)  # the log-normaliser alone: no [T, V] log-softmax written
        if native is not None:
            return TokenStats(nll=(native[0] - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()).cpu())
    nll, kld, top1, ref_nll = [], [], [], []
    for start in range(0, logits.shape[0], chunk):
        rows = slice(start, start + chunk)
        logq = torch.log_softmax(logits[rows].float(), dim=-1)  # [c, V]
        tgt = targets[rows].unsqueeze(-1)  # [c, 1]
        nll.append(-logq.gather(-1, tgt).squeeze(-1).double())
        if ref_logits is None:
            continue
        logp = torch.log_softmax(ref_logits[rows].to(logq.device).float(), dim=-1)  # [c, V]
        kld.append(kl_rows(logp, logq))
        # max(dim) rather than argmax: the same first index on ties, measured faster on the CPU
        top1.append(logp.max(-1).indices == logq.max(-1).indices)
        ref_nll.append(-logp.gather(-1, tgt).squeeze(-1).double())
    if not nll:  # zero positions: keep shapes well-defined
        empty = torch.zeros(0, dtype=torch.float64)
        has_ref = ref_logits is not None
        return TokenStats(
            nll=empty,
            kld=empty if has_ref else None,
            top1=torch.zeros(0, dtype=torch.bool) if has_ref else None,
            ref_nll=empty if has_ref else None,
        )
    if ref_logits is None:
        return TokenStats(nll=torch.cat(nll).cpu())
    return TokenStats(
        nll=torch.cat(nll).cpu(),
        kld=torch.cat(kld).cpu(),
        top1=torch.cat(top1).cpu(),
        ref_nll=torch.cat(ref_nll).cpu(),
    )


def summarize(stats: list[TokenStats]) -> EvalResult:
    """Pool the per-position statistics of many sequences into one :class:`EvalResult`."""
    if not stats:
        raise ValueError("no scored sequences to summarize; evaluate at least one window")
    nll = torch.cat([s.nll for s in stats])  # [N] float64
    if nll.numel() == 0:
        raise ValueError("no scored positions to summarize; windows need at least 2 tokens")
    ppl = math.exp(float(nll.mean()))
    with_ref = [s.kld is not None for s in stats]
    if not any(with_ref):
        return EvalResult(ppl=ppl, tokens=int(nll.numel()))
    if not all(with_ref):
        raise ValueError(
            "some sequences were scored with a reference and some without; "
            "score all of them the same way"
        )
    kld = torch.cat([s.kld for s in stats if s.kld is not None]).numpy()  # [N]
    top1 = torch.cat([s.top1 for s in stats if s.top1 is not None])  # [N] bool
    ref_nll = torch.cat([s.ref_nll for s in stats if s.ref_nll is not None])  # [N]
    # numpy rather than torch.quantile: the latter refuses inputs above 16M elements.
    return EvalResult(
        ppl=ppl,
        tokens=int(nll.numel()),
        kld_mean=float(kld.mean()),
        kld_median=float(np.median(kld)),
        kld_p99=float(np.percentile(kld, 99)),
        top1=float(top1.double().mean()),
        ref_ppl=math.exp(float(ref_nll.mean())),
        dprob_mean=float((torch.exp(-nll) - torch.exp(-ref_nll)).mean()),
    )
