"""Streaming statistics of a linear layer's inputs: the GPTQ Hessian H = sum_t x_t x_t^T and the
per-channel importance mean_t x_t^2 (AWQ / weighted clipping), accumulated batch by batch in float32.

The Hessian is a plain sum over tokens (``LayerStats.hessian``'s contract); importance is its
diagonal over the token count, so it costs nothing extra.
"""

from __future__ import annotations

import torch

from bitsmith.methods import LayerStats


class StatsAccumulator:
    """Accumulates X^T X over batches of inputs x [..., in] in float32."""

    def __init__(self, in_features: int) -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32)  # [in, in]
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
        # addmm into the fp32 sum: one pass, no [in, in] temporary per batch
        self.hessian.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def stats(self) -> LayerStats:
        importance = self.hessian.diagonal() / max(self.tokens, 1)  # [in], mean x^2
        return LayerStats(hessian=self.hessian, importance=importance.clone(), tokens=self.tokens)

