"""The compressed-tensors ``pack-quantized`` layout (what llm-compressor writes and vLLM loads
natively), both ways, as pure functions of tensors: :mod:`bitsmith.io.export_ct` writes folders,
:mod:`bitsmith.io.import_ct` reads them.

Per quantized linear layer ``L`` (``out`` x ``in`` weights, ``G`` groups of ``group_size``):

    L.weight_packed      int32 [out, ceil(in * bits / 32)]  codes packed along the input dim: each row
                                                            one little-endian bit stream, 32 codes in
                                                            ``bits`` words (codes straddle words)
    L.weight_scale       float [out, G]                     (G = 1 for the "channel" strategy)
    L.weight_zero_point  int32 [ceil(out * bits / 32), G]   asymmetric only: zero points packed the
                                                            same way along the *output* dim
    L.weight_shape       int64 [2]                          (out, in)

compressed-tensors stores signed values ``q`` in ``[-2**(bits-1), 2**(bits-1))`` and packs ``q +
2**(bits-1)``; it dequantizes ``w = (q - zp) * scale``. bitsmith's codes are that packed unsigned
value, so ``code = q + 2**(bits-1)`` and ``zero = zp + 2**(bits-1)``: the packed words are bitsmith's
codes and (rounded) zeros as they are, and a symmetric spec's fixed midpoint is ``zp = 0``.

What does not map, and is refused: non-uniform grids (``nf``, ``fit``: compressed-tensors has no
lookup-table format). compressed-tensors has no short last group (it requires ``in % group_size
== 0``), so a layer whose row is not a whole number of groups (w4g128 on SmolLM2's 576-wide rows) is
written exactly with the largest group that divides both, ``gcd(group, in)`` (64 there), each
original scale repeated over its sub-groups: the same weights, a little more scale storage.
Fractional zero points (HQQ) are rounded to integers and the rounding is returned for the caller to
report, as the GPTQ layout does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bitsmith.formats.packing import pack, unpack
from bitsmith.spec import GROUP_SIZES, QuantSpec
from bitsmith.tensor import QuantizedTensor

PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}  # both hold bitsmith's fp16 scales exactly


class CTError(ValueError):
    """A tensor or folder the compressed-tensors layout cannot hold, or one that is not such a
    folder; the message names the fix."""


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [rows, n] codes (< 2**bits) -> int32 [rows, ceil(n * bits / 32)], compressed-tensors'
    dense packing: bitsmith's packing writes the same little-endian bit stream (8 codes to ``bits``
    bytes), so pad to whole 32-code runs, pack, and keep the words a row needs."""
    rows, n = codes.shape
    padded = torch.nn.functional.pad(codes, (0, -n % 32))
    words = pack(padded.contiguous(), bits).view(torch.int32).reshape(rows, -1)
    return words[:, : math.ceil(n * bits / 32)].contiguous()


