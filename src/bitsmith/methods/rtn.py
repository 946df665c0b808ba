"""Round to nearest (RTN), asymmetric or symmetric, with an optional MSE-optimal clipping search.

Plain RTN takes each group's [min, max] as its range. The clipping search (as in GPTQ's reference
quantizer and AWQ's clip search) shrinks the range by a factor p in a grid and keeps, per group, the
p with the least squared reconstruction error, optionally weighted per input channel by activation
importance (mean squared input), which trades a few clipped outliers for finer steps everywhere else.
"""

from __future__ import annotations

import torch

from bitsmith.methods.base import LayerStats, register
from bitsmith.primitives import (
    affine_params,
    dequantize_codes,
    fit_grid,
    from_groups,
    group_mask,
    nearest_grid_codes,
    quantize_codes,
    to_groups,
)
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor, default_grid

DEFAULT_CLIP_GRID = 20  # candidate shrink factors between 1.0 and MIN_SHRINK
MIN_SHRINK = 0.6
SEARCH_CHUNK = 1 << 22  # weights per slice of rows in the searches: bounds their temporaries (16 MB each)


def row_slices(groups: torch.Tensor, weights_per_slice: int = SEARCH_CHUNK) -> list[slice]:
    """Slices of the output rows of groups [out, G, gs], about ``weights_per_slice`` weights each.
    Rows are independent in every search, so slicing changes no result; it keeps a 17920 x 1536
    search from making ~110 MB temporaries."""
    rows = max(1, weights_per_slice // max(1, groups[0].numel()))
    return [slice(i, i + rows) for i in range(0, groups.shape[0], rows)]


def channel_weights(stats: LayerStats | None, spec: QuantSpec, in_features: int) -> torch.Tensor | None:
    """Per-weight error weights in group layout [1, G, gs], or None for plain MSE."""
    if stats is None or stats.importance is None:
        return None
    imp = stats.importance.float().clamp_min(0)
    imp = imp / imp.mean().clamp_min(1e-12)
    return to_groups(imp.unsqueeze(0), spec)


def fit_group_ranges(
    groups: torch.Tensor, spec: QuantSpec, mask: torch.Tensor | None, weights: torch.Tensor | None, grid: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick per-group (scale, zero) [out, G, 1]: plain min/max when grid == 0, else the shrink factor
    with the least (weighted) squared error."""
    if grid > 0 and groups.shape[0] > 1 and len(slices := row_slices(groups)) > 1:
        parts = [fit_group_ranges(groups[sl], spec, mask, weights, grid) for sl in slices]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    lo = groups.amin(dim=-1, keepdim=True)
    hi = groups.amax(dim=-1, keepdim=True)
    best_scale, best_zero = affine_params(lo, hi, spec)
    if grid <= 0:
        return best_scale, best_zero
    best_err = torch.full_like(lo, float("inf"))
    err_weight = torch.ones_like(groups[:1]) if weights is None else weights
    if mask is not None:
        err_weight = err_weight * mask
    for step in range(grid + 1):
        shrink = 1.0 - (1.0 - MIN_SHRINK) * step / grid
        scale, zero = affine_params(lo * shrink, hi * shrink, spec)
        recon = dequantize_codes(quantize_codes(groups, scale, zero, spec.qmax), scale, zero)
        err = ((recon - groups).pow(2) * err_weight).sum(dim=-1, keepdim=True)  # [out, G, 1]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def fit_grid_scales(
    groups: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor | None, weights: torch.Tensor | None, steps: int
) -> torch.Tensor:
    """Per-group signed scale [out, G, 1] for a non-uniform grid: map the group's extreme weight
    onto either end of the grid (a negative scale mirrors an asymmetric grid), times a shrink factor,
    keeping the candidate with the least (weighted) squared error (as IQ4_NL's scale search)."""
    if groups.shape[0] > 1 and len(slices := row_slices(groups)) > 1:
        return torch.cat([fit_grid_scales(groups[sl], grid, mask, weights, steps) for sl in slices])
    extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True))  # [out, G, 1], signed
    extreme = torch.where(extreme == 0, torch.ones_like(extreme), extreme)
    err_weight = torch.ones_like(groups[:1]) if weights is None else weights
    if mask is not None:
        err_weight = err_weight * mask
    best_scale = extreme / grid[-1]
    best_err = torch.full_like(extreme, float("inf"))
    for end in (grid[0], grid[-1]):
        for step in range(max(steps, 0) + 1):
            shrink = 1.0 - (1.0 - MIN_SHRINK) * step / max(steps, 1)
            scale = (extreme / end * shrink).half().float()
            recon = grid[nearest_grid_codes(groups / scale, grid)] * scale
            err = ((recon - groups).pow(2) * err_weight).sum(dim=-1, keepdim=True)
            better = err < best_err
            best_err, best_scale = torch.where(better, err, best_err), torch.where(better, scale, best_scale)
    return best_scale


def quantize_with_params(
    weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec, grid: torch.Tensor | None = None
) -> QuantizedTensor:
    """Codes for weight [out, in] given per-group scale/zero [out, G, 1], stored as fp16.

    The codes are computed against the fp16-rounded scale and zero, the values a loader will see,
    so storage rounding cannot add error on top of the grid."""
    in_features = weight.shape[1]
    scale16 = scale.half()
    zero16 = zero.half() if spec.has_zero else None
    groups = to_groups(weight, spec)
    if grid is not None:
        codes = nearest_grid_codes(groups / scale16.float(), grid)
    else:
        zero_used = zero if zero16 is None else zero16.float()
        codes = quantize_codes(groups, scale16.float(), zero_used, spec.qmax)
    codes = from_groups(codes, in_features).to(torch.uint8)
    return QuantizedTensor(
        codes=codes.contiguous(),
        scale=scale16.squeeze(-1).contiguous(),
        zero=None if zero16 is None else zero16.squeeze(-1).contiguous(),
        spec=spec,
        grid=None if grid is None else grid.half(),
    )


def grid_for(weight: torch.Tensor, spec: QuantSpec, stats: LayerStats | None) -> torch.Tensor | None:
    """The level grid a non-uniform spec uses for this tensor: fixed (nf) or fitted (fit)."""
    if spec.grid != "fit":
        return default_grid(spec)
    groups = to_groups(weight.float(), spec)
    absmax = groups.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    weights = channel_weights(stats, spec, weight.shape[1])
    return fit_grid(groups / absmax, None if weights is None else weights.expand_as(groups), spec.bits)


@register("rtn")
def rtn(weight: torch.Tensor, spec: QuantSpec, stats: LayerStats | None = None, options: dict | None = None) -> QuantizedTensor:
    """options: ``clip_search`` (bool, default True) and ``clip_grid`` (int steps)."""
    options = options or {}
    weight = weight.float()
    in_features = weight.shape[1]
    steps = int(options.get("clip_grid", DEFAULT_CLIP_GRID)) if options.get("clip_search", True) else 0
    groups = to_groups(weight, spec)  # [out, G, gs]
    mask, weights = group_mask(spec, in_features), channel_weights(stats, spec, in_features)
    levels = grid_for(weight, spec, stats)
    if levels is not None:
        return quantize_with_params(weight, fit_grid_scales(groups, levels, mask, weights, steps), None, spec, levels)
    scale, zero = fit_group_ranges(groups, spec, mask, weights, steps)
    return quantize_with_params(weight, scale, zero, spec)
