"""AWQ's searches and the registered ``awq`` transform (Lin et al. 2023; the method is described
in :mod:`bitsmith.transforms.awq`, which also finds the scale groups and folds the scales).

One float pass over the search tokens (``tokens``, evenly spaced whole sequences) records what the
searches need, the mean |x| per channel included (``_calibrate``); then
per scale group the scale of eq. 4-5 is searched (by default on the linears' outputs:
:mod:`bitsmith.transforms.awq_fast`) and folded (all folds checked on the block output at once), and
per linear the clipping ratio is searched (:func:`clip_search`, on per-group Gram matrices, damped).
Each fold and each clip is kept only when the quantized block's output error on a few search sequences
does not rise (:mod:`bitsmith.transforms.awq_check`). The quantizer simulated inside the searches is a
parameter (plain min/max RTN in the pipeline).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bitsmith.methods.base import Method, Needs
from bitsmith.methods.parallel import map_chunks, row_chunks
from bitsmith.models.family import ATTENTION_HINT
from bitsmith.primitives import from_groups, to_groups
from bitsmith.spec import QuantSpec
from bitsmith.transforms.awq import (
    CLIP_SKIP, SCALE_PATTERNS, ScaleGroup, ScalePattern, fold_scale, match_all, tie_heads,
)
from bitsmith.transforms.awq_check import BlockCheck
from bitsmith.transforms.awq_options import AwqOptions, AwqReport, ClipResult, ScaleResult
from bitsmith.transforms.awq_fast import (
    clip_errors, coarse_indices, group_gram, output_error, scale_candidates, search_dtype, search_indices,
    simulated_quantizer, token_basis,
)
from bitsmith.transforms.base import register_transform

log = logging.getLogger(__name__)

QDQ_CHUNK_WEIGHTS = 1 << 18  # weights per row chunk of the clip search (1 << 16: 1.7x the time on an 8960 x 1536 layer)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _slice(value: Any, index: torch.Tensor, n: int) -> Any:
    """Per-batch view of a block kwarg: tensors with batch dimension n are indexed."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == n and n > 1:
        return value.index_select(0, index.to(value.device))
    if type(value) in (tuple, list):
        return type(value)(_slice(v, index, n) for v in value)
    return value


_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _stateless(kwargs: dict) -> dict:
    """The block kwargs without a KV cache: every search call must see only its own tokens."""
    return {k: (None if k in _CACHE_KWARGS else False if k == "use_cache" else v) for k, v in kwargs.items()}


def _run(block: nn.Module, hidden: torch.Tensor, kwargs: dict, index: torch.Tensor) -> torch.Tensor:
    n = hidden.shape[0]
    batch_kwargs = {k: _slice(v, index, n) for k, v in kwargs.items()}
    return _first(block(hidden.index_select(0, index.to(hidden.device)).float(), **batch_kwargs))


@dataclass
class _Calibration:
    """What one float pass over the calibration data leaves for the searches."""

    abs_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # linear -> sum |x| [in]
    count: int = 0  # tokens in abs_sum
    calls: dict[str, list] = field(default_factory=dict)  # measured module -> [(args, kwargs)]
    first_in: dict[str, torch.Tensor] = field(default_factory=dict)  # linear -> input, first batch
    first_out: dict[str, torch.Tensor] = field(default_factory=dict)  # norm -> output, first batch
    clip_in: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # linear -> [tokens, in]
    group_in: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # a group's first linear -> [tokens, in]
    block_out: torch.Tensor | None = None  # float block output, first sequence


