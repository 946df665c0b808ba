"""HQQ: calibration-free refinement of RTN's group parameters by half-quadratic splitting.

Badri & Shaji 2023, "Half-Quadratic Quantization of Large Machine Learning Models" (blog/paper,
mobiusml). The zero point z of each group minimises a sparsity-promoting l_p norm (p < 1) of the
reconstruction error, ``argmin_z ||W - Q_z^-1(Q_z(W))||_p^p``, which tolerates the few outlier weights
that dominate an l_2 fit. An auxiliary variable W_e = W - Ŵ splits it into two easy sub-problems,
solved alternately while the coupling weight β grows (β <- κ β):

- the W_e sub-problem: ``W_e = shrink_lp(W - Ŵ(z), β)``, the generalised soft-thresholding
  operator ``shrink_lp(x, β) = sign(x) · relu(|x| - |x|^(p-1) / β)``;
- the z sub-problem: ``z = mean(W_q - (W - W_e) / s)`` per group, in closed form, with codes
  ``W_q = round(W / s + z)`` recomputed from the current z.

Differences from the reference, each for a reason (KLD figures: SmolLM2-135M, PROTOCOL prose
windows, bench/results/calibrated-methods/hqq_smollm2.md):

- The residual is shrunk in *code units* ((W - Ŵ) / s) rather than weight units, so β means the
  same for any weight magnitude. In weight units (the reference) β = 10 keeps every residual of
  typical LLM weights (~1e-2) whole, so the package's loop is in effect an l_2 zero fit.
- Start: the paper's min/max range for asymmetric affine codes (``clip_init=None``, the default).
  An MSE-optimal clip search (``clip_init=True``, RTN's default) cuts each group's outliers, and
  KLD pays for it although the squared error falls: HQQ from the clipped start measured w4g64 0.240,
  w3g128 1.943, w4g128 0.344 (4 windows) against 0.184, 1.433, 0.295 from min/max. Plain RTN shows
  the same (min/max 0.296 / 1.481 / 0.343, clip-searched 0.311 / 1.910 / 0.374). Scale-only formats
  (symmetric, nf/fit grids) keep the clipped start: not measured there.
- The best parameters are kept *per group* by (importance-weighted) squared error, the quantity the
  rest of the toolkit measures; the loop stops early once the total error stops falling.
- ``polish`` (default 2): closing l_2 zero steps from the best, ``z <- z - mean(r)``. The l_p loop
  leaves each group's mean error biased (on a SmolLM2 q_proj, w4g64, 6.6x the package's
  |mean error|), and a group's mean error multiplies the common mode of its inputs. Each step is
  the least-squares zero for the current codes, so the squared error cannot rise. Measured: w4g64
  0.1842 -> 0.1806 (12 windows, guard off), w3g128 1.4326 -> 1.4273, w4g128 0.2953 -> 0.2928.
- Scale-only formats (symmetric codes, nf/fit grids) have no zero to move, so the same splitting
  refits the per-group scale instead: the weighted least-squares ``s = <c, W - W_e> / <c, c>`` for the
  current codes c. ``optimize_scale`` does the same for asymmetric codes (jointly with z).

- ``keep_extremes``: a candidate is accepted for a group only if the group's largest-magnitude
  weight ends no further from its value than at the start (or half a code unit). The l_p fit
  tolerates large errors on a few weights by design and at 3 bits happily clips a group's outlier
  to fit the bulk. Default (None): on below 4 bits and for scale-only formats, off for 4+-bit affine
  codes, as measured: w3g128 1.4273 with it vs 1.4537 without, w4g128 0.2928 vs 0.2903, w4g64
  0.1902 vs 0.1842 (12 windows, no polish).

Against the ``hqq`` package (0.2.8; min/max start, zero rounded at 4 bits, zero-only l_2-like steps,
stopped on the whole tensor's mean |error|): w4g64 KLD 0.1841 (12 windows) vs this default's figure
in hqq_smollm2.md.

Optional importance weights (mean squared input per channel, ``stats.importance``) weight every
per-group mean and error; no calibration is needed otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from bitsmith.methods.base import LayerStats, register
from bitsmith.methods.parallel import map_chunks
from bitsmith.methods.rtn import (
    DEFAULT_CLIP_GRID,
    channel_weights,
    fit_grid_scales,
    fit_group_ranges,
    grid_for,
    quantize_with_params,
    row_slices,
)
from bitsmith.primitives import group_mask, nearest_grid_codes, to_groups
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

ROW_CHUNK_WEIGHTS = 1 << 17  # weights per row chunk (~0.5 MB of float32, cache-sized)


@dataclass(frozen=True)
class HQQOptions:
    """Typed form of the ``options`` dict hqq accepts (p, β, κ, iterations as in the paper; β in code units)."""

    iters: int = 20
    lp_norm: float = 0.7  # p of the l_p error norm, < 1
    beta: float = 10.0  # initial coupling β (code units)
    kappa: float = 1.01  # β growth per iteration
    optimize_scale: bool = False  # also refit the scale of asymmetric codes
    tol: float = 1e-4  # stop when the total error falls by less than this fraction
    # start from RTN's clip-searched ranges (True) or min/max (False, as the paper); None: min/max for
    # asymmetric affine codes (measured best), clip-searched for scale-only formats (not measured)
    clip_init: bool | None = None
    # never let a group's largest-magnitude weight lose more than at the start; None: on, except for
    # asymmetric affine codes of 4+ bits, where it measured worse on SmolLM2's KLD
    keep_extremes: bool | None = None
    polish: int = 2  # l_2 zero steps after the l_p loop (asymmetric codes): each group's mean error -> 0

    @classmethod
    def from_dict(cls, options: dict | None) -> "HQQOptions":
        options = dict(options or {})  # a copy: popped below; the plan hands each method only its own options
        # The CLI sends RTN's ``clip_search=False`` for --no-clip-search. For hqq it can only ask for
        # the min/max start (the default); the clip-searched start is ``clip_init=True``.
        if options.pop("clip_search", True) is False:
            options.setdefault("clip_init", False)
        unknown = set(options) - set(cls.__dataclass_fields__)
        if unknown:
            names = ", ".join(sorted(unknown))
            raise ValueError(f"hqq does not know option(s) {names}; use {', '.join(cls.__dataclass_fields__)}")
        opts = cls(**{k: _coerce(k, v, cls.__dataclass_fields__[k].default) for k, v in options.items()})
        if not 0 < opts.lp_norm <= 1 or opts.beta <= 0 or opts.kappa < 1 or opts.iters < 0 or opts.polish < 0:
            raise ValueError("hqq needs 0 < lp_norm <= 1, beta > 0, kappa >= 1, iters >= 0 and polish >= 0")
        return opts


def _coerce(name: str, value: object, default: object) -> object:
    """An option value as its field's type: command lines hand over strings ("0.5", "false")."""
    if isinstance(default, bool) or default is None:  # the None defaults (clip_init, keep_extremes) are bools
        if isinstance(value, str):
            low = value.strip().lower()
            if low not in ("true", "false", "yes", "no", "on", "off", "1", "0"):
                raise ValueError(f"hqq option {name} needs true or false, not {value!r}")
            return low in ("true", "yes", "on", "1")
        return bool(value)
    try:
        return type(default)(value)
    except (TypeError, ValueError):
        raise ValueError(f"hqq option {name} needs a {type(default).__name__}, not {value!r}") from None


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding (the W_e sub-problem): the proximal step of ``|x|_p^p / β``."""
    mag = x.abs()
    return torch.sign(x) * torch.relu(mag - mag.clamp_min(1e-12).pow(p - 1) / beta)


def kept_residual(r: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """``r - shrink_lp(r, β, p) = sign(r) · min(|r|, |r|^(p-1) / β)``: the part of the residual the
    codes must still explain (what the z sub-problem averages), in fewer passes than shrinking then subtracting.

    ``|r|^(p-1)`` as ``exp((p-1) log|r|)``: torch's ``pow`` with a float exponent is scalar code (~10 ns
    per element here, half of HQQ's time), log and exp are vectorised (~1.7 ns for both); they agree
    to ~2 float32 ulps (tested against :func:`shrink_lp`)."""
    mag = r.abs()
    bound = mag.clamp_min(1e-12).log_().mul_(p - 1).exp_().mul_(1 / beta)
    return torch.minimum(mag, bound, out=bound).copysign_(r)


def _wmean(x: torch.Tensor, w: torch.Tensor | None, w_sum: torch.Tensor | float) -> torch.Tensor:
    """(Weighted) mean over the last dim, [..., gs] -> [..., 1]; w None means equal weights."""
    if w is None:
        return x.mean(dim=-1, keepdim=True)
    return (x * w).sum(dim=-1, keepdim=True) / w_sum


class _Best:
    """Per-group best (scale, zero) by squared error [out, G, 1]; also says when to stop."""

    def __init__(self, scale: torch.Tensor, zero: torch.Tensor | None, tol: float) -> None:
        self.scale, self.zero, self.tol = scale, zero, tol
        self.err = torch.full_like(scale, float("inf"))
        self.prev_total = float("inf")

    def offer(self, scale: torch.Tensor, zero: torch.Tensor | None, err: torch.Tensor) -> bool:
        """Record a candidate; True while the total error still falls by more than tol."""
        better = err < self.err
        self.err = torch.where(better, err, self.err)
        self.scale = torch.where(better, scale, self.scale)
        if zero is not None:
            self.zero = torch.where(better, zero, self.zero)
        total = self.err.sum().item()  # the best so far: candidates ruled out (inf) do not stop the loop
        falling = total < self.prev_total * (1 - self.tol)
        self.prev_total = total
        return falling


def _extreme_index(groups: torch.Tensor) -> torch.Tensor:
    """Index [out, G, 1] of each group's largest-magnitude weight."""
    return groups.abs().argmax(dim=-1, keepdim=True)


