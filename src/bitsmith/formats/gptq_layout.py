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

from bitsmith.formats.packing import pack, packed_row_bytes, unpack
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


def packed_codes(words: torch.Tensor, bits: int) -> int:
    """How many ``bits``-bit codes each row of GPTQ words holds, after checking that the words are
    what a GPTQ writer produces (2-D int32, a packing for ``bits``, whole codes per row): GPTQError
    otherwise, as a corrupt folder hands over."""
    if bits not in GPTQ_BITS:
        raise GPTQError(f"{bits}-bit codes have no GPTQ packing; the GPTQ config is corrupt (bits must be 2, 3, 4 or 8)")
    if words.dtype != torch.int32 or words.dim() != 2:
        raise GPTQError(f"packed GPTQ codes must be a 2-D int32 tensor, not {words.dtype} {tuple(words.shape)}; "
                        "the GPTQ folder is corrupt, download it again")
    w = words.shape[1]
    if packed_row_bytes(w * 32 // bits, bits) != w * 4:
        raise GPTQError(f"{w} int32 words do not hold whole {bits}-bit codes (GPTQ packs 32 codes into {bits} words); "
                        "the GPTQ folder is corrupt, download it again")
    return w * 32 // bits


def unpack_columns(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_columns`: int32 [rows, w] -> uint8 [rows, w * 32 / bits]; GPTQError
    for words no GPTQ writer produces (see :func:`packed_codes`)."""
    n = packed_codes(words, bits)
    rows, w = words.shape
    return unpack(words.contiguous().view(torch.uint8).reshape(rows, w * 4), bits, n)


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


def _layer_groups(parts: dict[str, torch.Tensor], bits: int, group_size: int | None) -> tuple[int, int, int]:
    """(in, out, group) of a GPTQ layer, after checking that its tensors fit each other: every
    shape below is what :func:`from_gptq` indexes by, so a corrupt folder stops here with a
    GPTQError instead of an IndexError or a shape error deep in unpacking."""
    missing = [p for p in PARTS[:3] if not isinstance(parts.get(p), torch.Tensor)]
    if missing:
        raise GPTQError(f"the GPTQ layer lacks {', '.join(missing)}; the GPTQ folder is incomplete, download it again")
    if type(group_size) is not int and group_size is not None or (group_size or -1) < -1 or group_size == 0:
        raise GPTQError(f"group_size {group_size!r} is neither -1 (per channel) nor a positive size; the GPTQ config is corrupt")
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    if qweight.dim() != 2:
        raise GPTQError(f"qweight has shape {tuple(qweight.shape)}, not [in * bits / 32, out]; the GPTQ folder is corrupt")
    in_features, out_features = packed_codes(qweight.t(), bits), qweight.shape[1]
    if not in_features or not out_features:
        raise GPTQError(f"the GPTQ layer is empty ({out_features}x{in_features} weights); the GPTQ folder is corrupt")
    group = in_features if group_size in (-1, None) else group_size
    groups = -(-in_features // group)  # a short last group counts, as QuantSpec.groups_per_row does
    if not scales.is_floating_point() or tuple(scales.shape) != (groups, out_features):
        raise GPTQError(f"scales are {scales.dtype} {tuple(scales.shape)}, not floats of shape {(groups, out_features)} "
                        f"for a {out_features}x{in_features} layer in groups of {group}; the GPTQ folder is corrupt")
    if qzeros.dim() != 2 or qzeros.shape[0] != groups or packed_codes(qzeros, bits) < out_features:
        raise GPTQError(f"qzeros of shape {tuple(qzeros.shape)} do not hold {groups} x {out_features} {bits}-bit zero "
                        "points; the GPTQ folder is corrupt, download it again")
    g_idx = parts.get("g_idx")
    if g_idx is not None and (g_idx.dim() != 1 or g_idx.numel() != in_features or g_idx.is_floating_point()):
        raise GPTQError(f"g_idx is {g_idx.dtype} {tuple(g_idx.shape)}, not {in_features} integers (one group per "
                        "input channel); the GPTQ folder is corrupt, download it again")
    return in_features, out_features, group


def from_gptq(t: GPTQTensors | dict[str, torch.Tensor], bits: int, group_size: int, sym: bool,
              fmt: GPTQFormat = GPTQFormat.V1) -> QuantizedTensor:
    """A GPTQ layer back to a QuantizedTensor, losslessly. ``group_size`` -1 means per-channel.
    Refuses act-order (a permuted g_idx): :func:`gptq_layer` reads those."""
    parts = t if isinstance(t, dict) else {p: getattr(t, p) for p in PARTS}
    _layer_groups(parts, bits, group_size)
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
    in_features, _, group = _layer_groups(tensors, bits, group_size)
    g_idx = tensors.get("g_idx")
    plain = torch.arange(in_features) // group
    if g_idx is None or torch.equal(g_idx.long(), plain):
        return from_gptq(tensors, bits, group_size, sym, fmt), None
    perm = torch.argsort(g_idx.long(), stable=True)
    if not torch.equal(g_idx.long()[perm], plain):
        raise GPTQError(f"g_idx assigns groups of unequal size (group size {group}); the GPTQ folder is corrupt")
    qt = from_gptq({k: v for k, v in tensors.items() if k != "g_idx"}, bits, group_size, sym, fmt)
    return QuantizedTensor(qt.codes[:, perm].contiguous(), qt.scale, qt.zero, qt.spec), perm
