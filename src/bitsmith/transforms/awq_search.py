"""AWQ's searches and the registered ``awq`` transform (Lin et al. 2023; the method is described
in :mod:`bitsmith.transforms.awq`, which also finds the scale groups and folds the scales).

One float pass over the search tokens (``tokens``, evenly spaced whole sequences) records what the
searches need, the mean |x| per channel included (``_calibrate``); then
per scale group the scale of eq. 4-5 is searched (by default on the linears' outputs:
:mod:`bitsmith.transforms.awq_fast`) and folded (all folds checked on the block output at once), and
per linear the clipping ratio is searched (:func:`clip_search`, on per-group Gram matrices). The
quantizer simulated inside the searches is a parameter (plain min/max RTN in the pipeline).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
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
from bitsmith.transforms.awq_fast import (
    clip_errors, group_gram, output_error, scale_candidates, search_dtype, simulated_quantizer, token_basis,
)
from bitsmith.transforms.base import register_transform

log = logging.getLogger(__name__)

QDQ_CHUNK_WEIGHTS = 1 << 16  # weights per row chunk of the simulated quantizer


@dataclass(frozen=True)
class AwqOptions:
    grid: int = 20  # alpha candidates i / grid, i < grid
    tokens: int = 4096  # calibration tokens (whole sequences) the searches and the mean |x| use
    clip: bool = True
    clip_grid: int = 20  # shrink candidates from 1.0 to clip_min
    clip_min: float = 0.5
    clip_tokens: int = 512  # tokens per linear for the clip search
    duo: bool = False  # s = s_x^a / s_w^(1-a) instead of the paper's s_x^a
    # where a candidate scale's error is measured: "linear" (the linears' outputs, fast: awq_fast),
    # "module" (the output of the module that holds them, as the paper: the attention, the MLP), or
    # "auto": the attention's output for the groups it holds (q/k/v: their errors reach it through
    # softmax(q k^T); on their own outputs SmolLM2's KLD measured 0.1838 against 0.1708), the linears'
    # outputs for the others (gate/up's alphas within 0.05 of the module measure's; o/down: the same)
    measure: str = "auto"
    # "linear": at most this many rows per scale search basis; a group with more input channels than this
    # *and* more search tokens (Qwen-1.5B's down_proj: 8,960 > 4,096) gets this many evenly spaced tokens,
    # every other group the exact compression of all search tokens (0: no bound)
    search_tokens: int = 2048
    search_dtype: str = "auto"  # dtype of the scale search's products: auto (bf16 where native), bf16, fp32
    # dtype of the clip search's Gram products. fp32: bf16 rounding of a group's Gram matrix H_g misjudges
    # delta H_g delta^T where x has a large common component (the quadratic form cancels): SmolLM2 w4g128
    # KLD 0.1809 (bf16) -> 0.1765 (fp32; 0.1717 with awq_search_dtype=fp32 too). The batched [gs, gs]
    # products gain little from bf16 anyway (5.1 vs 6.7 ns per weight measured)
    clip_dtype: str = "fp32"

    @classmethod
    def from_dict(cls, options: dict) -> "AwqOptions":
        def flag(key: str, default: bool) -> bool:  # "false" from a command line means False
            value = options.get(key, default)
            return value.strip().lower() not in ("0", "false", "no", "off") if isinstance(value, str) else bool(value)

        opts = cls(int(options.get("awq_grid", 20)), int(options.get("awq_tokens", 4096)), flag("awq_clip", True),
                   int(options.get("awq_clip_grid", 20)), float(options.get("awq_clip_min", 0.5)),
                   int(options.get("awq_clip_tokens", 512)), flag("awq_duo", False),
                   str(options.get("awq_measure", "auto")), int(options.get("awq_search_tokens", 2048)),
                   str(options.get("awq_search_dtype", "auto")), str(options.get("awq_clip_dtype", "fp32")))
        if opts.grid < 1 or opts.clip_grid < 1 or opts.tokens < 1 or opts.clip_tokens < 1:
            raise ValueError("awq_grid, awq_clip_grid, awq_tokens and awq_clip_tokens must be >= 1")
        if not 0.0 < opts.clip_min <= 1.0:
            raise ValueError(f"awq_clip_min={opts.clip_min} must be in (0, 1], e.g. 0.5")
        dtypes = ("auto", "bf16", "fp32")
        if opts.measure not in ("auto", "linear", "module") or {opts.search_dtype, opts.clip_dtype} - set(dtypes):
            raise ValueError(f"awq_measure={opts.measure!r} / awq_search_dtype={opts.search_dtype!r} / awq_clip_dtype="
                             f"{opts.clip_dtype!r}: use awq_measure=auto|linear|module and awq_search_dtype, "
                             "awq_clip_dtype=auto|bf16|fp32")
        if opts.search_tokens < 0:
            raise ValueError(f"awq_search_tokens={opts.search_tokens} must be >= 0 (0: all search tokens)")
        return opts


@dataclass(frozen=True)
class ScaleResult:
    prev: str
    linears: tuple[str, ...]
    alpha: float
    loss_before: float  # MSE of the measured output, plain method (alpha = 0)
    loss_after: float  # at the chosen alpha


@dataclass(frozen=True)
class ClipResult:
    linear: str
    mean_ratio: float
    min_ratio: float
    clipped_fraction: float  # groups whose range was shrunk
    loss_before: float  # MSE of X W^T vs X Q(W)^T on the clip tokens
    loss_after: float  # same with the clipped weight


@dataclass(frozen=True)
class AwqReport:
    scales: tuple[ScaleResult, ...] = ()
    clips: tuple[ClipResult, ...] = ()
    skipped: tuple[str, ...] = ()  # why a pattern or fold was not applied
    tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # plain types, for the checkpoint's JSON report


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
    best = (torch.ones_like(x_mean), 0.0, math.inf)
    loss_plain = math.inf
    try:
        for i in range(opts.grid):
            alpha = i / opts.grid
            s = x_mean.pow(alpha).clamp_min(1e-4)
            if w_mean is not None:
                s = s / w_mean.pow(1 - alpha).clamp_min(1e-4)
            s, _ = tie_heads(s / (s.max() * s.min()).sqrt(), group)
            for module, weight in zip(linears, originals):
                module.weight.copy_(_qdq(weight * s, spec, method, options) / s)
            errs = map_chunks(lambda i: float((outputs(i) - reference[i]).float().pow(2).sum()), range(len(calls)))
            err = sum(errs)
            loss = err / sum(ref.numel() for ref in reference)
            loss_plain = loss if i == 0 else loss_plain
            if loss < best[2]:
                best = (s, alpha, loss)
    finally:
        for module, weight in zip(linears, originals):
            module.weight.copy_(weight)
    return best[0], best[1], loss_plain, best[2]


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
    best, loss_plain = (torch.ones_like(x_mean), 0.0, math.inf), math.inf
    for alpha, s in scale_candidates(x_mean, w_mean, opts.grid):
        s, _ = tie_heads(s, group)
        loss = output_error(basis, weights, s, qdq) / norm
        loss_plain = loss if alpha == 0 else loss_plain
        if loss < best[2]:
            best = (s, alpha, loss)
    return best[0], best[1], loss_plain, best[2]


def clip_search(
    weight: torch.Tensor, inputs: torch.Tensor, spec: QuantSpec, method: Method, options: dict,
    grid: int = 20, min_ratio: float = 0.5, dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """AWQ's weight clipping for one linear: weight [out, in], inputs [T, in].

    Returns (clipped weight [out, in], ratio per group [out, G], loss before, loss after)."""
    out_features, in_features = weight.shape
    w = to_groups(weight.float(), spec)  # [out, G, gs]
    n_groups = w.shape[1]
    gram = group_gram(inputs, spec, in_features).to(dtype)  # [G, gs, gs]; zero on padding: padded weights never count
    absmax = w.abs().amax(dim=-1, keepdim=True)  # [out, G, 1]
    qdq = simulated_quantizer(spec, method, options)
    chunks = row_chunks(out_features, in_features, QDQ_CHUNK_WEIGHTS)
    best_err = torch.full((out_features, n_groups), math.inf, device=w.device)
    best_ratio = torch.ones_like(best_err)

    def errors(ratio: float, rows: slice) -> torch.Tensor:  # per (row, group): mean_t (x_g . delta_g)^2
        part = w[rows]
        clipped = torch.maximum(torch.minimum(part, absmax[rows] * ratio), -absmax[rows] * ratio)
        delta = to_groups(qdq(from_groups(clipped, in_features)), spec) - part
        return clip_errors(delta, gram, inputs.shape[0])

    for ratio in torch.linspace(1.0, min_ratio, grid).tolist():
        err = torch.cat(map_chunks(lambda rows: errors(ratio, rows), chunks))
        better = err < best_err
        best_err, best_ratio = torch.where(better, err, best_err), torch.where(better, ratio, best_ratio)
    bound = absmax * best_ratio.unsqueeze(-1)
    result = from_groups(torch.maximum(torch.minimum(w, bound), -bound), in_features).to(weight)

    x = inputs.to(dtype)

    def loss(candidate: torch.Tensor) -> float:  # the whole linear's output error, cross-group terms included
        out = x @ (qdq(candidate.float()) - weight.float()).to(dtype).T  # [T, out]
        return float(torch.linalg.vector_norm(out, dtype=torch.float32)) ** 2 / out.numel()

    return result, best_ratio, loss(weight), loss(result)


def _batches(n: int, tokens_per_seq: int, opts: AwqOptions, batch_size: int) -> tuple[list, list]:
    """(kept, rest) index batches: the kept sequences, evenly spaced, hold ~opts.tokens tokens."""
    n_kept = min(n, max(1, math.ceil(opts.tokens / max(tokens_per_seq, 1))))
    kept = torch.linspace(0, n - 1, n_kept).round().long().unique()
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
    ("auto"), ``awq_clip_dtype`` ("fp32"). Cache kwargs are dropped: every call must see only its own tokens."""
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
    searched = []
    for group in groups:
        if group.norm_offset is not None and not _feeds_only(group, cal):
            skipped.append(f"{group.prev} -> {'/'.join(group.linears)}: its output is not (only) their input")
            continue
        s, alpha, before, after = _search_scale(block, group, cal, spec, method, options, opts)
        searched.append((group, fold_scale(block, group, s), ScaleResult(group.prev, group.linears, alpha, before,
                                                                          after)))
    scales = []
    for group, applied, result in _checked_folds(block, hidden, kwargs, kept[0][:1], cal, searched, skipped):
        for name in group.linears:  # the linears now read x / s
            if name in cal.clip_in:
                cal.clip_in[name] = [x / applied for x in cal.clip_in[name]]
        scales.append(result)
        log.info("awq: %s -> %s alpha=%.2f mse %.3g -> %.3g", group.prev, ",".join(group.linears), result.alpha,
                 result.loss_before, result.loss_after)
    clips = []
    for name in [n for n in clip_names if n in cal.clip_in] if opts.clip else []:
        linear = modules[name]
        inputs = torch.cat(cal.clip_in[name])[: opts.clip_tokens]  # [T, in]
        clipped, ratio, before, after = clip_search(linear.weight.detach(), inputs, spec, method, options,
                                                    opts.clip_grid, opts.clip_min, search_dtype(opts.clip_dtype))
        if after > before:  # per-group choices ignore cross-group terms; never make the linear worse
            ratio, after = torch.ones_like(ratio), before
        else:
            linear.weight.copy_(clipped)
        clips.append(ClipResult(name, float(ratio.mean()), float(ratio.min()), float((ratio < 1).float().mean()),
                                before, after))
    return AwqReport(tuple(scales), tuple(clips), tuple(skipped), kept_tokens)


@register_transform("awq", needs=Needs.BLOCK_REPLAY)
def apply_awq(block: nn.Module, hidden: torch.Tensor, block_kwargs: dict, spec: QuantSpec, options: dict,
              batch_size: int) -> AwqReport:
    """The pipeline's AWQ step: the searches simulate plain min/max RTN (as the reference
    implementation does), ~20x cheaper per candidate than RTN's range search, and the search's own
    clipping does that job. The final quantizer may be another method (GPTQ needs statistics the
    search does not have)."""
    from bitsmith.methods.rtn import rtn

    return awq_transform(block, hidden, block_kwargs, spec, rtn, {**options, "clip_search": False},
                         batch_size=batch_size)
