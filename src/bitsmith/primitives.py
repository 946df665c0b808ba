"""Pure quantization maths on tensors: groups, affine quantization parameters, codes, error metrics.

Affine quantization (e.g. Jacob et al. 2018; Nagel et al. 2021, "A White Paper on Neural Network
Quantization", eq. 2-4): ``code = clamp(round(w / scale + zero), 0, qmax)`` and
``w_hat = (code - zero) * scale``, one (scale, zero) pair per group of ``group_size`` consecutive
weights in a row. Symmetric codes fix ``zero`` at the middle of the code range, ``(qmax + 1) / 2``.
"""

from __future__ import annotations

import math

import torch

from bitsmith.spec import QuantSpec


def to_groups(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """[out, in] -> [out, G, gs]; a short last group is padded by repeating the row's last weight,
    which leaves the group's min and max unchanged (see :func:`group_mask` for error sums)."""
    out_features, in_features = weight.shape
    width = spec.group_width(in_features)
    groups = spec.groups_per_row(in_features)
    pad = groups * width - in_features
    if pad:
        weight = torch.cat([weight, weight[:, -1:].expand(out_features, pad)], dim=1)
    return weight.reshape(out_features, groups, width)


def group_mask(spec: QuantSpec, in_features: int, device: torch.device | str | None = None) -> torch.Tensor | None:
    """[G, gs] bool marking real weights (None when every group is full), on ``device`` (default the CPU)."""
    width = spec.group_width(in_features)
    groups = spec.groups_per_row(in_features)
    if groups * width == in_features:
        return None
    return (torch.arange(groups * width, device=device) < in_features).reshape(groups, width)


def from_groups(grouped: torch.Tensor, in_features: int) -> torch.Tensor:
    """[out, G, gs] -> [out, in], dropping padding."""
    return grouped.reshape(grouped.shape[0], -1)[:, :in_features]


def expand_groups(per_group: torch.Tensor, spec: QuantSpec, in_features: int) -> torch.Tensor:
    """[out, G] -> [out, in]: each group's value repeated over its weights."""
    width = spec.group_width(in_features)
    return per_group.repeat_interleave(width, dim=1)[:, :in_features]


def affine_params(
    lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for ranges [lo, hi] (any shape). Ranges always include 0, so zero is
    representable; an all-zero group gets scale 1 rather than a division by zero."""
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    if spec.symmetric:
        absmax = torch.maximum(-lo, hi)
        scale = absmax / (spec.qmax / 2)
        zero = torch.full_like(scale, (spec.qmax + 1) / 2)
    else:
        scale = (hi - lo) / spec.qmax
        zero = None
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if zero is None:
        zero = torch.round(-lo / scale)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    """Round to nearest on the grid; broadcasting shapes (e.g. [out, G, gs] with [out, G, 1])."""
    return torch.clamp(torch.round(w / scale + zero), 0, qmax)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes - zero) * scale


def dequantize_by_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, width: int) -> torch.Tensor:
    """``dequantize_codes(codes.float(), expand_groups(scale), expand_groups(zero))`` for codes [out, in]
    and float32 ``scale``, ``zero`` [out, G] with groups of ``width`` inputs (the last may be short):
    the same subtraction and product per weight, so the same values, on [out, G, width] views that
    broadcast the group's parameters instead of two ``repeat_interleave``'d [out, in] copies
    (a 1536 x 576 layer with its short last group: 12 -> 1 ms)."""
    out_features, in_features = codes.shape
    result = torch.empty(out_features, in_features, dtype=torch.float32, device=codes.device)
    full = in_features // width * width
    for a, b, w in ((0, full, width), (full, in_features, in_features - full)):
        if b <= a:
            continue
        g0, n = a // width, (b - a) // w
        dst = result[:, a:b].view(out_features, n, w)
        torch.sub(codes[:, a:b].reshape(out_features, n, w), zero[:, g0 : g0 + n, None], out=dst)
        dst.mul_(scale[:, g0 : g0 + n, None])
    return result


def abs_max(t: torch.Tensor) -> float:
    """max |x| without a |x|-sized temporary (from min and max); NaN when some element is NaN,
    inf when some is +-inf. For the 152k-vocabulary matrices of 1.5B models the copy is ~1 GB."""
    return float(torch.stack(torch.aminmax(t)).abs().max())


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|w|^2 / |w - w_hat|^2). Float64 sums over
    slices of ~1M elements (whole-tensor float64 copies of a 1536 x 8960 layer were ~0.3 GB)."""
    ref, app = reference.reshape(-1), approx.reshape(-1)
    noise = signal = 0.0
    for i in range(0, ref.numel(), 1 << 20):
        r = ref[i : i + (1 << 20)].double()
        noise += (r - app[i : i + (1 << 20)].double()).pow(2).sum().item()
        signal += r.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise)


def nf_grid(bits: int) -> torch.Tensor:
    """Normal-float levels in [-1, 1], sorted: quantiles of N(0, 1) with an exact zero, one more
    level on the positive side (the NF4 construction of QLoRA, sec. 3, for 2**bits levels)."""
    levels = 1 << bits
    offset = 0.5 * (1 / 32 + 1 / 30)  # tail probability left out, as in NF4 (0.9677 quantile)
    pos = torch.special.ndtri(torch.linspace(1 - offset, 0.5, levels // 2 + 1, dtype=torch.float64))[:-1]
    neg = -torch.special.ndtri(torch.linspace(1 - offset, 0.5, levels // 2, dtype=torch.float64))[:-1]
    grid = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (grid / grid.abs().max()).float()


def nearest_grid_codes(q: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of a sorted grid for every value of q (any shape)."""
    midpoints = (grid[1:] + grid[:-1]) / 2
    return torch.bucketize(q.contiguous(), midpoints)


def fit_grid(normalized: torch.Tensor, weights: torch.Tensor | None, bits: int, iters: int = 25, max_samples: int = 1 << 20) -> torch.Tensor:
    """A 2**bits-level grid for values scaled to [-1, 1]: weighted 1-D k-means (Lloyd), started
    from the normal-float grid; sorted and rounded to fp16, the precision it is stored in."""
    values = normalized.reshape(-1).float()
    w = torch.ones_like(values) if weights is None else weights.reshape(-1).float().expand_as(values)
    if values.numel() > max_samples:  # a deterministic stride sample keeps this cheap on big tensors
        step = values.numel() // max_samples
        values, w = values[::step], w[::step]
    grid = nf_grid(bits).to(values.device)
    for _ in range(iters):
        codes = nearest_grid_codes(values, grid)
        mass = torch.zeros_like(grid).index_add_(0, codes, w)
        total = torch.zeros_like(grid).index_add_(0, codes, w * values)
        grid = torch.where(mass > 0, total / mass.clamp_min(1e-12), grid).sort().values
    return grid.half().float()