def _calibrate(
    block: nn.Module, hidden: torch.Tensor, kwargs: dict, groups: list[ScaleGroup], clip_names: list[str],
    kept: list[torch.Tensor], rest: list[torch.Tensor], clip_stride: int, measure: str = "module",
) -> _Calibration:
    modules = dict(block.named_modules())
    cal, state = _Calibration(), {"keep": False, "first": False}
    group_inputs = {g.linears[0] for g in groups if _measure_of(g, measure) == "linear"}
    module_calls = {g.measure for g in groups if _measure_of(g, measure) == "module"}
    hooks = []

    def on_linear(name: str):
        def hook(_m: nn.Module, args: tuple, _out: Any) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # [tokens, in]
            cal.abs_sum[name] = cal.abs_sum.get(name, 0) + x.abs().sum(0)
            if state["first"]:
                cal.first_in[name] = args[0]
            if state["keep"] and name in clip_names:
                cal.clip_in.setdefault(name, []).append(x[::clip_stride])
            if state["keep"] and name in group_inputs:
                cal.group_in.setdefault(name, []).append(x.clone())
        return hook

    def on_measure(name: str):
        def hook(_m: nn.Module, args: tuple, kw: dict) -> None:
            if state["keep"] and name in module_calls:  # the linear measure needs only the group inputs
                cal.calls.setdefault(name, []).append((args, dict(kw)))
        return hook

    def on_norm(name: str):
        def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            if state["first"]:
                cal.first_out[name] = _first(out)
        return hook

    try:
        for name, module in modules.items():
            if isinstance(module, nn.Linear):
                hooks.append(module.register_forward_hook(on_linear(name)))
        for name in dict.fromkeys(g.measure for g in groups):  # once each, even if shared
            hooks.append(modules[name].register_forward_pre_hook(on_measure(name), with_kwargs=True))
        for name in dict.fromkeys(g.prev for g in groups if g.norm_offset is not None):
            hooks.append(modules[name].register_forward_hook(on_norm(name)))
        for i, index in enumerate(kept + rest):
            state["keep"], state["first"] = i < len(kept), i == 0
            out = _run(block, hidden, kwargs, index)
            if i == 0:
                cal.block_out = out[:1]  # the fold check runs on the first sequence only
            cal.count += out.shape[0] * out.shape[1]
    finally:
        for handle in hooks:
            handle.remove()
    return cal


def _measure_of(group: ScaleGroup, measure: str) -> str:
    """Where ``group``'s candidates are measured: "linear" or "module" (``measure`` "auto": the module
    when it is an attention, i.e. its name says attn/attention, else the linears)."""
    if measure != "auto":
        return measure
    return "module" if ATTENTION_HINT.search(group.measure.rsplit(".", 1)[-1]) else "linear"


def _checked_folds(
    block: nn.Module, hidden: torch.Tensor, kwargs: dict, index: torch.Tensor, cal: _Calibration,
    folded: list[tuple[ScaleGroup, torch.Tensor, ScaleResult]], skipped: list[str],
) -> list[tuple[ScaleGroup, torch.Tensor, ScaleResult]]:
    """The folds (all applied) that keep the float block's output on one sequence (``index``). One
    forward when all do (the usual case); otherwise each is undone and re-applied with its own check,
    and a fold that changes the output stays undone (the searches do not depend on other groups' folds)."""
    tol = 1e-4 * float(cal.block_out.nan_to_num().abs().max())

    def same() -> bool:
        return torch.allclose(_run(block, hidden, kwargs, index), cal.block_out, rtol=1e-3, atol=tol, equal_nan=True)

    if not folded or same():
        return folded
    for group, applied, _ in reversed(folded):
        fold_scale(block, group, 1.0 / applied)
    kept = []
    for group, applied, result in folded:
        fold_scale(block, group, applied)
        if same():
            kept.append((group, applied, result))
        else:
            fold_scale(block, group, 1.0 / applied)  # undo: the fold changed the float block
            skipped.append(f"{group.prev} -> {'/'.join(group.linears)}: folding changed the block output")
    return kept


def _feeds_only(group: ScaleGroup, cal: _Calibration) -> bool:
    """The norm's output is exactly what the group's linears read, and no other linear reads it."""
    out = cal.first_out.get(group.prev)
    if out is None:
        return False
    same = {n for n, x in cal.first_in.items() if x.shape == out.shape and torch.equal(x, out)}
    return same == set(group.linears)


def _qdq(weight: torch.Tensor, spec: QuantSpec, method: Method, options: dict) -> torch.Tensor:
    """Quantize-dequantize with the simulated quantizer. RTN (the pipeline's) treats rows
    independently, so it runs on cache-sized row chunks spread over the cores, one intra-op thread
    each (:mod:`bitsmith.methods.parallel`): the same values, no barrier per small operation."""
    from bitsmith.methods.rtn import rtn

    if method is not rtn or spec.grid == "fit":  # a fitted grid is per tensor
        return method(weight.float(), spec, None, options).dequantize().to(weight)
    chunks = row_chunks(weight.shape[0], weight.shape[1], QDQ_CHUNK_WEIGHTS)
    parts = map_chunks(lambda rows: method(weight[rows].float(), spec, None, options).dequantize(), chunks)
    return torch.cat(parts).to(weight)


