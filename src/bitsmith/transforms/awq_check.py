"""AWQ's block-level acceptance: a scale fold or a clip is kept only when it does not raise the
quantized block's output error, so on the check tokens the transform is never worse than the plain
method on the block's output.

Why. Every AWQ search optimises a local proxy: a group's scale the error of its linears' outputs (or
of the attention's), a clip each linear's own output error. On Qwen2.5-Coder-1.5B the proxies and the
block disagree: in block 1 the searched scales alone, and the clips alone, each left the quantized
block's output error ~2x *above* plain RTN's on the very tokens they were searched on, and the
model's KLD ended above RTN's (bench/results/calibrated-methods, session 12). The block's own output
is the objective the proxies stand for; measuring it takes one quantized block forward per
decision, ~10 per block.

How. The float block's output on a few search sequences (the check tokens) is the reference. The
error of a state is that of the block with every linear replaced by its simulated quantization
(cached per linear; a decision re-quantizes only the linears it changed), as the sum of two ratios
to the plain method's: the mean over tokens of ``||y_q - y||^2 / ||y||^2`` (per token relative: the
next block reads the residual stream through a norm) and the plain mean squared error (on Qwen's
early blocks presumably dominated by the few massive-activation tokens). In Qwen block 1, session
11's AWQ lowered the first by 19% and raised the second 7x, and the model's KLD rose on both texts;
a change must not raise the sum. Decisions are greedy in the transform's order (folds, then clips):
a change is kept if the error does not rise, else its tensors are restored bit for bit.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

Qdq = Callable[[torch.Tensor], torch.Tensor]  # float32 weight -> its simulated quantization


def block_errors(output: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(mean over tokens of ``||output_t - reference_t||^2 / ||reference_t||^2``, mean squared error),
    for outputs [..., hidden]."""
    diff = (output.float() - reference.float()).pow(2)
    num = diff.sum(-1)
    den = reference.float().pow(2).sum(-1).clamp_min(1e-30)
    return float((num / den).mean()), float(diff.mean())


class BlockCheck:
    """The quantized block's output error on fixed check tokens, and greedy keep-or-restore steps.

    ``forward()`` runs the block on the check tokens (the caller's closure: hidden states, kwargs,
    autocast); ``reference`` is the float block's output there, which folds leave unchanged."""

    def __init__(self, linears: dict[str, nn.Linear], qdq: Qdq, forward: Callable[[], torch.Tensor],
                 reference: torch.Tensor) -> None:
        self.linears, self.qdq, self.forward, self.reference = linears, qdq, forward, reference
        self._quantized: dict[str, torch.Tensor] = {}
        self.evaluations = 0
        self.plain = (1.0, 1.0)
        self.plain = self._measure()  # the plain method's (relative, squared) errors: the units of error
        self.current = self.plain  # the kept state's (relative, squared) errors
        self.error = 2.0  # the kept state's error in those units (the plain method: 1 + 1)

    def _measure(self) -> tuple[float, float]:
        for name, linear in self.linears.items():
            if name not in self._quantized:
                self._quantized[name] = self.qdq(linear.weight.detach().float()).to(linear.weight.dtype)
        masters = {name: linear.weight.data for name, linear in self.linears.items()}
        try:  # swap the quantized tensors in (no copies), and the masters back whatever happens
            for name, linear in self.linears.items():
                linear.weight.data = self._quantized[name]
            with torch.no_grad():
                out = self.forward()
        finally:
            for name, linear in self.linears.items():
                linear.weight.data = masters[name]
        self.evaluations += 1
        return block_errors(out, self.reference)

    def units(self, errors: tuple[float, float]) -> float:
        """``errors`` as the sum of their ratios to the plain method's (the plain method: 2.0)."""
        return sum(e / max(p, 1e-30) for e, p in zip(errors, self.plain))

    def try_change(self, tensors: Iterable[torch.Tensor], changed: Iterable[str], apply: Callable[[], None]) -> bool:
        """Apply a change (``apply()``, which may write ``tensors`` in place and alters the weights of
        linears ``changed``); keep it if the quantized block's error falls, else restore ``tensors``
        exactly. Returns whether it was kept."""
        tensors = list(tensors)
        changed = [n for n in changed if n in self.linears]
        saved = [t.detach().clone() for t in tensors]
        old = {n: self._quantized.pop(n, None) for n in changed}
        with torch.no_grad():
            apply()
        errors = self._measure()
        if self.units(errors) <= self.error:  # a tie (e.g. an exact method: 0 = 0) keeps the change
            self.current, self.error = errors, self.units(errors)
            return True
        with torch.no_grad():
            for t, value in zip(tensors, saved):
                t.copy_(value)
        for name, value in old.items():
            self._quantized.pop(name, None)
            if value is not None:
                self._quantized[name] = value
        return False