def _refine_zero(
    groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int, w: torch.Tensor | None, opts: HQQOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sub-problems with the scale fixed, all in code units: u = W / s, r = u - (W_q - z), and the zero
    update ``z <- mean(W_q - u + W_e/s) = z - mean(r - W_e/s)``."""
    w_sum = None if w is None else w.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    u = groups / scale  # [out, G, gs]
    scale2 = scale * scale
    extreme, limit = _extreme_index(groups) if opts.keep_extremes else None, None

    def residual(zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal limit
        r = u + zero
        r.sub_(torch.round(r).clamp_(0, qmax))  # residual in code units
        err = _wmean(r * r, w, w_sum) * scale2  # [out, G, 1], ∝ weighted squared error
        if extreme is not None:  # the l_p fit may sacrifice outliers; the largest weight must not lose more
            r_ext = r.gather(-1, extreme).abs()
            if limit is None:
                limit = r_ext.clamp_min(0.5) + 1e-4  # within half a step is rounding, not clipping
            err = torch.where(r_ext <= limit, err, torch.full_like(err, float("inf")))
        return r, err

    best, beta = _Best(scale, zero, opts.tol), opts.beta
    for it in range(opts.iters + 1):
        r, err = residual(zero)
        if not best.offer(scale, zero, err) or it == opts.iters:
            break
        zero = zero - _wmean(kept_residual(r, beta, opts.lp_norm), w, w_sum)
        beta *= opts.kappa
    zero = best.zero
    r = residual(zero)[0] if opts.polish else None
    for _ in range(opts.polish):  # l_2 steps from the best: the zero that makes each group's mean error 0
        zero = zero - _wmean(r, w, w_sum)
        r, err = residual(zero)
        best.offer(scale, zero, err)
    return best.scale, best.zero


def _refine_scale(
    groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec,
    grid: torch.Tensor | None, w: torch.Tensor | None, opts: HQQOptions,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same splitting refitting the scale (and, for asymmetric codes, the zero jointly): the
    target W - W_e is fitted by least squares on the current codes, ``s = <c, W - W_e> / <c, c>``."""
    w_sum = None if w is None else w.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    best, beta = _Best(scale, zero, opts.tol), opts.beta
    extreme, limit = _extreme_index(groups) if opts.keep_extremes else None, None
    for it in range(opts.iters + 1):
        u = groups / scale  # [out, G, gs]
        if grid is not None:
            values = grid[nearest_grid_codes(u, grid)]  # grid level per weight
        else:
            codes = torch.round(u + zero).clamp_(0, spec.qmax)
            values = codes - zero
        r = u - values  # residual in code units
        err = _wmean(r * r, w, w_sum) * scale * scale
        if extreme is not None:  # in weight units here: the scale moves
            r_ext = (r.gather(-1, extreme) * scale).abs()
            if limit is None:
                limit = r_ext.clamp_min(0.5 * scale.abs()) * (1 + 1e-4)
            err = torch.where(r_ext <= limit, err, torch.full_like(err, float("inf")))
        if not best.offer(scale, zero, err) or it == opts.iters:
            break
        target = values + kept_residual(r, beta, opts.lp_norm)  # (W - W_e) / s
        if spec.has_zero:  # joint least squares of target·s ≈ s'·codes - s'·z'
            c_mean, t_mean = _wmean(codes, w, w_sum), _wmean(target, w, w_sum)
            c_dev = codes - c_mean
            var = _wmean(c_dev * c_dev, w, w_sum)
            ratio = _wmean(c_dev * target, w, w_sum) / var.clamp_min(1e-12)  # s' / s
            ok = (var > 1e-8) & (ratio.abs() > 1e-6)
            new_scale = torch.where(ok, scale * ratio, scale)
            zero = torch.where(ok, c_mean - t_mean / ratio.where(ok, torch.ones_like(ratio)), zero)
            scale = new_scale
        else:
            den = _wmean(values * values, w, w_sum)
            ratio = _wmean(values * target, w, w_sum) / den.clamp_min(1e-12)
            scale = torch.where((den > 1e-12) & (ratio.abs() > 1e-6), scale * ratio, scale)
        beta *= opts.kappa
    return best.scale, best.zero


@register("hqq", options=HQQOptions)
def hqq(weight: torch.Tensor, spec: QuantSpec, stats: LayerStats | None = None, options: dict | None = None) -> QuantizedTensor:
    """Calibration-free HQQ; ``stats.importance`` (mean squared input per channel) is used when given.

    options: ``iters`` (20), ``lp_norm`` (0.7), ``beta`` (10, code units), ``kappa`` (1.01),
    ``optimize_scale`` (False; scale-only formats always refit the scale), ``tol`` (1e-4),
    ``clip_init`` (None: min/max for asymmetric codes, RTN's clip search for scale-only formats),
    ``keep_extremes`` (None: off for 4+-bit asymmetric codes, else on), ``polish`` (2 l_2 zero steps).
    Values may be strings ("0.5", "false"), as command lines give them."""
    opts = HQQOptions.from_dict(options)
    weight = weight.float()
    in_features = weight.shape[1]
    groups = to_groups(weight, spec)  # [out, G, gs]
    mask, weights = group_mask(spec, in_features), channel_weights(stats, spec, in_features)
    err_weight = weights  # [1, G, gs] or None (equal weights)
    if mask is not None:
        err_weight = mask.unsqueeze(0).float() if err_weight is None else err_weight * mask
    grid = grid_for(weight, spec, stats)
    affine = spec.has_zero and grid is None
    clip_init = opts.clip_init if opts.clip_init is not None else not affine
    keep = opts.keep_extremes if opts.keep_extremes is not None else not (affine and spec.bits >= 4)
    opts = replace(opts, clip_init=clip_init, keep_extremes=keep)
    steps = DEFAULT_CLIP_GRID if clip_init else 0

    def fit(rows: slice) -> QuantizedTensor:
        chunk = groups[rows]  # [rows, G, gs]
        if grid is not None:
            scale, zero = fit_grid_scales(chunk, grid, mask, weights, steps), None
        else:
            scale, zero = fit_group_ranges(chunk, spec, mask, weights, steps)
        if spec.has_zero and not opts.optimize_scale:
            scale, zero = _refine_zero(chunk, scale, zero, spec.qmax, err_weight, opts)
        else:
            scale, zero = _refine_scale(chunk, scale, zero, spec, grid, err_weight, opts)
        # the codes of these rows here too: a whole-tensor pass made float32 temporaries of the weight's
        # size (~2 GB for a 151,936 x 1,536 head) on one core
        return quantize_with_params(weight[rows], scale, zero, spec, grid)

    # groups are independent: cache-sized chunks of rows, spread over the cores one thread each
    # (methods.parallel: no intra-op barrier per operation); each chunk stops on its own total error, so
    # the split (fixed by ROW_CHUNK_WEIGHTS, not by the thread count) is part of the result
    parts = map_chunks(fit, row_slices(groups, ROW_CHUNK_WEIGHTS))
    return replace(parts[0], codes=torch.cat([p.codes for p in parts]), scale=torch.cat([p.scale for p in parts]),
                   zero=None if parts[0].zero is None else torch.cat([p.zero for p in parts]))
