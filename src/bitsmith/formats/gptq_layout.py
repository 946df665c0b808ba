"""The GPTQ / AutoGPTQ packed layout that transformers, vLLM and GPTQModel load, both ways, as pure
functions of tensors (no files: :mod:`bitsmith.io.export_gptq` writes folders, :mod:`bitsmith.io.import_gptq`
reads them).

Per quantized linear layer ``L`` (``out`` x ``in`` weights, ``G`` groups of ``group_size``):

    L.qweight  int32 [in * bits / 32, out]   codes packed along the input dim, as one little-endian
                                             bit stream per output column: 32 codes fill ``bits``
                                             int32 words (8 per word at 4 bits, 4 at 8 bits, and
                                             3-bit codes straddle words, as GPTQ's 3-bit packing)
    L.qzeros   int32 [G, out * bits / 32]    zero points packed the same way along the output dim
    L.scales   fp16  [G, out]
    L.g_idx    int32 [in]                    group of each input channel (i // group_size without
                                             act-order; any order with act-order / desc_act)

Dequantization: ``w = scales * (code - zero)``, bitsmith's own convention. Format "gptq" (v1, read by
every loader) stores ``zero - 1``; loaders add the 1 back after masking, so a zero of 0 cannot be
expressed and is refused (``GPTQFormat.V2``, ``checkpoint_format: "gptq_v2"``, stores the zero
itself, for GPTQModel). Fractional zeros (HQQ) are rounded to integers and the rounding is returned
so the caller can report it; non-uniform grids and group sizes that do not divide ``in`` (GPTQ has
no short last group) are refused.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from math import gcd

import torch

from bitsmith.formats.packing import pack, unpack
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

GPTQ_BITS = (2, 3, 4, 8)
PARTS = ("qweight", "qzeros", "scales", "g_idx")  # a layer's stored tensors, L.<part>


class GPTQFormat(enum.Enum):
    V1 = "gptq"  # qzeros hold zero - 1 (AutoGPTQ, vLLM, transformers)
    V2 = "gptq_v2"  # qzeros hold zero (GPTQModel)


class GPTQError(ValueError):
    """A tensor or folder that the GPTQ layout cannot hold or that is not GPTQ; the message names the fix."""


def pack_columns(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [rows, n] codes -> int32 [rows, n * bits / 32]: each row one little-endian bit stream.
    bitsmith's packing already writes each row as such a stream, 8 codes to ``bits`` bytes."""
    rows, n = codes.shape
    if (n * bits) % 32:
        raise GPTQError(f"{n} {bits}-bit codes do not fill whole int32 words; GPTQ needs {32 // gcd(bits, 32)}-aligned widths")
    return pack(codes.contiguous(), bits).view(torch.int32).reshape(rows, n * bits // 32)


def unpack_columns(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_columns`: int32 [rows, w] -> uint8 [rows, w * 32 / bits]."""
    rows, w = words.shape
    return unpack(words.contiguous().view(torch.uint8).reshape(rows, w * 4), bits, w * 32 // bits)


def zero_offset(fmt: GPTQFormat) -> int:
    """What the format subtracts from a zero point before storing it (v1's ``zero - 1``)."""
    return 1 if fmt is GPTQFormat.V1 else 0


@dataclass(frozen=True)
class GPTQTensors:
    """One layer in the GPTQ layout."""

    qweight: torch.Tensor  # int32 [in * bits / 32, out]
    qzeros: torch.Tensor  # int32 [G, out * bits / 32]
    scales: torch.Tensor  # fp16 [G, out]
    g_idx: torch.Tensor  # int32 [in]
    max_zero_rounding: float  # largest |zero - round(zero)| (0 for integer zeros)


def _check_spec(spec: QuantSpec, in_features: int) -> int:
    """The group size a GPTQ layer of ``spec`` uses; GPTQError for what the layout cannot hold."""
    if spec.grid != "uniform":
        raise GPTQError(f"{spec} is a non-uniform grid; GPTQ stores uniform codes only: quantize with a uniform spec (e.g. w4g128)")
    if spec.bits not in GPTQ_BITS:
        raise GPTQError(f"{spec.bits}-bit codes have no GPTQ packing; use 2, 3, 4 or 8 bits")
    group = spec.group_size or in_features
    if in_features % group:
        raise GPTQError(f"group size {group} does not divide the row of {in_features} weights and GPTQ loaders cannot "
                        f"express a short last group; quantize with a group size that divides {in_features} (e.g. g32) or per-channel")
    return group


def to_gptq(qt: QuantizedTensor, fmt: GPTQFormat = GPTQFormat.V1) -> GPTQTensors:
    """One layer in the GPTQ layout. Raises GPTQError for what the layout cannot hold."""
    spec, (out_features, in_features) = qt.spec, qt.shape
    group = _check_spec(spec, in_features)
    zero = qt.zero_or_mid()  # [out, G]
    rounded = torch.round(zero)
    if fmt is GPTQFormat.V1 and bool((rounded < 1).any()):
        raise GPTQError("a group has zero point 0, which GPTQ v1 (stored as zero - 1) cannot express; "
                        "export with format gptq_v2 (GPTQModel reads it)")
    stored = (rounded - zero_offset(fmt)).clamp(0, spec.qmax).to(torch.uint8)  # [out, G]
    return GPTQTensors(
        qweight=pack_columns(qt.codes, spec.bits).t().contiguous(),
        qzeros=pack_columns(stored.t().contiguous(), spec.bits),
        scales=qt.scale.t().contiguous().half(),
        g_idx=(torch.arange(in_features, dtype=torch.int32) // group),
        max_zero_rounding=float((zero - rounded).abs().max()) if zero.numel() else 0.0,
    )


def from_gptq(t: GPTQTensors | dict[str, torch.Tensor], bits: int, group_size: int, sym: bool,
              fmt: GPTQFormat = GPTQFormat.V1) -> QuantizedTensor:
    """A GPTQ layer back to a QuantizedTensor, losslessly. ``group_size`` -1 means per-channel.
    Refuses act-order (a permuted g_idx): :func:`gptq_layer` reads those."""
    parts = t if isinstance(t, dict) else {p: getattr(t, p) for p in PARTS}
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    codes = unpack_columns(qweight.t().contiguous(), bits)  # [out, in]
    out_features, in_features = codes.shape
    g_idx = parts.get("g_idx")
    group = in_features if group_size in (-1, None) else group_size
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(in_features) // group):
        raise GPTQError("this GPTQ layer uses act-order (desc_act: a permuted g_idx); bitsmith reads GPTQ without act-order only")
    stored = unpack_columns(qzeros, bits)[:, :out_features].t().float()  # [out, G]
    zero = stored + zero_offset(fmt)
    spec = QuantSpec(bits, None if group == in_features and group_size in (-1, None) else group, False)
    if sym and bool((zero == (spec.qmax + 1) / 2).all()):
        return QuantizedTensor(codes, scales.t().contiguous().half(), None, QuantSpec(bits, spec.group_size, True))
    return QuantizedTensor(codes, scales.t().contiguous().half(), zero.half(), spec)


def gptq_layer(tensors: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool,
                        fmt: GPTQFormat = GPTQFormat.V1) -> tuple[QuantizedTensor, torch.Tensor | None]:
    """One GPTQ layer, act-order or not: (QuantizedTensor, None) without act-order; with it, the
    tensor over the input channels sorted by group and the permutation ``perm`` (sorted channel j =
    channel perm[j]). Sorting by group makes every group contiguous, so a permuted layer is a plain
    bitsmith layer over permuted inputs: ``y = x[..., perm] W_sorted^T``, the same products."""
    in_features = tensors["qweight"].shape[0] * 32 // bits
    group = in_features if group_size in (-1, None) else group_size
    g_idx = tensors.get("g_idx")
    plain = torch.arange(in_features) // group
    if g_idx is None or torch.equal(g_idx.long(), plain):
        return from_gptq(tensors, bits, group_size, sym, fmt), None
    perm = torch.argsort(g_idx.long(), stable=True)
    if not torch.equal(g_idx.long()[perm], plain):
        raise GPTQError(f"g_idx assigns groups of unequal size (group size {group}); the GPTQ folder is corrupt")
    qt = from_gptq({k: v for k, v in tensors.items() if k != "g_idx"}, bits, group_size, sym, fmt)
    return QuantizedTensor(qt.codes[:, perm].contiguous(), qt.scale, qt.zero, qt.spec), perm