def _weight_mean(linears: list[nn.Linear], spec: QuantSpec) -> torch.Tensor:
    """Mean over output rows of |w| normalised by its group's max, per input channel [in]."""
    w = torch.cat([m.weight.detach().float().abs() for m in linears])  # [sum out, in]
    groups = to_groups(w, spec)
    groups = groups / groups.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return from_groups(groups, w.shape[1]).mean(0)


def _search_scale(
    block: nn.Module, group: ScaleGroup, cal: _Calibration, spec: QuantSpec, method: Method, options: dict,
    opts: AwqOptions,
) -> tuple[torch.Tensor, float, float, float]:
    """AWQ eq. 4-5: (best scale [in], alpha, loss at alpha 0, best loss)."""
    if _measure_of(group, opts.measure) == "linear":
        return _search_scale_linear(block, group, cal, spec, method, options, opts)
    modules = dict(block.named_modules())
    measure, linears = modules[group.measure], [modules[n] for n in group.linears]
    x_mean = cal.abs_sum[group.linears[0]] / max(cal.count, 1)  # [in]
    w_mean = _weight_mean(linears, spec) if opts.duo else None
    originals = [m.weight.detach().clone() for m in linears]
    calls = cal.calls[group.measure]

    dtype = search_dtype(opts.search_dtype)

    def outputs(index: int) -> torch.Tensor:
        # grad mode and autocast are per thread. bf16 products (fp32 weights cast per call, fp32 sums) where
        # the CPU has them: ~5x the float32 rate; their rounding is the same for every candidate and the
        # reference, ~1/100 of a 4-bit grid's squared error (tested: the alphas of the fp32 forwards)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return _first(measure(*calls[index][0], **calls[index][1])).float()

    # the search batches run in parallel threads, one intra-op thread each (methods.parallel); the
    # squared errors are summed in batch order on this thread, so the choice does not depend on threads
    reference = map_chunks(outputs, range(len(calls)))
    candidates = [(alpha, tie_heads(s, group)[0]) for alpha, s in scale_candidates(x_mean, w_mean, opts.grid)]

    def loss(i: int) -> float:
        s = candidates[i][1]
        for module, weight in zip(linears, originals):
            module.weight.copy_(_qdq(weight * s, spec, method, options) / s)
        errs = map_chunks(lambda b: float((outputs(b) - reference[b]).float().pow(2).sum()), range(len(calls)))
        return sum(errs) / sum(ref.numel() for ref in reference)

    try:
        return _best_scale(candidates, search_indices(opts.grid, opts.grid_step, loss))
    finally:
        for module, weight in zip(linears, originals):
            module.weight.copy_(weight)


def _best_scale(candidates: list[tuple[float, torch.Tensor]], losses: dict[int, float]
                ) -> tuple[torch.Tensor, float, float, float]:
    """(scale, alpha, loss at alpha 0, best loss) of the searched ``losses`` (candidate index -> loss)."""
    best = min(losses, key=lambda i: (losses[i], i))
    return candidates[best][1], candidates[best][0], losses[0], losses[best]


def _search_scale_linear(
    block: nn.Module, group: ScaleGroup, cal: _Calibration, spec: QuantSpec, method: Method, options: dict,
    opts: AwqOptions,
) -> tuple[torch.Tensor, float, float, float]:
    """AWQ eq. 4-5 with the error measured on the group's linear outputs (:mod:`awq_fast`)."""
    modules = dict(block.named_modules())
    linears = [modules[n] for n in group.linears]
    x_mean = cal.abs_sum[group.linears[0]] / max(cal.count, 1)  # [in]
    w_mean = _weight_mean(linears, spec) if opts.duo else None
    basis, tokens = token_basis(torch.cat(cal.group_in.pop(group.linears[0])), opts.search_tokens)
    basis = basis.to(search_dtype(opts.search_dtype))
    weights = [m.weight.detach() for m in linears]
    qdq = simulated_quantizer(spec, method, options)
    norm = tokens * sum(w.shape[0] for w in weights)  # loss: mean squared error per output element
    candidates = [(alpha, tie_heads(s, group)[0]) for alpha, s in scale_candidates(x_mean, w_mean, opts.grid)]
    losses = search_indices(opts.grid, opts.grid_step,
                            lambda i: output_error(basis, weights, candidates[i][1], qdq) / norm)
    return _best_scale(candidates, losses)


