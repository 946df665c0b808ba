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
    fit_grid,
    from_groups,
    group_mask,
    nearest_grid_codes,
    to_groups,
)
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor, default_grid

DEFAULT_CLIP_GRID = 20  # candidate shrink factors between 1.0 and MIN_SHRINK
MIN_SHRINK = 0.6
SEARCH_CHUNK = 1 << 22  # weights per slice of rows in the searches: bounds their temporaries (16 MB each)
CODE_CHUNK = 1 << 18  # weights per slice of rows when computing plain ranges and codes (1 MB of float32)
SEARCH_TILE = 1 << 18  # weights per slice of rows in the clip search's candidate loop (1 MB: stays in L2)


def row_slices(groups: torch.Tensor, weights_per_slice: int = SEARCH_CHUNK) -> list[slice]:
    """Slices of the output rows of groups [out, G, gs] (or a weight [out, in]), about
    ``weights_per_slice`` weights each.
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
    if grid > 0 and groups.shape[0] > 1 and len(slices := row_slices(groups, SEARCH_TILE)) > 1:
        parts = [fit_group_ranges(groups[sl], spec, mask, weights, grid) for sl in slices]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    lo = groups.amin(dim=-1, keepdim=True)
    hi = groups.amax(dim=-1, keepdim=True)
    best_scale, best_zero = affine_params(lo, hi, spec)
    if grid <= 0:
        return best_scale, best_zero
    best_err = torch.full_like(lo, float("inf"))
    err_weight = weights  # None: plain squared error (a factor of 1 changes no value)
    if mask is not None:
        err_weight = mask if err_weight is None else err_weight * mask
    recon = torch.empty_like(groups)
    for step in range(grid + 1):
        shrink = 1.0 - (1.0 - MIN_SHRINK) * step / grid
        scale, zero = affine_params(lo * shrink, hi * shrink, spec)
        _squared_error_(recon, groups, scale, zero, spec.qmax, err_weight)
        err = recon.sum(dim=-1, keepdim=True)  # [out, G, 1]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _squared_error_(out: torch.Tensor, groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int,
                    err_weight: torch.Tensor | None) -> None:
    """``out`` = ``(dequantize_codes(quantize_codes(groups, ...)) - groups) ** 2 * err_weight``: the same
    operations in the same order (so the same values), in place in one buffer. With a slice of rows
    that fits L2 (``SEARCH_TILE``), the candidate loop's passes stay in cache instead of making a
    fresh 16 MB temporary per operation (the w8 embedding's search: ~3.5x less CPU)."""
    torch.div(groups, scale, out=out)
    out.add_(zero).round_().clamp_(0, qmax).sub_(zero).mul_(scale).sub_(groups)
    out.mul_(out)  # pow(2) is x * x in torch
    if err_weight is not None:
        out.mul_(err_weight)


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
    so storage rounding cannot add error on top of the grid. Rows go in cache-sized slices with the
    elementwise steps in place (the same operations in the same order per weight, so the same codes):
    no whole-tensor float32 temporaries, and a bf16 weight is widened one slice at a time."""
    out_features, in_features = weight.shape
    scale16 = scale.half()
    zero16 = zero.half() if spec.has_zero else None
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=weight.device)
    for rows in row_slices(weight, CODE_CHUNK):
        codes[rows] = _codes(weight[rows], scale16[rows].float(), None if zero16 is None else zero16[rows].float(),
                             zero[rows] if zero16 is None and grid is None else None, spec, grid)
    return QuantizedTensor(
        codes=codes,
        scale=scale16.squeeze(-1).contiguous(),
        zero=None if zero16 is None else zero16.squeeze(-1).contiguous(),
        spec=spec,
        grid=None if grid is None else grid.half(),
    )


def _codes(weight: torch.Tensor, scale: torch.Tensor, zero16: torch.Tensor | None, zero: torch.Tensor | None,
           spec: QuantSpec, grid: torch.Tensor | None) -> torch.Tensor:
    """uint8 codes of some rows [rows, in]: nearest grid level, or clamp(round(w / s + z), 0, qmax)
    computed in place (:func:`bitsmith.primitives.quantize_codes`'s steps, in its order)."""
    groups = to_groups(weight.float(), spec)
    if grid is not None:
        q = nearest_grid_codes(groups / scale, grid)
    else:
        q = groups / scale
        q.add_(zero16 if zero16 is not None else zero).round_().clamp_(0, spec.qmax)
    return from_groups(q, weight.shape[1]).to(torch.uint8)


def minmax_params(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero) [out, G, 1] from each group's [min, max]: ``fit_group_ranges`` with no
    search, computed by slices of rows from the weight as stored (a bf16 weight is never widened
    whole). The padding of a short last group repeats a real weight, so it changes no min or max."""
    out_features, in_features = weight.shape
    groups = spec.groups_per_row(in_features)
    scale = torch.empty(out_features, groups, 1, dtype=torch.float32, device=weight.device)
    zero = torch.empty_like(scale)
    for rows in row_slices(weight, CODE_CHUNK):
        lo, hi = torch.aminmax(to_groups(weight[rows].float(), spec), dim=-1, keepdim=True)
        scale[rows], zero[rows] = affine_params(lo, hi, spec)
    return scale, zero


def grid_for(weight: torch.Tensor, spec: QuantSpec, stats: LayerStats | None) -> torch.Tensor | None:
    """The level grid a non-uniform spec uses for this tensor: fixed (nf) or fitted (fit), on the weight's device."""
    if spec.grid != "fit":
        grid = default_grid(spec)
        return None if grid is None else grid.to(weight.device)
    groups = to_groups(weight.float(), spec)
    absmax = groups.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    weights = channel_weights(stats, spec, weight.shape[1])
    return fit_grid(groups / absmax, None if weights is None else weights.expand_as(groups), spec.bits)


def _clip_steps(options: dict) -> int:
    return int(options.get("clip_grid", DEFAULT_CLIP_GRID)) if options.get("clip_search", True) else 0


def reads_stats(options: dict, spec: QuantSpec) -> bool:
    """Whether :func:`rtn` reads ``stats`` (the importance) with these options: not with plain min/max ranges
    on a uniform grid, AWQ's final quantizer (``clip_search`` off)."""
    return _clip_steps(options or {}) > 0 or spec.grid != "uniform"


@register("rtn", any_device=True, reads_stats=reads_stats)
def rtn(weight: torch.Tensor, spec: QuantSpec, stats: LayerStats | None = None, options: dict | None = None) -> QuantizedTensor:
    """options: ``clip_search`` (bool, default True) and ``clip_grid`` (int steps)."""
    options = options or {}
    in_features = weight.shape[1]
    steps = _clip_steps(options)
    if not reads_stats(options, spec):  # plain min/max: a streaming pass, the weight kept as stored
        return quantize_with_params(weight, *minmax_params(weight, spec), spec)
    weight = weight.float()
    groups = to_groups(weight, spec)  # [out, G, gs]
    mask, weights = group_mask(spec, in_features, weight.device), channel_weights(stats, spec, in_features)
    levels = grid_for(weight, spec, stats)
    if levels is not None:
        return quantize_with_params(weight, fit_grid_scales(groups, levels, mask, weights, steps), None, spec, levels)
    scale, zero = fit_group_ranges(groups, spec, mask, weights, steps)
    return quantize_with_params(weight, scale, zero, spec)
