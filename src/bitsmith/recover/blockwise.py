"""Block-wise recovery, the first stage of ``bitsmith distill`` (EfficientQAT's Block-AP with the codes
frozen): each decoder block in turn has its tunable parameters (scales, zeros, vq codebooks and the
block's own norm weights) fitted so that, fed the *quantized* model's hidden states (earlier blocks
already tuned), its output matches the reference block's output on the same tokens. The loss is the
relative squared error with each hidden channel weighted by its inverse mean square over the
calibration tokens (:func:`channel_weights`).

Why before the end-to-end KL stage: one step here costs one block's forward and backward (no 49k-wide
vocabulary head), every block gets its own well-scaled objective, and errors that earlier blocks leave
are absorbed by later ones. Each block keeps the better of its state before and after its steps
(measured on all calibration tokens, parameters rounded to what the checkpoint stores), so no block's
reported error rises; whether the stage as a whole helped is judged by the end-to-end KL that the
caller measures afterwards (:mod:`bitsmith.recover.distillation`).

The blocks' call arguments (attention masks, rotary tables: the same for the reference and the
quantized model, as they depend only on the tokens) are captured once with forward pre-hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from bitsmith.recover.tunable import TunableLinear, round_to_storage

BlockCall = tuple[tuple, dict[str, Any]]  # positional args after the hidden states, keyword args


@dataclass
class BlockData:
    """What the block stage needs, per calibration batch: block 0's input in the quantized model,
    every block's call arguments, and every reference block's output."""

    inputs: list[torch.Tensor]  # [batch] of [b, T, H]: the quantized model's block-0 input
    calls: list[list[BlockCall]]  # [block][batch]
    targets: list[list[torch.Tensor]]  # [block][batch] of [b, T, H]: the reference block's output


def _hidden(output: Any) -> torch.Tensor:
    """A decoder block's hidden-state output (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


OnOutput = Callable[[int, Any], None]  # (the batch's first sample, the model's output)