def unpack_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 [rows, ceil(n * bits / 32)] -> uint8 [rows, n]; CTError
    for words of another dtype or width (a corrupt folder)."""
    if words.dtype != torch.int32 or words.dim() != 2 or words.shape[1] != math.ceil(n * bits / 32):
        raise CTError(f"packed codes are {words.dtype} {tuple(words.shape)}, not int32 words holding {n} {bits}-bit "
                      "codes per row; the compressed-tensors folder is corrupt, download or export it again")
    rows, w = words.shape
    padded = torch.nn.functional.pad(words, (0, -w % bits))  # whole 32-code runs of ``bits`` words
    data = padded.contiguous().view(torch.uint8).reshape(rows, -1)
    return unpack(data, bits, data.shape[1] * 8 // bits)[:, :n].contiguous()


@dataclass(frozen=True)
class CTTensors:
    """One layer in the pack-quantized layout, with the scheme it needs."""

    weight_packed: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor | None
    weight_shape: torch.Tensor
    bits: int
    group_size: int | None  # None: the "channel" strategy
    symmetric: bool
    max_zero_rounding: float  # largest |zero - stored zero| in code units (0 for integer zeros)

    def parts(self) -> dict[str, torch.Tensor]:
        """The stored tensors by part name (no zero point when symmetric)."""
        return {p: getattr(self, p) for p in PARTS if getattr(self, p) is not None}

    def state(self, module: str) -> dict[str, torch.Tensor]:
        return {f"{module}.{p}": t for p, t in self.parts().items()}

    @property
    def scheme_key(self) -> tuple[int, int | None, bool]:
        return self.bits, self.group_size, self.symmetric


def ct_group(spec: QuantSpec, in_features: int) -> int | None:
    """The compressed-tensors group size for ``spec`` on rows of ``in_features``: the spec's own when
    it divides the row, else the largest divisor of both (see the module docstring); None per channel."""
    if spec.group_size is None:
        return None
    return math.gcd(spec.group_size, in_features)


def shared_group(spec: QuantSpec, row_widths: list[int]) -> int | None:
    """One compressed-tensors group size for every layer of ``spec``: the largest that divides the
    spec's group and every row width (w4g128 on SmolLM2's 576- and 1536-wide rows: 64). Loaders that
    apply a single scheme to every layer (transformers' dequantizing path) need one size."""
    if spec.group_size is None:
        return None
    return math.gcd(spec.group_size, *row_widths)


def to_ct(qt: QuantizedTensor, scale_dtype: torch.dtype = torch.float16, group: int | None = None) -> CTTensors:
    """One layer in the pack-quantized layout; CTError for what it cannot hold. ``group``: write
    with this smaller group size (it must divide the spec's and the row), e.g. one size shared by
    every layer of the spec (see :func:`shared_group`); default :func:`ct_group`."""
    spec, (out_features, in_features) = qt.spec, qt.shape
    if spec.grid != "uniform":
        raise CTError(f"{spec} is a non-uniform grid; compressed-tensors stores uniform integer codes only: "
                      "quantize with a uniform spec (e.g. w4g128) or export to GGUF")
    if scale_dtype not in SCALE_DTYPES.values():
        raise CTError(f"scales in {scale_dtype} would round bitsmith's fp16 scales; use float16 or float32")
    if group is None or spec.group_size is None:
        group = ct_group(spec, in_features)
    elif spec.group_size % group or in_features % group:
        raise CTError(f"group size {group} does not split {spec}'s groups on rows of {in_features} evenly")
    scale, zero = qt.scale, qt.zero
    if group is not None and group != spec.group_size:  # repeat each scale over its sub-groups
        index = torch.arange(in_features // group) * group // spec.group_size
        scale, zero = scale[:, index], None if zero is None else zero[:, index]
    zero_point, rounding = None, 0.0
    if zero is not None:
        stored = torch.round(zero.float()).clamp(0, spec.qmax)
        rounding = float((zero.float() - stored).abs().max()) if zero.numel() else 0.0
        zero_point = pack_rows(stored.to(torch.uint8).t().contiguous(), spec.bits).t().contiguous()
    return CTTensors(
        weight_packed=pack_rows(qt.codes, spec.bits), weight_scale=scale.to(scale_dtype).contiguous(),
        weight_zero_point=zero_point, weight_shape=torch.tensor([out_features, in_features], dtype=torch.int64),
        bits=spec.bits, group_size=group, symmetric=zero is None, max_zero_rounding=rounding,
    )


def weight_args(bits: int, group_size: int | None, symmetric: bool) -> dict:
    """The ``weights`` entry of a config group (compressed-tensors' QuantizationArgs, written out)."""
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": group_size,
            "strategy": "channel" if group_size is None else "group", "block_structure": None,
            "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}}


def _layer_shape(parts: dict[str, torch.Tensor], bits: int) -> tuple[int, int]:
    """(out, in) of a stored layer: weight_shape when present, else the packed words (whose width
    pins ``in`` down only to within 32 / bits, so the scales' groups decide)."""
    shape = parts.get("weight_shape")
    packed = parts["weight_packed"]
    if shape is not None:
        if shape.numel() != 2 or shape.is_floating_point():
            raise CTError(f"weight_shape is {shape.tolist()!r:.60}, not two integers; the folder is corrupt")
        out_features, in_features = (int(v) for v in shape.tolist())
    elif packed.dim() == 2:
        out_features, in_features = packed.shape[0], packed.shape[1] * 32 // bits
    else:
        raise CTError(f"weight_packed has shape {tuple(packed.shape)}, not [out, words]; the folder is corrupt")
    if out_features <= 0 or in_features <= 0:
        raise CTError(f"the layer is empty ({out_features}x{in_features}); the folder is corrupt")
    return out_features, in_features


def from_ct(parts: dict[str, torch.Tensor], args: dict) -> QuantizedTensor:
    """A pack-quantized layer back to a QuantizedTensor, losslessly (scales become fp16: exact for
    fp16 and float32 scales that hold fp16 values, as bitsmith writes; other scales are rounded)."""
    bits, group_size, symmetric = args.get("num_bits"), args.get("group_size"), args.get("symmetric", True)
    strategy = args.get("strategy")
    if args.get("type", "int") != "int" or type(bits) is not int or not 2 <= bits <= 8:
        raise CTError(f"weights of type {args.get('type')!r} with {bits!r:.20} bits; bitsmith reads integer weights of 2 to 8 bits")
    if strategy not in ("group", "channel"):
        raise CTError(f"the {strategy!r} strategy is not read by bitsmith; it reads group-wise and channel-wise weights")
    missing = [p for p in PARTS[:2] if p not in parts] + ([] if symmetric or "weight_zero_point" in parts else ["weight_zero_point"])
    if missing:
        raise CTError(f"the layer lacks {', '.join(missing)}; the folder is incomplete, download or export it again")
    out_features, in_features = _layer_shape(parts, bits)
    group = in_features if strategy == "channel" else group_size
    if type(group) is not int or group <= 0 or in_features % group:
        raise CTError(f"group size {group!r:.20} does not divide the row of {in_features} weights; the config is corrupt")
    groups = in_features // group
    scale = parts["weight_scale"]
    if not scale.is_floating_point() or tuple(scale.shape) != (out_features, groups):
        raise CTError(f"weight_scale is {scale.dtype} {tuple(scale.shape)}, not floats of shape {(out_features, groups)}; "
                      "the folder is corrupt")
    codes = unpack_rows(parts["weight_packed"], bits, in_features)
    if codes.shape[0] != out_features:
        raise CTError(f"weight_packed has {codes.shape[0]} rows, not {out_features}; the folder is corrupt")
    zero = None
    if not symmetric:
        stored = parts["weight_zero_point"]
        if stored.dim() != 2 or stored.shape[1] != groups:
            raise CTError(f"weight_zero_point has shape {tuple(stored.shape)}, not [words, {groups}]; the folder is corrupt")
        zero = unpack_rows(stored.t().contiguous(), bits, out_features).t().contiguous().half()
    scale = scale.half()
    if strategy == "group":
        group, scale, zero = merge_groups(group, in_features, scale, zero)
    spec = QuantSpec(bits, None if strategy == "channel" else group, symmetric)
    return QuantizedTensor(codes, scale, zero, spec)


def merge_groups(group: int, in_features: int, scale: torch.Tensor, zero: torch.Tensor | None
                 ) -> tuple[int, torch.Tensor, torch.Tensor | None]:
    """Undo :func:`ct_group`'s split: the largest bitsmith group size made of runs of ``group``-wide
    groups that share scale and zero (w4g128 on a 576-wide row comes back as g128 with a short last
    group), or ``group`` itself when it is a bitsmith size and no run merges. Exact either way: only
    equal scales are merged. CTError when neither exists."""
    for size in sorted(GROUP_SIZES, reverse=True):
        if size <= group or size % group or size >= in_features + group:
            continue
        k = size // group
        first = torch.arange(scale.shape[1]) // k * k  # each group's run leader
        if torch.equal(scale, scale[:, first]) and (zero is None or torch.equal(zero, zero[:, first])):
            return size, scale[:, ::k].contiguous(), None if zero is None else zero[:, ::k].contiguous()
    if group in GROUP_SIZES:
        return group, scale, zero
    raise CTError(f"group size {group} has no bitsmith spec (bitsmith uses {', '.join(map(str, GROUP_SIZES))} "
                  "or per channel); re-quantize the model with one of those")
