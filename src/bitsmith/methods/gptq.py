"""GPTQ: second-order post-training quantization with error feedback.

Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1. For a linear layer with calibration inputs X [in, tokens] the
layer-wise objective is ``argmin_Ŵ ||W X - Ŵ X||^2 = tr((W - Ŵ) H (W - Ŵ)^T)`` with ``H = 2 X X^T``
(eq. 1). Columns are quantized one at a time; the error of column q is spread over the columns not
yet quantized (OBS update, eq. 2-3, with ``δ_F = -(w_q - quant(w_q)) / [H_F^-1]_qq · (H_F^-1)_{:,q}``).
Sec. 3 of the paper makes this fast and stable:

- *Arbitrary order*: one fixed column order for all rows; then the inverse Hessians ``H_F^-1`` of
  the shrinking sets are the rows of the upper Cholesky factor U of H^-1 (``H^-1 = U^T U``, step
  "Cholesky reformulation"), so the update of column j is ``err_j = (w_j - q_j) / U_jj`` and
  ``W[:, k] -= err_j · U_jk`` for k > j.
- *Lazy batch updates*: the rank-1 updates stay inside a block of B columns; the columns after the
  block get one matrix product ``W[:, i2:] -= Err · U[i1:i2, i2:]`` per block.
- *Dampening*: ``H + λ I`` with λ a small fraction (1 %) of the mean diagonal.

Act-order (the reference code's ``--act-order``): columns are visited in order of decreasing H_ii,
so the most-used inputs are quantized while the most freedom to compensate remains. Group parameters
stay in *stored* order ("static groups"): each group's scale/zero (or grid scale) is fitted on the
original weights before any update, with RTN's range/clip search weighted by ``diag(H)`` (the mean
squared input up to a constant). The checkpoint therefore needs no ``g_idx`` permutation and
dequantizes exactly like RTN's. Without act-order, groups are fitted when the walk reaches them, on
the error-updated weights (the reference code's behaviour), unless ``static_groups`` is set.

Hessian scale: GPTQ is invariant to a positive factor on H (U scales by a constant that cancels
in ``err_j · U_jk`` and the damping is relative), so ``LayerStats.hessian`` may be the *sum* of
``x x^T`` over tokens (as ``calib`` accumulates it), the mean, or ``2 X X^T``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from bitsmith.methods import native
from bitsmith.methods.base import LayerStats, Needs, register
from bitsmith.methods.parallel import bf16_fpmath, intra_op_threads, map_chunks, row_chunks
from bitsmith.methods.rtn import (
    DEFAULT_CLIP_GRID,
    channel_weights,
    fit_grid_scales,
    fit_group_ranges,
    grid_for,
)
from bitsmith.methods.triangular import flip_both_, lower_inverse_
from bitsmith.primitives import abs_max, group_mask, nearest_grid_codes, to_groups
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

log = logging.getLogger(__name__)

DEFAULT_DAMP = 0.01  # λ as a fraction of mean(diag(H)) (paper sec. 3, "Cholesky reformulation")
DEFAULT_BLOCK = 128  # B, columns per lazy batch update
DAMP_RETRIES = 4  # on a failed Cholesky, retry with λ x10 this many times
SINGLE_THREAD_WIDTH = 2048  # layers with at most this many inputs factorize and walk on one thread
# bf16/fp16 weights are read as they are and made float32 a slice of rows at a time (every value exact), so
# a 151,936 x 1,536 head costs 0.47 GB, not 0.93 GB of float32, while it is quantized
HALF_DTYPES = (torch.bfloat16, torch.float16)
HALF_SEARCH_ROWS = 16384  # rows per range-search call on such a weight (~100 MB of float32 at 1,536 inputs)
PERMUTE_ROWS = 256  # rows per slice when a wide Hessian's columns are put in visit order (_permuted)
ERROR_PANELS, ERROR_PANELS_FROM = 4, 512  # layer_errors: column panels of H's upper triangle, from this width
OUTLIER_CHANNELS = 32  # layer_errors' bf16 products: channels (largest H_ii) whose terms stay float32
# weights per column walk of a static-group layer (256 MB of float32): a larger layer walks a slice of
# rows at a time. Every block layer of Qwen2.5-1.5B (at most 27.5 M weights) walks whole; its
# 151,936 x 1,536 head walks in 4 slices of 43,520 rows
WALK_WEIGHTS = 1 << 26
SEARCH_CHUNK_WEIGHTS = 1 << 16  # weights per chunk of the group-parameter searches (L2-sized temporaries)


@dataclass(frozen=True)
class GPTQOptions:
    """Typed form of the ``options`` dict gptq accepts."""

    act_order: bool = True
    damp_percent: float = DEFAULT_DAMP
    block_size: int = DEFAULT_BLOCK
    static_groups: bool | None = None  # None: static with act_order, dynamic without
    clip_search: bool = True
    clip_grid: int = DEFAULT_CLIP_GRID

    @classmethod
    def from_dict(cls, options: dict | None) -> "GPTQOptions":
        options = dict(options or {})  # the plan hands each method only its own options
        known = set(cls.__dataclass_fields__)
        unknown = set(options) - known
        if unknown:
            names = ", ".join(sorted(unknown))
            raise ValueError(f"gptq does not know option(s) {names}; use {', '.join(sorted(known))}")
        opts = cls(**options)
        if opts.block_size < 1 or opts.damp_percent < 0:
            raise ValueError("gptq needs block_size >= 1 and damp_percent >= 0")
        return opts

    @property
    def static(self) -> bool:
        return self.act_order if self.static_groups is None else self.static_groups


def layer_error(weight: torch.Tensor, dequant: torch.Tensor, hessian: torch.Tensor, relative: bool = True,
                rows: int = 256) -> float:
    """Output reconstruction error ``tr((W - Ŵ) H (W - Ŵ)^T)`` = ``||W X - Ŵ X||^2`` when H = X X^T;
    divided by ``tr(W H W^T)`` (the output energy) when ``relative``, giving a scale-free figure.
    Computed ``rows`` output rows at a time (float32 products, float64 sums), so the temporaries stay
    small next to an 8960 x 8960 Hessian."""
    return layer_errors(weight, [dequant], hessian, relative, rows)[0]


def layer_errors(weight: torch.Tensor, dequants: list[torch.Tensor], hessian: torch.Tensor, relative: bool = True,
                 rows: int = 256) -> list[float]:
    """:func:`layer_error` of several approximations of one weight, in one pass: per chunk of rows,
    the weight (for the energy) and every difference go through one product with H, so the energy
    is computed once and the Hessian is streamed once (a pipeline report compares the method with
    RTN on every layer; on a 1536 x 8960 layer each product is 0.04 TFLOP)."""
    return layer_errors_by_rows(weight, lambda sl: [d[sl] for d in dequants], len(dequants), hessian, relative, rows,
                                chunk_rows=weight.shape[0])


def layer_errors_by_rows(weight: torch.Tensor, dequant_rows: Callable[[slice], list[torch.Tensor]], count: int,
                         hessian: torch.Tensor, relative: bool = True, rows: int = 256,
                         chunk_rows: int = 4096, products: str = "fp32") -> list[float]:
    """:func:`layer_errors` with the ``count`` approximations made a slice of rows at a time by
    ``dequant_rows(rows) -> [approx[rows], ...]``, ``chunk_rows`` rows per call (rounded to a multiple
    of ``rows``), so no approximation of the whole weight exists at once: on a 151,936 x 1,536 head each
    is 0.93 GB of float32. The products and sums are the same, in the same order, as with whole
    approximations, so the figures are identical.

    ``products="bf16"`` runs the ``[w; e...] @ H`` products in oneDNN's bf16 fpmath mode
    (:func:`~bitsmith.methods.parallel.bf16_fpmath`: operands rounded to bf16, float32 accumulation
    and output; ~2x the float32 rate on AMX). Not exact, and plain rounding was not good enough: H's
    entries on the outlier channels' rows and columns are orders of magnitude above the rest, and
    GPTQ's error cancels against them (a SmolLM2 down_proj's relative error 2e-5 moved by 5%). So the
    ``OUTLIER_CHANNELS`` channels with the largest diagonal entries are taken out of the bf16 product
    and their terms added in float32 (:func:`_outlier_terms`); what remains is the rounding among the
    other channels: figures within 1e-3 relative of a float64 oracle on real layers
    (bench/results/calibrated-methods/README.md, session 17; tests/methods/test_report_products.py).
    The elementwise products and float64 sums are as in fp32."""
    if products not in ("fp32", "bf16"):
        raise ValueError(f"products must be 'fp32' or 'bf16', got {products!r}")
    h = hessian.float()
    outliers = _outlier_rows(h) if products == "bf16" else None
    return _layer_errors(weight, dequant_rows, count, h, relative, rows, chunk_rows, outliers)


def _outlier_rows(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``OUTLIER_CHANNELS`` largest diagonal entries' indices, and those rows of H [k, n]."""
    index = torch.topk(h.diagonal(), min(OUTLIER_CHANNELS, h.shape[0])).indices
    return index, h[index]


