"""AWQ's options (parsed from the pipeline's option dictionary) and its per-block report."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


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
    # keep a fold or a clip only when it lowers the quantized block's output error on check_tokens search
    # tokens (transforms.awq_check): on Qwen2.5-Coder-1.5B the local searches raised it, and the KLD above RTN's
    check: bool = True
    check_tokens: int = 1024
    # dtype of the check's block forwards: auto = bf16 where the CPU has it natively (as the search's). On Qwen
    # block 1 (w3g128) float32 forwards made the same decisions as bf16's
    check_dtype: str = "auto"
    # the clip search's Gram matrices get clip_damp * mean(diag H_g) on the diagonal: a share of plain weight
    # error, so that per-(row, group) ratios fitted to the calibration text's inputs carry to other texts
    clip_damp: float = 1.0
    # the scale search visits every grid_step-th alpha (and the last), then every alpha within grid_step - 1 of
    # the best (transforms.awq_fast.search_indices); 1: all of them. On SmolLM2 w4g128 step 4 (12 of 20
    # candidates) chose the exhaustive search's alpha in 107 of 111 groups (the 4 others in blocks 27-30),
    # transform time -25%, KLD prose 0.1663 -> 0.1668, code 0.1514 -> 0.1483. clip_step: the same for each
    # (row, group)'s clip ratio, whose error curve is jagged: step 4 picked other ratios in 1-8% of the groups
    # and raised SmolLM2's prose KLD 8.5% (0.1663 -> 0.1804), so the clip search stays exhaustive
    grid_step: int = 4
    clip_step: int = 1

    @classmethod
    def from_dict(cls, options: dict) -> "AwqOptions":
        def flag(key: str, default: bool) -> bool:  # "false" from a command line means False
            value = options.get(key, default)
            return value.strip().lower() not in ("0", "false", "no", "off") if isinstance(value, str) else bool(value)

        opts = cls(int(options.get("awq_grid", 20)), int(options.get("awq_tokens", 4096)), flag("awq_clip", True),
                   int(options.get("awq_clip_grid", 20)), float(options.get("awq_clip_min", 0.5)),
                   int(options.get("awq_clip_tokens", 512)), flag("awq_duo", False),
                   str(options.get("awq_measure", "auto")), int(options.get("awq_search_tokens", 2048)),
                   str(options.get("awq_search_dtype", "auto")), str(options.get("awq_clip_dtype", "fp32")),
                   flag("awq_check", True), int(options.get("awq_check_tokens", 1024)),
                   str(options.get("awq_check_dtype", "auto")), float(options.get("awq_clip_damp", 1.0)),
                   int(options.get("awq_grid_step", 4)), int(options.get("awq_clip_step", 1)))
        if min(opts.grid, opts.clip_grid, opts.tokens, opts.clip_tokens, opts.check_tokens, opts.grid_step,
               opts.clip_step) < 1:
            raise ValueError("awq_grid, awq_clip_grid, awq_grid_step, awq_clip_step, awq_tokens, awq_clip_tokens and "
                             "awq_check_tokens must be >= 1")
        if not opts.clip_damp >= 0.0:
            raise ValueError(f"awq_clip_damp={opts.clip_damp} must be >= 0, e.g. 0.1")
        if not 0.0 < opts.clip_min <= 1.0:
            raise ValueError(f"awq_clip_min={opts.clip_min} must be in (0, 1], e.g. 0.5")
        dtypes = ("auto", "bf16", "fp32")
        if opts.measure not in ("auto", "linear", "module") or {opts.search_dtype, opts.clip_dtype,
                                                                 opts.check_dtype} - set(dtypes):
            raise ValueError(f"awq_measure={opts.measure!r} / awq_search_dtype={opts.search_dtype!r} / awq_clip_dtype="
                             f"{opts.clip_dtype!r} / awq_check_dtype={opts.check_dtype!r}: use "
                             "awq_measure=auto|linear|module and awq_search_dtype, awq_clip_dtype, awq_check_dtype=auto|bf16|fp32")
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
    skipped: tuple[str, ...] = ()  # why a pattern, fold or clip was not applied
    tokens: int = 0
    # the quantized block's output error on the check tokens (transforms.awq_check) as (per-token relative,
    # mean squared), with the plain method and with what the transform kept; empty without the check
    block_error_plain: tuple[float, ...] = ()
    block_error: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # plain types, for the checkpoint's JSON report
