"""AWQ: activation-aware weight quantization as a block transform.

Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration".

Scaling (sec. 3.2). For a linear ``y = W x`` and any positive per-input-channel ``s``,
``W x = (W diag(s)) (diag(s)^-1 x)``, so scaling the weight columns by ``s`` and folding ``1/s``
into the op that produced ``x`` leaves the float model unchanged, while salient channels (large
``|x|``) get a relatively finer quantization grid. The scale is searched (eq. 4-5)::

    s = s_x ** alpha,  alpha* = argmin_alpha || Q(W diag(s)) diag(s)^-1 X - W X ||     (4), (5)

with ``s_x`` the mean ``|x|`` per channel, ``alpha`` on a grid in [0, 1) (alpha = 0 is the plain
method), ``s`` normalised by ``sqrt(max s * min s)``, and the error measured at the output of the
module that contains the linears (the attention for q/k/v, the MLP for gate/up, the linear itself
for o and down). ``awq_duo`` uses ``s_x ** alpha / s_w ** (1 - alpha)`` (s_w: mean group-normalised
``|w|`` per input channel) as AutoAWQ does.

The op producing ``x`` is a norm (fold: ``weight' = (offset + weight) / s - offset``, bias / s, where
``offset`` is 0 for usual norms and 1 for Gemma's ``x * (1 + weight)``; the offset is found by
probing the module, never by its class) or a linear (fold: divide its output rows and bias by
``s``). Which ops feed which linears is data (:data:`SCALE_PATTERNS`); every match is checked on the
calibration data (the norm's output *is* the linears' input and no other linear reads it) and every
fold on the block output, so a wrong match is skipped, never silently applied.

Grouped-query attention: v_proj has fewer output channels than o_proj has inputs (each kv head is
read by ``n_rep`` query heads). Rather than skipping v -> o (as the reference code does), the scale is
tied over the repeated heads (averaged), which keeps the fold exact.

Clipping (the reference implementation's ``auto_clip``): per (output row, group), shrink the range
to ``[-r max|w|, r max|w|]`` for ``r`` from 1.0 down to ``awq_clip_min`` and keep the ``r`` minimising
``|| X_g (Q(clip(W_g)) - W_g)^T ||`` on a token subsample, the group's share of the output error.
q and k are not clipped: their error reaches the output through softmax(q k^T), which this
per-linear measure misjudges (the reference implementation skips them too).
Unlike the reference implementation, the group's Gram matrix is damped (``awq_clip_damp``: its mean
diagonal added to the diagonal, i.e. a share of plain weight error), because per-(row, group) ratios
fitted to the calibration text's inputs did not carry to code on Qwen2.5-Coder-1.5B; and every fold
and clip must pass a check on the quantized block's output (:mod:`bitsmith.transforms.awq_check`).

This module holds the block's structure side: which ops feed which linears (the scale groups) and
how a scale is folded in. The searches (the calibration pass, eq. 4-5, clipping) and the registered
transform are in :mod:`bitsmith.transforms.awq_search`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import takewhile

import torch
from torch import nn

from bitsmith.models.family import awq_scale_groups


@dataclass(frozen=True)
class ScalePattern:
    """One scale group: regexes over the *last* component of a block's module names."""

    prev: tuple[str, ...]  # op whose output the linears read; first candidate present wins
    linears: tuple[str, ...]  # the consumers; all must be present (one regex each)
    measure: str | None = None  # module whose output error is measured; None: the linears' parent
    # (or the linear itself when there is one)
    blockers: str | None = None  # a module of this name in the block makes the fold invalid


# The groups themselves are model knowledge: they live in the family table (models.family).
SCALE_PATTERNS: tuple[ScalePattern, ...] = tuple(
    ScalePattern(prev=g.prev, linears=g.linears, blockers=g.blockers) for g in awq_scale_groups()
)
CLIP_SKIP = re.compile(r"q_proj|k_proj|query|key|wq|wk|q|k|qkv_proj|query_key_value|wqkv")  # last name part


@dataclass(frozen=True)
class ScaleGroup:
    """A pattern matched in one block: relative module names."""

    prev: str
    linears: tuple[str, ...]
    measure: str
    norm_offset: float | None  # prev is a norm with output n(x) * (offset + weight); None: a linear
    kv_repeat: int = 1  # GQA: each of prev's output channels feeds kv_repeat consumer channels
    head_dim: int = 0  # used with kv_repeat > 1