def clip_search(
    weight: torch.Tensor, inputs: torch.Tensor, spec: QuantSpec, method: Method, options: dict,
    grid: int = 20, min_ratio: float = 0.5, dtype: torch.dtype = torch.float32, damp: float = 0.0,
    step: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """AWQ's weight clipping for one linear: weight [out, in], inputs [T, in]. ``damp`` adds
    ``damp * mean(diag H_g)`` to each group's Gram diagonal (a share of plain weight error). ``step``
    > 1 searches each (row, group)'s ratio coarse to fine (:func:`search_indices`): every ``step``-th
    ratio and the last for all groups, then each group's ratios within ``step - 1`` of its best.

    Returns (clipped weight [out, in], ratio per group [out, G], loss before, loss after)."""
    out_features, in_features = weight.shape
    w = to_groups(weight.float(), spec)  # [out, G, gs]
    n_groups = w.shape[1]
    gram = group_gram(inputs, spec, in_features)  # [G, gs, gs]; zero on padding: padded weights never count
    if damp > 0:
        diag = gram.diagonal(dim1=1, dim2=2)  # a view: the padding's zero diagonal stays zero below
        diag.add_(damp * diag.mean(-1, keepdim=True) * (diag > 0))
    gram = gram.to(dtype)
    absmax = w.abs().amax(dim=-1, keepdim=True)  # [out, G, 1]
    qdq = simulated_quantizer(spec, method, options)
    chunks = row_chunks(out_features, in_features, QDQ_CHUNK_WEIGHTS)
    ratios = torch.linspace(1.0, min_ratio, grid, device=w.device)
    best_err = torch.full((out_features, n_groups), math.inf, device=w.device)
    best_index = torch.zeros((out_features, n_groups), dtype=torch.long, device=w.device)

    def errors(index: torch.Tensor, rows: slice) -> torch.Tensor:  # per (row, group): mean_t (x_g . delta_g)^2
        part, bound = w[rows], absmax[rows] * ratios[index[rows]].unsqueeze(-1)
        clipped = torch.maximum(torch.minimum(part, bound), -bound)
        delta = to_groups(qdq(from_groups(clipped, in_features)), spec) - part
        return clip_errors(delta, gram, inputs.shape[0])

    def visit(index: torch.Tensor) -> None:  # ties keep the lower index, as a pass in grid order keeps the first
        nonlocal best_err, best_index
        err = torch.cat(map_chunks(lambda rows: errors(index, rows), chunks))
        better = (err < best_err) | ((err == best_err) & (index < best_index))
        best_err, best_index = torch.where(better, err, best_err), torch.where(better, index, best_index)

    for i in coarse_indices(grid, step):
        visit(torch.full_like(best_index, i))
    if step > 1:
        first = best_index.clone()
        for offset in [d for d in range(1 - step, step) if d != 0]:  # each group around its own best
            visit((first + offset).clamp(0, grid - 1))
    best_ratio = ratios[best_index]
    bound = absmax * best_ratio.unsqueeze(-1)
    result = from_groups(torch.maximum(torch.minimum(w, bound), -bound), in_features).to(weight)

    x = inputs.to(dtype)

    def loss(candidate: torch.Tensor) -> float:  # the whole linear's output error, cross-group terms included
        out = x @ (qdq(candidate.float()) - weight.float()).to(dtype).T  # [T, out]
        return float(torch.linalg.vector_norm(out, dtype=torch.float32)) ** 2 / out.numel()

    return result, best_ratio, loss(weight), loss(result)


def search_windows(n: int, tokens_per_seq: int, options: dict) -> list[int]:
    """The calibration sequences AWQ's searches read (the transform's ``windows``): evenly spaced, ~``awq_tokens``
    tokens in all. Of ``n`` sequences these; of exactly these (a run that propagates only them), all of them."""
    return _kept(n, tokens_per_seq, AwqOptions.from_dict(options).tokens).tolist()


def _kept(n: int, tokens_per_seq: int, tokens: int) -> torch.Tensor:
    """Indices of the ~``tokens`` tokens' worth of evenly spaced sequences of ``n``."""
    n_kept = min(n, max(1, math.ceil(tokens / max(tokens_per_seq, 1))))
    return torch.linspace(0, n - 1, n_kept).round().long().unique()


def _batches(n: int, tokens_per_seq: int, opts: AwqOptions, batch_size: int) -> tuple[list, list]:
    """(kept, rest) index batches: the kept sequences (:func:`search_windows`), evenly spaced, hold
    ~opts.tokens tokens."""
    kept = _kept(n, tokens_per_seq, opts.tokens)
    taken = set(kept.tolist())
    rest = torch.tensor([i for i in range(n) if i not in taken], dtype=torch.long)
    # at least as many search batches as cores, so that the search forwards run in parallel threads
    split = max(1, min(batch_size, math.ceil(kept.numel() / max(1, torch.get_num_threads()))))
    return list(kept.split(split)), list(rest.split(split)) if rest.numel() else []


def awq_transform(
    block: nn.Module, hidden: torch.Tensor, block_kwargs: dict, spec: QuantSpec, method: Method,
    options: dict, batch_size: int = 8, *, patterns: tuple[ScalePattern, ...] = SCALE_PATTERNS,
) -> AwqReport:
    """Scale (eq. 4-5) then clip ``block``'s linears in place, so that quantizing them afterwards
    (with any method) loses less. ``hidden`` [N, L, H]: the block's calibration inputs;
    ``block_kwargs``: what the model passes to the block. ``method`` is the quantizer simulated
    inside the searches (called with ``stats=None``; RTN is the usual choice).

    options: ``awq_grid`` (20), ``awq_tokens`` (4096), ``awq_clip`` (True), ``awq_clip_grid`` (20),
    ``awq_clip_min`` (0.5), ``awq_clip_tokens`` (512), ``awq_duo`` (False), ``awq_measure`` ("linear":
    the error on the linears' outputs, :mod:`bitsmith.transforms.awq_fast`; "module": on the output of
    the module that holds them, the paper's), ``awq_search_tokens`` (2048), ``awq_search_dtype``
    ("auto"), ``awq_clip_dtype`` ("fp32"), ``awq_check`` (True: a fold or clip is kept only if it lowers the
    quantized block's output error, :mod:`bitsmith.transforms.awq_check`), ``awq_check_tokens`` (1024),
    ``awq_clip_damp`` (1.0), ``awq_grid_step`` (4: the scale search coarse to fine, every 4th alpha then the
    best's neighbours; 1: every alpha), ``awq_clip_step`` (1: every clip ratio). Cache kwargs are dropped: every call must see only its own tokens."""
    opts = AwqOptions.from_dict(options)
    was_training = block.training
    block.eval()
    try:
        with torch.no_grad():
            return _transform(block, hidden, _stateless(block_kwargs), spec, method, options, opts, batch_size,
                              patterns)
    finally:
        block.train(was_training)


def _transform(
    block: nn.Module, hidden: torch.Tensor, kwargs: dict, spec: QuantSpec, method: Method, options: dict,
    opts: AwqOptions, batch_size: int, patterns: tuple[ScalePattern, ...],
) -> AwqReport:
    modules = dict(block.named_modules())
    groups, skipped = match_all(block, patterns)
    clip_names = [n for n, m in modules.items()
                  if isinstance(m, nn.Linear) and not CLIP_SKIP.fullmatch(n.rsplit(".", 1)[-1])]
    n, length = hidden.shape[0], hidden.shape[1]
    kept, _ = _batches(n, length, opts, batch_size)
    kept_tokens = sum(len(k) for k in kept) * length
    # the mean |x| per channel comes from the search tokens too: a float32 pass over the other
    # sequences only for that mean was the largest part of the transform (15 of 16 block forwards
    # at 128 x 512 calibration), and a mean over 4096 tokens is already within a few percent
    cal = _calibrate(block, hidden, kwargs, groups, clip_names if opts.clip else [], kept, [],
                     max(1, kept_tokens // opts.clip_tokens), opts.measure)
    check = _block_check(block, hidden, kwargs, torch.cat(kept), spec, method, options, opts) if opts.check else None
    searched = []
    for group in groups:
        if group.norm_offset is not None and not _feeds_only(group, cal):
            skipped.append(f"{group.prev} -> {'/'.join(group.linears)}: its output is not (only) their input")
            continue
        s, alpha, before, after = _search_scale(block, group, cal, spec, method, options, opts)
        result = ScaleResult(group.prev, group.linears, alpha, before, after)
        applied = _fold(block, group, s, check, alpha)
        if applied is None:
            skipped.append(f"{group.prev} -> {'/'.join(group.linears)}: alpha={alpha:.2f} kept out, it raised the "
                           "quantized block's output error")
        else:
            searched.append((group, applied, result))
    scales = []
    for group, applied, result in _checked_folds(block, hidden, kwargs, kept[0][:1], cal, searched, skipped):
        for name in group.linears:  # the linears now read x / s
            if name in cal.clip_in:
                cal.clip_in[name] = [x / applied for x in cal.clip_in[name]]
        scales.append(result)
        log.info("awq: %s -> %s alpha=%.2f mse %.3g -> %.3g", group.prev, ",".join(group.linears), result.alpha,
                 result.loss_before, result.loss_after)
    clips = [_clip_linear(modules[name], name, torch.cat(cal.clip_in[name])[: opts.clip_tokens], spec, method,
                          options, opts, check, skipped)
             for name in ([n for n in clip_names if n in cal.clip_in] if opts.clip else [])]
    errors = (check.plain, check.current) if check is not None else ((), ())
    return AwqReport(tuple(scales), tuple(clips), tuple(skipped), kept_tokens, *errors)


def _block_check(
    block: nn.Module, hidden: torch.Tensor, kwargs: dict, search: torch.Tensor, spec: QuantSpec, method: Method,
    options: dict, opts: AwqOptions,
) -> BlockCheck:
    """The quantized block's output error on ~``opts.check_tokens`` evenly spaced search sequences
    (:mod:`bitsmith.transforms.awq_check`), the forwards in ``awq_check_dtype`` (bf16 where native by default)."""
    count = min(search.numel(), max(1, math.ceil(opts.check_tokens / hidden.shape[1])))
    index = search[torch.linspace(0, search.numel() - 1, count).round().long().unique()]
    bf16 = search_dtype(opts.check_dtype) == torch.bfloat16

    def forward() -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return _run(block, hidden, kwargs, index).float()

    linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    return BlockCheck(linears, lambda w: _qdq(w, spec, method, options), forward, forward())


def _fold(block: nn.Module, group: ScaleGroup, scale: torch.Tensor, check: BlockCheck | None,
          alpha: float) -> torch.Tensor | None:
    """Fold ``scale`` into ``group`` (the scale applied), or, when the check says the quantized block
    got worse, leave the block as it was (None). alpha 0 (scale 1) is the plain method: not tried."""
    if check is None or alpha == 0.0:  # alpha 0: the identity, nothing to decide
        return fold_scale(block, group, scale)
    modules = dict(block.named_modules())
    prev = modules[group.prev]
    tensors = [modules[n].weight for n in group.linears] + [t for t in (prev.weight, getattr(prev, "bias", None))
                                                          if isinstance(t, torch.Tensor)]
    applied = []
    kept = check.try_change(tensors, [*group.linears, group.prev], lambda: applied.append(fold_scale(block, group, scale)))
    return applied[0] if kept else None


def _clip_linear(
    linear: nn.Linear, name: str, inputs: torch.Tensor, spec: QuantSpec, method: Method, options: dict,
    opts: AwqOptions, check: BlockCheck | None, skipped: list[str],
) -> ClipResult:
    """Clip search for one linear (inputs [T, in]); the clip is applied if it lowers the linear's
    output error on those tokens and (with the check) the quantized block's."""
    clipped, ratio, before, after = clip_search(linear.weight.detach(), inputs, spec, method, options, opts.clip_grid,
                                                opts.clip_min, search_dtype(opts.clip_dtype), opts.clip_damp,
                                                opts.clip_step)
    if after > before:  # per-group choices ignore cross-group terms; never make the linear worse
        ratio, after = torch.ones_like(ratio), before
    elif check is not None and not check.try_change([linear.weight], [name], lambda: linear.weight.copy_(clipped)):
        skipped.append(f"{name}: clip kept out, it raised the quantized block's output error")
        ratio, after = torch.ones_like(ratio), before
    elif check is None:
        linear.weight.copy_(clipped)
    return ClipResult(name, float(ratio.mean()), float(ratio.min()), float((ratio < 1).float().mean()), before, after)


# calibrated on prose and code by default (calib.data's built-in "prose+code"): on Qwen2.5-Coder-1.5B w4g128,
# AWQ calibrated on prose alone left the code KLD 6% above RTN's (bench/results/calibrated-methods)
@register_transform("awq", needs=Needs.BLOCK_REPLAY, calib_text="prose+code", windows=search_windows)
def apply_awq(block: nn.Module, hidden: torch.Tensor, block_kwargs: dict, spec: QuantSpec, options: dict,
              batch_size: int) -> AwqReport:
    """The pipeline's AWQ step: the searches simulate plain min/max RTN (as the reference
    implementation does), ~20x cheaper per candidate than RTN's range search, and the search's own
    clipping does that job. The final quantizer may be another method (GPTQ needs statistics the
    search does not have)."""
    from bitsmith.methods.rtn import rtn

    return awq_transform(block, hidden, block_kwargs, spec, rtn, {**options, "clip_search": False},
                         batch_size=batch_size)
