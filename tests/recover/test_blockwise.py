"""The block stage's kept outputs: ``tune_block`` hands back the outputs of the block as kept (the
next block's inputs), which must equal running the kept block again (``next_inputs``, the oracle),
whether the steps were kept or undone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitsmith.recover.blockwise import next_inputs, tune_block


class Block(nn.Module):
    """A residual block with a norm-like scale, shaped like a decoder block's call (x, *args, **kwargs)."""

    def __init__(self, hidden: int, gen: torch.Generator) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(hidden, hidden, generator=gen) / hidden ** 0.5)
        self.norm = nn.Parameter(torch.ones(hidden))

    def forward(self, x: torch.Tensor, shift: torch.Tensor, *, gain: float = 1.0) -> tuple[torch.Tensor]:
        return (x + gain * torch.tanh((x * self.norm) @ self.weight.T + shift),)


@pytest.mark.parametrize("lr,kept", [(1e-2, True), (1e3, False)])
def test_kept_outputs_equal_running_the_kept_block(lr: float, kept: bool) -> None:
    gen = torch.Generator().manual_seed(11)
    hidden, sizes = 24, [(2, 7), (1, 5), (3, 4)]  # ragged batches
    block = Block(hidden, gen)
    xs = [torch.randn(b, t, hidden, generator=gen) for b, t in sizes]
    calls = [((torch.randn(hidden, generator=gen),), {"gain": 0.5}) for _ in sizes]
    teacher = Block(hidden, gen)
    targets = [teacher(x, *args, **kwargs)[0].detach() for x, (args, kwargs) in zip(xs, calls)]
    params = dict(block.named_parameters())
    start = {n: p.detach().clone() for n, p in params.items()}
    record, outputs = tune_block(block, params, {}, xs, calls, targets, 8,
                                 lambda ps: torch.optim.Adam(list(ps.values()), lr=lr))
    assert record["accepted"] is kept
    assert all(torch.equal(start[n], p) != kept for n, p in params.items())  # undone exactly when not kept
    oracle = next_inputs(block, xs, calls)
    assert len(outputs) == len(oracle) and all(torch.equal(a, b) for a, b in zip(outputs, oracle))