def norm_offset(norm: nn.Module) -> float | None:
    """``offset`` if ``norm(x) = n(x) * (offset + weight) [+ bias]`` elementwise, else None.

    Probed with the weight set to 0, 1 and 2 (restored exactly afterwards)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    params = [p for p in (weight, getattr(norm, "bias", None)) if isinstance(p, torch.Tensor)]
    saved = [p.detach().clone() for p in params]
    x = torch.randn(4, weight.numel(), generator=torch.Generator().manual_seed(0)).to(weight)
    outs = []
    with torch.no_grad():
        try:
            for p in params[1:]:
                p.zero_()
            for value in (0.0, 1.0, 2.0):
                weight.fill_(value)
                outs.append(norm(x).float())
        finally:
            for p, value in zip(params, saved):
                p.copy_(value)
    step = outs[1] - outs[0]  # = n(x)
    if not torch.allclose(outs[2] - outs[1], step, atol=1e-5) or step.abs().max() < 1e-6:
        return None  # the output is not affine in the weight
    offset = float((outs[0] * step).sum() / step.pow(2).sum())
    if abs(offset - round(offset)) > 1e-4 or not torch.allclose(outs[0], round(offset) * step, atol=1e-5):
        return None
    return float(round(offset))


def _unique(names: list[str], pattern: str) -> str | None:
    found = [n for n in names if re.fullmatch(pattern, n.rsplit(".", 1)[-1])]
    return found[0] if len(found) == 1 else None


def _parent(names: tuple[str, ...]) -> str:
    levels = zip(*(n.split(".")[:-1] for n in names))
    return ".".join(level[0] for level in takewhile(lambda level: len(set(level)) == 1, levels))


def _match(block: nn.Module, pattern: ScalePattern) -> ScaleGroup | str:
    """The group ``pattern`` describes in ``block``, or why it does not apply."""
    modules = dict(block.named_modules())
    names = [n for n in modules if n]
    linears = tuple(_unique(names, p) for p in pattern.linears)
    if any(n is None or not isinstance(modules[n], nn.Linear) for n in linears):
        return f"{'/'.join(pattern.linears)}: not found (or not unique)"  # e.g. a fused qkv_proj
    width = {modules[n].in_features for n in linears}
    prev = next((p for p in (_unique(names, c) for c in pattern.prev) if p is not None), None)
    if len(width) != 1 or prev is None:
        return f"{'/'.join(pattern.linears)}: no unique producer among {'/'.join(pattern.prev)}"
    if pattern.blockers and any(re.fullmatch(pattern.blockers, n.rsplit(".", 1)[-1]) for n in names):
        return f"{prev} -> {'/'.join(linears)}: blocked by a {pattern.blockers} module"
    (in_features,) = width
    measure = _unique(names, pattern.measure) if pattern.measure else (
        _parent(linears) if len(linears) > 1 else linears[0])  # "" (the block) when they sit in it
    if measure is None:
        return f"{prev} -> {'/'.join(linears)}: no unique {pattern.measure} to measure"
    source = modules[prev]
    if isinstance(source, nn.Linear):
        if source.out_features == in_features:
            return ScaleGroup(prev, linears, measure, None)
        head_dim = getattr(modules.get(prev.rpartition(".")[0], block), "head_dim", 0) or 0
        if in_features % source.out_features or not head_dim or source.out_features % head_dim:
            return f"{prev} -> {'/'.join(linears)}: {source.out_features} outputs feed {in_features} inputs"
        return ScaleGroup(prev, linears, measure, None, in_features // source.out_features, int(head_dim))
    offset = norm_offset(source)
    if offset is None or source.weight.numel() != in_features:
        return f"{prev} -> {'/'.join(linears)}: {type(source).__name__} is not a per-channel scaled norm"
    return ScaleGroup(prev, linears, measure, offset)


def match_all(block: nn.Module, patterns: tuple[ScalePattern, ...]) -> tuple[list[ScaleGroup], list[str]]:
    found = [_match(block, p) for p in patterns]
    return [g for g in found if isinstance(g, ScaleGroup)], [g for g in found if isinstance(g, str)]


def find_scale_groups(block: nn.Module, patterns: tuple[ScalePattern, ...] = SCALE_PATTERNS) -> list[ScaleGroup]:
    """The scale groups of ``block`` in pattern order; patterns that do not apply are left out."""
    return match_all(block, patterns)[0]


def tie_heads(scale: torch.Tensor, group: ScaleGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """(consumer scale [in], producer scale [prev out]); under GQA averaged over repeated heads.

    Consumer channel h * head_dim + d reads kv head h // kv_repeat (the transformers layout)."""
    if group.kv_repeat == 1:
        return scale, scale
    kv_heads = scale.numel() // (group.kv_repeat * group.head_dim)
    per_kv = scale.view(kv_heads, group.kv_repeat, group.head_dim).mean(dim=1)  # [kv, hd]
    full = per_kv.unsqueeze(1).expand(kv_heads, group.kv_repeat, group.head_dim).reshape(-1)
    return full, per_kv.reshape(-1)


def fold_scale(block: nn.Module, group: ScaleGroup, scale: torch.Tensor) -> torch.Tensor:
    """Multiply the group's linears' columns by ``scale`` [in] and fold ``1 / scale`` into the
    producer; the float block computes the same function. Returns the scale actually applied
    (tied over repeated heads under GQA)."""
    modules = dict(block.named_modules())
    prev = modules[group.prev]
    full, own = tie_heads(scale.float(), group)
    with torch.no_grad():
        if group.norm_offset is not None:
            off = group.norm_offset
            prev.weight.copy_(((prev.weight.float() + off) / own - off).to(prev.weight.dtype))
        else:
            prev.weight.copy_((prev.weight.float() / own[:, None]).to(prev.weight.dtype))  # rows
        if getattr(prev, "bias", None) is not None:
            prev.bias.copy_((prev.bias.float() / own).to(prev.bias.dtype))
        for name in group.linears:
            weight = modules[name].weight
            weight.copy_((weight.float() * full[None, :]).to(weight.dtype))  # columns; bias untouched
    return full
