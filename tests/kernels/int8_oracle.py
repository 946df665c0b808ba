"""Shared by the int8-activation decode tests: random quantized weights and the int8 oracle (x rounded
to int8 per 32-block, then the exact dequantize-then-matmul)."""

from __future__ import annotations

import torch

from bitsmith.kernels.torch_path import reference_linear
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor


def random_qt(out: int, inp: int, spec: QuantSpec, gen: torch.Generator) -> QuantizedTensor:
    """Codes uniform over the spec's range, small positive fp16 scales, fractional fp16 zeros (HQQ-style)
    when asymmetric."""
    groups = spec.groups_per_row(inp)
    codes = torch.randint(0, spec.qmax + 1, (out, inp), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(out, groups, generator=gen) * 0.02 + 1e-3).half()
    zero = None if spec.symmetric else (torch.rand(out, groups, generator=gen) * spec.qmax).half()
    return QuantizedTensor(codes, scale, zero, spec)


def int8_oracle(x: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """What the int8-activation decode path computes, the slow way: x rounded to int8 with one scale
    per block of 32 inputs (max |x| / 127, round half to even), then the reference matmul."""
    xb = x.reshape(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    return reference_linear((torch.round(xb * inv) * (amax / 127.0)).reshape(x.shape), qt)


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))