def _record(blocks: nn.ModuleList, net: nn.Module, tokens: torch.Tensor, batch: int, what: str,
            on_output: OnOutput | None = None) -> list:
    """One no-grad forward of ``net`` per batch, recording every block's (input, args, kwargs) when
    ``what == "calls"`` or its output when ``what == "outputs"``; [block][batch]. ``on_output`` is
    given each batch's model output (so the same forward serves the caller too)."""
    found: list[list] = [[] for _ in blocks]
    hooks = []
    for i, block in enumerate(blocks):
        if what == "calls":
            def pre(_m: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
                # only block 0's input is kept: later inputs come from the tuned blocks themselves
                found[i].append((args[0].detach() if i == 0 else None, tuple(args[1:]), dict(kwargs)))
            hooks.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(_m: nn.Module, _args: tuple, output: Any, i: int = i) -> None:
                found[i].append(_hidden(output).detach().float())
            hooks.append(block.register_forward_hook(post))
    try:
        with torch.no_grad():
            for start in range(0, tokens.shape[0], batch):
                output = net(input_ids=tokens[start:start + batch], use_cache=False)
                if on_output is not None:
                    on_output(start, output)
    finally:
        for hook in hooks:
            hook.remove()
    return found


def reference_block_outputs(reference: nn.Module, tokens: torch.Tensor, batch: int,
                            on_output: OnOutput | None = None) -> list[list[torch.Tensor]]:
    """Every reference decoder block's output, [block][batch] of float32 [b, T, H] (``on_output``:
    see :func:`_record`)."""
    from bitsmith.models.arch import find_blocks

    return _record(find_blocks(reference)[1], reference, tokens, batch, "outputs", on_output)


def block_data(net: nn.Module, tokens: torch.Tensor, batch: int, targets: list[list[torch.Tensor]],
               on_output: OnOutput | None = None) -> BlockData:
    """Capture the quantized model's block-0 inputs and every block's call arguments (``on_output``:
    see :func:`_record`)."""
    from bitsmith.models.arch import find_blocks

    recorded = _record(find_blocks(net)[1], net, tokens, batch, "calls", on_output)
    inputs = [x.float() for x, _, _ in recorded[0]]
    calls = [[(args, kwargs) for _, args, kwargs in per_block] for per_block in recorded]
    if len(targets) != len(calls):
        raise ValueError(f"the checkpoint has {len(calls)} decoder blocks and the reference {len(targets)}")
    return BlockData(inputs, calls, targets)


def _run(block: nn.Module, x: torch.Tensor, call: BlockCall) -> torch.Tensor:
    args, kwargs = call
    return _hidden(block(x, *args, **kwargs)).float()


def channel_weights(targets: list[torch.Tensor]) -> torch.Tensor:
    """1 / the mean square of each hidden channel of the reference block's output [H]. Why: from the
    middle of SmolLM2 on, a few "massive activation" channels carry most of the residual stream's
    energy (a plain relative error there is ~0.001 and its gradient ignores every other channel),
    while the next block's norm divides them out; weighting each channel by its inverse energy makes
    the loss the mean over channels of each channel's relative error."""
    energy = sum(y.pow(2).sum(dim=(0, 1)) for y in targets) / sum(y.shape[0] * y.shape[1] for y in targets)
    return 1.0 / energy.clamp_min(energy.mean() * 1e-6)


def block_error(block: nn.Module, xs: list[torch.Tensor], calls: list[BlockCall], targets: list[torch.Tensor],
                weights: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    """Channel-weighted relative squared error of the block's output over every batch, no gradients,
    and those outputs (what :func:`next_inputs` would compute: the caller keeps them as the next
    block's inputs instead of running the block over every batch once more)."""
    num = den = 0.0
    outputs = []
    with torch.no_grad():
        for x, call, y in zip(xs, calls, targets):
            outputs.append(_run(block, x, call))
            num += float(((outputs[-1] - y).pow(2) * weights).sum())
            den += float((y.pow(2) * weights).sum())
    return num / max(den, 1e-30), outputs


def next_inputs(block: nn.Module, xs: list[torch.Tensor], calls: list[BlockCall]) -> list[torch.Tensor]:
    """The (tuned) block's outputs: the next block's inputs."""
    with torch.no_grad():
        return [_run(block, x, call) for x, call in zip(xs, calls)]


OptimizerFactory = Callable[[dict[str, nn.Parameter]], torch.optim.Optimizer]


def tune_block(block: nn.Module, params: dict[str, nn.Parameter], tunable: dict[str, TunableLinear],
               xs: list[torch.Tensor], calls: list[BlockCall], targets: list[torch.Tensor], steps: int,
               make_optimizer: OptimizerFactory) -> tuple[dict, list[torch.Tensor]]:
    """``steps`` Adam steps on one block's ``params`` (batches in turn), then keep the better of the
    states before and after (both measured with the parameters rounded to storage). Returns the
    block's record (its relative error before and as kept, and whether the steps were kept) and the
    kept state's outputs on every batch, equal to :func:`next_inputs` of the block as kept."""
    round_to_storage(tunable)
    weights = channel_weights(targets)
    before, outputs_before = block_error(block, xs, calls, targets, weights)
    saved = {n: p.detach().clone() for n, p in params.items()}
    optimizer = make_optimizer(params)
    den = [max(float((y.pow(2) * weights).sum()), 1e-30) for y in targets]
    for step in range(steps):
        b = step % len(xs)
        optimizer.zero_grad(set_to_none=True)
        (((_run(block, xs[b], calls[b]) - targets[b]).pow(2) * weights).sum() / den[b]).backward()
        optimizer.step()
    round_to_storage(tunable)
    after, outputs_after = block_error(block, xs, calls, targets, weights)
    accepted = after < before
    if not accepted:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
    record = {"error_before": before, "error_after": after if accepted else before, "accepted": accepted}
    return record, outputs_after if accepted else outputs_before
