"""What `bitsmith inspect` reports: one row per tensor (or per quantized module), totals, and the
settings that commonly hurt quality. Every format reader fills the same two dataclasses."""

from __future__ import annotations

import math

import re
from collections import defaultdict
from dataclasses import dataclass, field

_ATTENTION = re.compile(r"(attn|attention|q_proj|k_proj|v_proj|o_proj|qkv)", re.I)
_EMBED = re.compile(r"(embed|token_embd|wte|lm_head|(^|\.)output\.weight$)", re.I)
_BLOCK = re.compile(r"(?:^|\.)(?:layers|blk|h|block|blocks)\.(\d+)\.")
MIXED_BITS_RATIO = 2.0  # blocks whose mean code width differs by this factor are "very different"


class InspectError(ValueError):
    """A file or folder inspect cannot read; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor, or one quantized module with all its stored parts folded together."""

    name: str
    kind: str  # spec string (w4g128), ggml type (Q4_K), layout + spec (gptq w4g128) or dtype (F16)
    shape: tuple[int, ...]  # the logical (unpacked) shape
    bits_per_weight: float  # every stored bit of the tensor (codes, scales, zeros, indices) / weights
    bits: int | None = None  # code width when quantized; None for plain float/int tensors
    group_size: int | None = None  # weights per scale; None: one scale per row (or not quantized)
    notes: tuple[str, ...] = ()  # e.g. ("act-order",), ("double quant",)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def quantized(self) -> bool:
        return self.bits is not None


@dataclass(frozen=True)
class InspectReport:
    path: str
    format: str  # "bitsmith" | "gguf" | "safetensors" | "gptq" | "awq" | "compressed-tensors" | "bitsandbytes"
    summary: str  # e.g. "Q4_K_M", "w4g128 (rtn)", "F16", "gptq w4g128 act-order"
    tensors: list[TensorInfo]
    warnings: list[str] = field(default_factory=list)
    size_bytes: int = 0  # bytes of the weight files read
    details: dict[str, str] = field(default_factory=dict)  # settings read from the file (config, metadata)

    def total_bits_per_weight(self, only_quantized: bool = False) -> float:
        rows = [t for t in self.tensors if not only_quantized or t.quantized]
        weights = sum(t.numel for t in rows)
        return sum(t.numel * t.bits_per_weight for t in rows) / max(weights, 1)

    def as_dict(self) -> dict:
        return {"path": self.path, "format": self.format, "summary": self.summary,
                "bits_per_weight": self.total_bits_per_weight(),
                "quantized_bits_per_weight": self.total_bits_per_weight(True),
                "size_bytes": self.size_bytes, "details": dict(self.details), "warnings": list(self.warnings),
                "tensors": [{"name": t.name, "kind": t.kind, "shape": list(t.shape), "bits_per_weight": t.bits_per_weight,
                             "bits": t.bits, "group_size": t.group_size, "notes": list(t.notes)} for t in self.tensors]}


def spec_text(bits: int, group_size: int | None, symmetric: bool = False, grid: str = "uniform") -> str:
    """The QuantSpec spelling (w4g128, w8s, w4g64nf) of a setting, without QuantSpec's range checks
    (other toolkits use group sizes and widths bitsmith does not write)."""
    group = f"g{group_size}" if group_size else ""
    suffix = "s" if symmetric and grid == "uniform" else ("" if grid == "uniform" else grid)
    return f"w{bits}{group}{suffix}"


def quality_warnings(tensors: list[TensorInfo]) -> list[str]:
    """What commonly hurts quality: attention or embeddings/lm_head at <= 3 bits, no groups at
    <= 4 bits, act-order with groups, and blocks quantized to very different widths."""
    q = [t for t in tensors if t.quantized]
    warnings = []
    low_attn = [t.name for t in q if _ATTENTION.search(t.name) and t.bits <= 3]
    low_emb = [t.name for t in q if _EMBED.search(t.name) and t.bits <= 3]
    if low_attn:
        warnings.append(f"{len(low_attn)} attention tensors at 3 bits or fewer (e.g. {low_attn[0]}): "
                        "attention is sensitive; expect quality loss, keep them at 4 bits or more")
    if low_emb:
        warnings.append(f"embeddings/output at 3 bits or fewer ({low_emb[0]}): this often hurts quality "
                        "noticeably; keep them at 4 bits or more (or unquantized)")
    no_group = [t.name for t in q if t.bits <= 4 and t.group_size is None]
    if no_group:
        warnings.append(f"{len(no_group)} tensors at 4 bits or fewer have no group size (one scale per output row, "
                        f"e.g. {no_group[0]}): per-channel scales at low bits lose quality; use groups of 128 or fewer")
    act_order = [t.name for t in q if "act-order" in t.notes and t.group_size is not None]
    if act_order:
        warnings.append(f"{len(act_order)} tensors use act-order (desc_act) together with groups (e.g. {act_order[0]}): "
                        "some runtimes fall back to slower kernels for this layout; re-quantize without desc_act "
                        "or with static groups if speed matters")
    mixed = _mixed_blocks(q)
    if mixed:
        warnings.append(mixed)
    return warnings


def _mixed_blocks(quantized: list[TensorInfo]) -> str | None:
    """A warning when blocks carry very different mean code widths (e.g. 2-bit and 8-bit blocks)."""
    bits: dict[int, float] = defaultdict(float)
    weights: dict[int, int] = defaultdict(int)
    for t in quantized:
        match = _BLOCK.search(t.name)
        if match:
            bits[int(match[1])] += t.bits * t.numel
            weights[int(match[1])] += t.numel
    means = {b: bits[b] / weights[b] for b in weights if weights[b]}
    if len(means) < 2:
        return None
    lo, hi = min(means, key=means.get), max(means, key=means.get)
    if means[hi] < MIXED_BITS_RATIO * means[lo]:
        return None
    return (f"blocks are quantized to very different widths (block {lo}: {means[lo]:.1f} bits, block {hi}: "
            f"{means[hi]:.1f} bits on average): the low-bit blocks usually dominate the error; check them first")