def _outlier_terms(stacked: torch.Tensor, picked: torch.Tensor, parts: int,
                   outliers: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per part, the terms of ``e H e^T`` with an outlier channel o in either place, which the bf16
    product left out (it ran with those columns of e zeroed): with e = e_N + e_O,
    ``e H e^T = e_N H e_N^T + 2 e_O H e^T - e_O H_OO e_O^T``. Float32 products (the fpmath mode is off
    here) summed in float64; ``stacked`` [parts * rows, in] whole again, ``picked`` its outlier columns."""
    index, rows_of_h = outliers
    rows = stacked.shape[0] // parts
    product = (picked @ rows_of_h).view(parts, rows, rows_of_h.shape[1])  # e_O H_O: [parts, rows, in]
    view = stacked.view(parts, rows, stacked.shape[1])
    both = (product[:, :, index] * picked.view(parts, rows, len(index))).sum(dim=(1, 2), dtype=torch.float64)
    return 2 * (product * view).sum(dim=(1, 2), dtype=torch.float64) - both


def _layer_errors(weight: torch.Tensor, dequant_rows: Callable[[slice], list[torch.Tensor]], count: int,
                  h: torch.Tensor, relative: bool, rows: int, chunk_rows: int,
                  outliers: tuple[torch.Tensor, torch.Tensor] | None) -> list[float]:
    bf16 = outliers is not None
    n = h.shape[0]
    # H is symmetric: e H e^T from its upper block triangle (diagonal blocks once, the blocks right of
    # them twice), (c + 1) / 2c of the full product's multiply-adds with c column panels
    cuts = [round(n * i / ERROR_PANELS) for i in range(ERROR_PANELS + 1)] if n >= ERROR_PANELS_FROM else [0, n]
    totals = torch.zeros(count + relative, dtype=torch.float64, device=h.device)
    out_features = weight.shape[0]
    step = max(rows, chunk_rows // rows * rows)  # whole inner chunks per call: the inner loop is unchanged
    for outer in range(0, out_features, step):
        approx = dequant_rows(slice(outer, min(outer + step, out_features)))
        for start in range(outer, min(outer + step, out_features), rows):
            w = weight[start : start + rows].float()
            local = slice(start - outer, start - outer + rows)
            parts = ([w] if relative else []) + [w - d[local].float() for d in approx]  # [rows, in] each
            stacked = torch.cat(parts)  # [parts * rows, in]
            if bf16:  # the outlier channels go through _outlier_terms, in float32
                picked = stacked[:, outliers[0]]
                stacked[:, outliers[0]] = 0
            view = stacked.view(len(parts), w.shape[0], n)
            for a, b in zip(cuts, cuts[1:]):
                with bf16_fpmath(bf16):  # only the product: the approximations above are made as always
                    product = (stacked[:, a:b] @ h[a:b, a:]).view(len(parts), w.shape[0], n - a)
                # float32 elementwise products summed in float64: no float64 copies of either operand
                totals += (product[:, :, : b - a] * view[:, :, a:b]).sum(dim=(1, 2), dtype=torch.float64)
                if b < n:
                    totals += 2 * (product[:, :, b - a :] * view[:, :, b:]).sum(dim=(1, 2), dtype=torch.float64)
            if bf16:
                stacked[:, outliers[0]] = picked
                totals += _outlier_terms(stacked, picked, len(parts), outliers)
        del approx
    values = totals.tolist()
    energy, errs = (values[0], values[1:]) if relative else (0.0, values)
    if not relative:
        return errs
    return [e / energy if energy > 0 else (0.0 if e == 0 else float("inf")) for e in errs]


def _permuted(h: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``h[order][:, order]`` as a new matrix: two gathers (3x faster than one 2-D gather) up to
    ``SINGLE_THREAD_WIDTH`` rows; wider ones gather the rows into the new matrix, then its columns in
    place ``PERMUTE_ROWS`` rows at a time, so no second n x n temporary (8,960 wide, 1 thread: 0.37-0.44
    CPU s against 0.6 for the one 2-D gather this replaced; the same values, only copied)."""
    if h.shape[0] <= SINGLE_THREAD_WIDTH:
        return h.index_select(0, order).index_select(1, order)
    out = h.index_select(0, order)
    for a in range(0, out.shape[0], PERMUTE_ROWS):
        rows = out[a:a + PERMUTE_ROWS]
        rows.copy_(rows.index_select(1, order))
    return out


def _damped_inverse_factor(hessian: torch.Tensor, rev: torch.Tensor, damp: float) -> torch.Tensor | None:
    """One attempt of :func:`inverse_cholesky` at damping ``damp``: J L^-1 J from the working copy J H_p J
    (``rev`` = the reversed visit order), or None where the factorization fails or is not finite. A
    function of its own so that a failed attempt's working copy is freed before the next one is made:
    in the loop, the copy (and views of it) stayed referenced while the retry built its own, a third
    n x n matrix at once (321 MB on an 8960-wide layer)."""
    h = _permuted(hessian.float(), rev)  # [in, in]: J H_p J, the one working copy
    diag = h.diagonal()
    diag[diag <= 0] = 1.0
    diag.add_(damp * diag.mean().item())
    _, info = torch.linalg.cholesky_ex(h, out=(h, torch.empty((), dtype=torch.int32, device=h.device)))  # in place
    if int(info) != 0:
        return None
    upper = flip_both_(lower_inverse_(h))  # [in, in]
    return upper if math.isfinite(abs_max(upper)) else None  # no n x n bool temporary


def inverse_cholesky(hessian: torch.Tensor, damp_percent: float, perm: torch.Tensor | None = None,
                     method: str = "gptq") -> torch.Tensor:
    """Upper Cholesky factor U of (H_p + λI)^-1 (so (H_p + λI)^-1 = U^T U), where H_p is ``hessian``
    with rows and columns in the order ``perm`` (default: as is) and λ = damp_percent x mean(diag H).

    Dead inputs (H_ii = 0: the channel was always zero in calibration) get H_ii = 1, which decouples
    them: their weights are rounded and their error feeds nothing. On a failed factorization λ grows
    x10, up to DAMP_RETRIES times. Memory: one n x n matrix besides ``hessian`` (factorized, inverted
    and flipped in place; on an 8960-wide layer each copy is 321 MB). ``method`` names the caller in
    the retry warning and the error."""
    n = hessian.shape[0]
    # With J the reversal, J H J = L L^T gives H = R R^T, R = J L J upper, so H^-1 = U^T U with
    # U = R^-1 = J L^-1 J: one factorization and one triangular inverse, no explicit inverse
    # (as accurate; LAPACK's potri also stalls badly on an oversubscribed CPU).
    rev = (torch.arange(n, device=hessian.device) if perm is None else perm).flip(0)
    damp = max(damp_percent, 1e-6)
    for attempt in range(DAMP_RETRIES + 1):
        upper = _damped_inverse_factor(hessian, rev, damp)
        if upper is not None:
            return upper
        if attempt < DAMP_RETRIES:
            log.warning("%s: Hessian not positive definite at damping %.3g; retrying with %.3g", method, damp, damp * 10)
            damp *= 10
    raise ValueError(
        f"{method}: the calibration Hessian is not positive definite even with damping {damp:g} x mean diagonal; "
        "use more calibration tokens or raise damp_percent"
    )


def _group_params(
    weight: torch.Tensor, spec: QuantSpec, importance: torch.Tensor, grid: torch.Tensor | None, steps: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group (scale, zero) [out, G, 1] for weight [out, in], RTN's search weighted by importance
    [in]; fp16-rounded, the values a loader will see. zero is None for grids."""
    stats = LayerStats(importance=importance)
    groups = to_groups(weight, spec)  # [out, G, gs]; bf16/fp16 groups are made float32 a chunk at a time
    mask, weights = group_mask(spec, weight.shape[1], weight.device), channel_weights(stats, spec, weight.shape[1])
    if grid is not None:
        parts = map_chunks(lambda rows: fit_grid_scales(groups[rows].float(), grid, mask, weights, steps), _chunks(groups))
        return torch.cat(parts).half().float(), None
    fast = _native_ranges(groups, spec, mask, weights, steps, weight.shape[1])
    if fast is not None:
        scale, zero = fast
    else:
        parts = map_chunks(lambda rows: fit_group_ranges(groups[rows].float(), spec, mask, weights, steps), _chunks(groups))
        scale, zero = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return scale.half().float(), zero.half().float() if spec.has_zero else zero


def _native_ranges(groups: torch.Tensor, spec: QuantSpec, mask: torch.Tensor | None, weights: torch.Tensor | None,
                   steps: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`native.range_search` on float32 groups in one call; on bf16/fp16 groups (a head kept in its
    source dtype, :data:`HALF_DTYPES`) one call per ``HALF_SEARCH_ROWS`` rows, so no float32 copy of the
    whole weight is made (rows are independent in the search: the same values). None: no native path."""
    if groups.dtype not in HALF_DTYPES:
        return native.range_search(groups, spec, mask, weights, steps, in_features)
    parts = []
    for start in range(0, groups.shape[0], HALF_SEARCH_ROWS):
        part = native.range_search(groups[start:start + HALF_SEARCH_ROWS].float(), spec, mask, weights, steps, in_features)
        if part is None:
            return None
        parts.append(part)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _chunks(groups: torch.Tensor) -> list[slice]:
    """Cache-sized row chunks of groups [out, G, gs] for the range searches (rows are independent); one
    chunk off the CPU (a GPU gains nothing from L2-sized pieces and pays a launch per operation and chunk)."""
    if groups.device.type != "cpu":
        return [slice(0, groups.shape[0])]
    return row_chunks(groups.shape[0], groups[0].numel(), SEARCH_CHUNK_WEIGHTS)


def _quantize_column(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec, grid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One column [out] -> (codes [out], dequantized [out]), exactly as QuantizedTensor dequantizes."""
    if grid is not None:
        codes = nearest_grid_codes(w / scale, grid)
        return codes, grid[codes] * scale
    codes = torch.clamp(torch.round(w / scale + zero), 0, spec.qmax)
    return codes, (codes - zero) * scale


def gptq_walk(
    weight_t: torch.Tensor,
    upper: torch.Tensor,
    scale_g: torch.Tensor,
    zero_g: torch.Tensor | None,
    group_of: list[int],
    spec: QuantSpec,
    grid: torch.Tensor | None,
    block_size: int,
    refit: Callable[[int, torch.Tensor], None] | None = None,
    refit_every: int = 0,
) -> torch.Tensor:
    """Algorithm 1 on transposed weights (rows are columns, contiguous): weight_t [in, out] in visit
    order, *updated in place* (the caller's copy is the working copy), upper [in, in] the Cholesky
    factor in the same order, scale_g/zero_g [G, out] per-group parameters and ``group_of[j]`` the
    group of the j-th visited column. Returns codes [in, out] (uint8). ``refit(j, rows)``, when
    given, is called at every column j that is a multiple of ``refit_every`` with the current
    (error-updated) weights of columns j..j+refit_every [<=refit_every, out] and may overwrite
    scale_g/zero_g of that group: that is how dynamic groups are fitted. A block must hold whole
    groups then. Memory: per-group parameters and uint8 codes (per-column parameters and int64
    codes were 5 x the weights' size: 0.9 GB on a 17920 x 1536 stage)."""
    w_t = weight_t
    n = w_t.shape[0]
    codes_t = torch.empty(w_t.shape, dtype=torch.uint8, device=w_t.device)
    native_case = refit is None and grid is None and zero_g is not None and native.on_cpu(w_t, upper)
    lib = native.library() if native_case else None
    groups = torch.tensor(group_of, dtype=torch.int64) if lib is not None else None
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        block = w_t[i1:i2]  # [B, out], a view: refit sees the in-block updates written back below
        if lib is not None:  # the same column loop in one native call (methods.native)
            errs = native.gptq_block(lib, block, upper[i1:i2, i1:i2], scale_g, zero_g, groups[i1:i2], spec.qmax,
                                     codes_t[i1:i2])
            if i2 < n:  # in place: no [n - i2, out] temporary and no separate subtraction pass
                w_t[i2:].addmm_(upper[i1:i2, i2:].T, errs, alpha=-1.0)
            continue
        errs = torch.empty_like(block)  # [B, out]
        u_block = upper[i1:i2, i1:i2]  # [B, B]
        # the column loop is ~10 small operations per column: one intra-op thread (methods.parallel:
        # a parallel region per matrix-vector product cost 20 ms each on a loaded machine)
        with intra_op_threads(1):
            for j in range(i2 - i1):
                if j:  # left-looking form of the in-block rank-1 updates: W[:, j] -= sum_k<j err_k · U_kj
                    block[j].sub_(errs[:j].T @ u_block[:j, j])
                col = i1 + j
                if refit is not None and col % refit_every == 0:  # a dynamic group starts: its current weights
                    rows = block[j : j + refit_every]  # [gs, out]; still missing this block's earlier errors
                    refit(col, rows - u_block[:j, j : j + refit_every].T @ errs[:j] if j else rows)
                g = group_of[col]
                codes, q = _quantize_column(block[j], scale_g[g], None if zero_g is None else zero_g[g], spec, grid)
                codes_t[col] = codes
                errs[j] = (block[j] - q) / u_block[j, j]  # [out]
        if i2 < n:  # lazy batch update of every later column, one GEMM per block (all threads)
            w_t[i2:].sub_(upper[i1:i2, i2:].T @ errs)
    return codes_t


def _walk_rows(weight: torch.Tensor, perm: torch.Tensor, upper: torch.Tensor, scale_g: torch.Tensor,
               zero_g: torch.Tensor | None, group_of: list[int], spec: QuantSpec, grid: torch.Tensor | None,
               block_size: int, refit: Callable[[int, torch.Tensor], None] | None, width: int) -> torch.Tensor:
    """:func:`gptq_walk` over weight [out, in], returning codes [out, in] in stored order. Rows are
    independent in Algorithm 1, so static groups walk a slice of rows at a time: the visit-order copy
    is one slice of rows (``WALK_WEIGHTS``, whole 256-row native chunks), not a second copy of the whole
    weight (0.93 GB on a 151,936 x 1,536 head).
    Dynamic groups (``refit``) refit every row of a group at once and walk whole."""
    out_features, in_features = weight.shape
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=weight.device)
    step = out_features if refit is not None else max(256, WALK_WEIGHTS // max(1, in_features) // 256 * 256)
    for start in range(0, out_features, step):
        rows = slice(start, min(start + step, out_features))
        whole = rows.stop - rows.start == out_features
        scales = scale_g if whole else scale_g[:, rows].contiguous()
        zeros = zero_g if whole or zero_g is None else zero_g[:, rows].contiguous()
        # weight[rows].T[perm]: the visit-order copy in one gather (the walk updates it in place), in float32
        codes_t = gptq_walk(weight[rows].T[perm].to(torch.float32).contiguous(), upper, scales, zeros, group_of, spec,
                            grid, block_size, refit, width)
        codes[rows, perm] = codes_t.T  # back to stored order
    return codes


def _checked_hessian(stats: LayerStats | None, in_features: int, device: torch.device) -> torch.Tensor:
    """``stats.hessian`` as float32 [in, in] on ``device`` (the weight's), or a clear error when it is
    missing or the wrong shape."""
    if stats is None or stats.hessian is None:
        raise ValueError("gptq needs calibration data; pass --calib or use rtn/hqq")
    if tuple(stats.hessian.shape) != (in_features, in_features):
        shape = tuple(stats.hessian.shape)
        raise ValueError(f"gptq: Hessian shape {shape} does not match the layer's {in_features} inputs")
    return stats.hessian.to(device=device, dtype=torch.float32)


@register("gptq", needs=Needs.HESSIAN, options=GPTQOptions, any_device=True, half_weights=True)
def gptq(weight: torch.Tensor, spec: QuantSpec, stats: LayerStats | None = None, options: dict | None = None) -> QuantizedTensor:
    """GPTQ (Algorithm 1) with act-order and static groups. Needs ``stats.hessian`` [in, in]: any
    positive multiple of X X^T (the sum over calibration tokens, or the mean).

    options: ``act_order`` (True), ``damp_percent`` (0.01), ``block_size`` (128), ``static_groups``
    (default: same as act_order), ``clip_search`` (True), ``clip_grid`` (20)."""
    opts = GPTQOptions.from_dict(options)
    weight = weight if weight.dtype in HALF_DTYPES else weight.float()  # half weights: float32 a slice at a time
    out_features, in_features = weight.shape
    hessian = _checked_hessian(stats, in_features, weight.device)  # the method computes where the weight is
    importance = hessian.diagonal().clamp_min(0)  # ∝ mean squared input; 0 for dead channels
    steps = opts.clip_grid if opts.clip_search else 0
    grid = grid_for(weight, spec, LayerStats(importance=importance))  # fit grids see the original weights

    perm = (torch.argsort(importance, descending=True, stable=True) if opts.act_order
            else torch.arange(in_features, device=weight.device))
    # the factorization and the walk's GEMMs of a narrow layer are a few GFLOP in many small calls:
    # one thread is faster than a barrier per call (methods.parallel); wide layers keep every core
    threads = 1 if in_features <= SINGLE_THREAD_WIDTH else torch.get_num_threads()
    with intra_op_threads(threads):
        upper = inverse_cholesky(hessian, opts.damp_percent, perm)  # [in, in] in visit order

    # Static groups: parameters from the original weights, in stored order; the walk looks up the
    # group of each visited column.
    scale, zero = _group_params(weight, spec, importance, grid, steps)  # [out, G, 1]
    scale_g = scale.squeeze(-1).T.contiguous()  # [G, out]
    zero_g = None if zero is None else zero.squeeze(-1).T.contiguous()
    width = spec.group_width(in_features)
    group_of = (perm // width).tolist()

    if opts.act_order and not opts.static:
        raise ValueError("gptq: act_order needs static_groups (the stored order must keep contiguous groups)")
    refit, block_size = None, opts.block_size
    if not opts.static and width < in_features:  # dynamic groups: fitted when reached (per-channel: same as static)
        block_size = -(-block_size // width) * width  # whole groups per block

        def refit(col: int, rows: torch.Tensor) -> None:  # no act-order here: visit order = stored order
            cols = rows.T.contiguous()  # [out, <=gs], the group's current weights
            one = QuantSpec(spec.bits, None, spec.symmetric, spec.grid)
            s, z = _group_params(cols, one, importance[col : col + cols.shape[1]], grid, steps)  # [out, 1, 1]
            scale_g[col // width] = s.reshape(-1)
            if zero_g is not None:
                zero_g[col // width] = z.reshape(-1)

    with intra_op_threads(threads):
        codes = _walk_rows(weight, perm, upper, scale_g, zero_g, group_of, spec, grid, block_size, refit, width)
    del upper
    scale, zero = scale_g.T, None if zero_g is None else zero_g.T  # [out, G]
    return QuantizedTensor(
        codes=codes,
        scale=scale.half().contiguous(),
        zero=zero.half().contiguous() if spec.has_zero else None,
        spec=spec,
        grid=None if grid is None else grid.half(),
    )


def gptq_many(
    weights: list[torch.Tensor], spec: QuantSpec, stats: LayerStats | None = None, options: dict | None = None
) -> list[QuantizedTensor]:
    """GPTQ for layers that read the same input (q/k/v, gate/up): one Hessian, one Cholesky factor
    and one column walk over their stacked rows. Rows are independent in Algorithm 1 (the update
    of a row uses only U and that row's own errors), so each layer's result equals ``gptq`` on it
    alone. Fitted grids (``fit``) are per tensor and go one by one."""
    if len(weights) < 2 or spec.grid == "fit" or len({w.shape[1] for w in weights}) != 1:
        return [gptq(w, spec, stats, options) for w in weights]
    rows = [w.shape[0] for w in weights]
    stacked = gptq(torch.cat([w.float() for w in weights]), spec, stats, options)
    out, start = [], 0
    for n in rows:
        end = start + n
        out.append(QuantizedTensor(
            codes=stacked.codes[start:end].contiguous(),
            scale=stacked.scale[start:end].contiguous(),
            zero=None if stacked.zero is None else stacked.zero[start:end].contiguous(),
            spec=spec, grid=stacked.grid))
        start = end
    return out


gptq.many = gptq_many  # the pipeline quantizes a stage's layers in one call when a method offers this
