"""torch's own weight-only kernels for the device path: tinygemm for 4-bit groups, int8pack for 8-bit rows.

Both repack the checkpoint's tensors once, at construction, into the layout torch's op reads, and keep
the checkpoint's own packed tensors on the host (the CPU) so that :meth:`to_state` and :meth:`quantized`
give them back byte for byte (the repacked form cannot: a zero point does not survive its fold into
tinygemm's offset).

- :class:`TorchInt4Kernel` (``torch-int4``): ``aten._weight_int4pack_mm`` on CUDA,
  ``_weight_int4pack_mm_for_cpu`` on the CPU. tinygemm computes ``w = (q - 8) * s + m`` per group of
  ``qGroupSize`` weights along the input; bitsmith's asymmetric codes are ``w = (q - z) * s``, so
  ``m = (8 - z) * s`` (computed in float32 from the fp16 ``s`` and ``z``, rounded once to the compute
  dtype); symmetric codes have ``z = 8``, so ``m = 0``. Takes 4-bit uniform codes whose group width is
  32, 64, 128 or 256 and divides the row, with ``out_features`` a multiple of 8 on CUDA (16 on the CPU).
  CUDA's kernel multiplies bfloat16 only: inputs of other dtypes are rounded to bf16 and the result cast
  back, and the scales and offsets are bf16. Device memory: the codes at 4 bits ([out, in / 2] bytes)
  plus ``[in / group, out, 2]`` bf16 scales and offsets, the checkpoint's byte count.
- :class:`TorchInt8Kernel` (``torch-int8``): ``aten._weight_int8pack_mm`` (int8 codes, one float scale
  per output row) for 8-bit uniform codes with one group per row (``w8``, ``w8s``). bitsmith's codes are
  0..255 with a zero ``z``: ``w = (q - 128) * s + (128 - z) * s``, so the op gets ``q - 128`` as int8 and
  the row offset ``m = (128 - z) * s`` is added as ``sum(x) * m`` (float32). Device memory: [out, in] int8
  plus two float32 values per row. The CPU variant takes rows of a multiple of 16 inputs only (torch's
  bf16 CPU path miscomputes other widths).

``*_takes`` say why a layer is not taken (None when it is), so the selector
(:mod:`bitsmith.kernels.device_select`) can log it; an unsupported shape never reaches torch's op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bitsmith.kernels.device import check_layer_input
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

TINYGEMM_GROUPS = (32, 64, 128, 256)
INT4_OUT_MULTIPLE = {"cuda": 8, "cpu": 16}  # tinygemm's n-tile constraints (the CPU one checks N % 16)
INT4_MIDPOINT = 8  # tinygemm's codes are offset by 8: w = (q - 8) * scale + offset
INT8_MIDPOINT = 128  # bitsmith's 8-bit codes 0..255 -> int8 -128..127
# torch 2.13's CPU int8pack with bfloat16 inputs returns garbage (or crashes) when in_features is not a
# multiple of 16 (seen at 13, 24, 40, 100, 200, 1000 inputs; 16 * n all right): the CPU variant takes only those
INT8_CPU_IN_MULTIPLE = 16


def int4_takes(spec: QuantSpec, grid: torch.Tensor | None, out_features: int, in_features: int,
               device: torch.device) -> str | None:
    """None when tinygemm takes this layer on ``device``, else why not (one short phrase)."""
    if spec.bits != 4 or spec.grid != "uniform" or grid is not None:
        return "not 4-bit uniform codes"
    if device.type not in INT4_OUT_MULTIPLE:
        return f"no tinygemm on {device.type}"
    width = spec.group_width(in_features)
    if width not in TINYGEMM_GROUPS or in_features % width:
        return f"group width {width} over {in_features} inputs (tinygemm takes whole groups of 32-256)"
    multiple = INT4_OUT_MULTIPLE[device.type]
    if out_features % multiple:
        return f"{out_features} outputs, not a multiple of {multiple}"
    return None


def int8_takes(spec: QuantSpec, grid: torch.Tensor | None, out_features: int, in_features: int,
               device: torch.device) -> str | None:
    """None when int8pack takes this layer on ``device``, else why not."""
    if spec.bits != 8 or spec.grid != "uniform" or grid is not None:
        return "not 8-bit uniform codes"
    if spec.groups_per_row(in_features) != 1:
        return "grouped 8-bit (int8pack takes one scale per row)"
    if device.type not in ("cuda", "cpu"):
        return f"no int8pack on {device.type}"
    if device.type == "cpu" and in_features % INT8_CPU_IN_MULTIPLE:
        return f"{in_features} inputs, not a multiple of {INT8_CPU_IN_MULTIPLE} (the CPU op's bf16 path)"
    return None


def inner_k_tiles(in_features: int) -> int:
    """tinygemm's CUDA layout packs 2, 4 or 8 k-tiles of 16 side by side: the widest that divides the row."""
    return next(tiles for tiles in (8, 4, 2) if in_features % (tiles * 16) == 0)


def repack_int4(codes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 codes [out, in] (0..15) -> tinygemm's packed weight on ``device``."""
    if device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 8)
    pairs = codes.to(device)
    nibbles = ((pairs[:, ::2] << 4) | pairs[:, 1::2]).contiguous()  # CUDA input: even k in the high nibble
    return torch.ops.aten._convert_weight_to_int4pack(nibbles, inner_k_tiles(codes.shape[1]))


def int4_scales_and_offsets(scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """float32 [groups, out, 2]: tinygemm's (scale, offset) pairs, offset ``m = (8 - z) * s``."""
    s = scale.float()
    z = zero.float() if zero is not None else torch.full_like(s, INT4_MIDPOINT)
    return torch.stack([s, (INT4_MIDPOINT - z) * s], dim=-1).transpose(0, 1).contiguous()


class HostCheckpoint:
    """The checkpoint's packed tensors, kept on the CPU, and the calls that only need them."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec,
                 in_features: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.spec, self.in_features, self.out_features = spec, in_features, qweight.shape[0]
        self.qweight, self.scale = qweight.cpu(), scale.cpu()
        self.zero = None if zero is None else zero.cpu()
        # validates the tensors against the spec once (shapes, dtypes)
        self.checkpoint = QuantizedTensor.from_state(self.qweight, self.scale, self.zero, spec, in_features)

    def check_input(self, x: torch.Tensor) -> None:
        check_layer_input(x, self.in_features, self.device)

    def check_taken(self, takes: Callable[..., str | None], op: str) -> None:
        """Refuse (ValueError, saying why) a layer that ``takes`` (:func:`int4_takes`, :func:`int8_takes`)
        says torch's ``op`` cannot run on this device."""
        reason = takes(self.spec, None, self.out_features, self.in_features, self.device)
        if reason is not None:
            raise ValueError(f"{op} cannot take this {self.spec} layer [{self.out_features} x {self.in_features}]: {reason}")

    def quantized(self) -> QuantizedTensor:
        """The QuantizedTensor on the kernel's device (codes unpacked from the host copy)."""
        return self.checkpoint.to(self.device)

    def to_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The checkpoint's packed tensors, on the CPU, unchanged."""
        state = {f"{prefix}.qweight": self.qweight, f"{prefix}.scale": self.scale}
        if self.zero is not None:
            state[f"{prefix}.zero"] = self.zero
        return state


OP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the activations torch's weight-only ops take


def as_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [..., in] -> a contiguous [rows, in] matrix in ``dtype`` (float32 for a dtype the ops do not take)."""
    return x.reshape(-1, x.shape[-1]).to(dtype if dtype in OP_DTYPES else torch.float32).contiguous()


class TorchInt4Kernel(HostCheckpoint):
    """x [..., in] -> y [..., out] in x's dtype through tinygemm (see the module docstring).

    ``compute_dtype``: the dtype tinygemm multiplies in; None takes the input's (the CPU op takes float32,
    bfloat16 and float16), and CUDA is always bfloat16 (its only one). Tests and the accuracy bench pass
    bfloat16 on the CPU to see the arithmetic a GPU does."""

    name = "torch-int4"

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec,
                 in_features: int, device: torch.device | str, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__(qweight, scale, zero, spec, in_features, device)
        self.check_taken(int4_takes, "tinygemm")
        self.compute_dtype = torch.bfloat16 if self.device.type == "cuda" else compute_dtype
        self.group = spec.group_width(in_features)
        self.packed = repack_int4(self.checkpoint.codes, self.device)
        self._pairs: dict[torch.dtype, torch.Tensor] = {}
        if self.compute_dtype is not None:  # made now, at load: the device holds it from the start
            self._pairs_in(self.compute_dtype)

    def _pairs_in(self, dtype: torch.dtype) -> torch.Tensor:
        """The (scale, offset) pairs in ``dtype``, rounded once from float32 and kept."""
        if dtype not in self._pairs:
            self._pairs[dtype] = int4_scales_and_offsets(self.scale, self.zero).to(self.device, dtype)
        return self._pairs[dtype]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        rows = as_rows(x, self.compute_dtype or x.dtype)
        if rows.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], self.out_features)
        pairs = self._pairs_in(rows.dtype)
        if self.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group, pairs)
        else:
            y = torch.ops.aten._weight_int4pack_mm(rows, self.packed, self.group, pairs)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class TorchInt8Kernel(HostCheckpoint):
    """x [..., in] -> y [..., out] in x's dtype through int8pack (see the module docstring). On the CPU
    the op takes its scales in the input's dtype (rounded from float32 per call); CUDA's takes float32.
    ``compute_dtype``: the dtype the input is given to the op in (None: the input's own)."""

    name = "torch-int8"

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec,
                 in_features: int, device: torch.device | str, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__(qweight, scale, zero, spec, in_features, device)
        self.check_taken(int8_takes, "int8pack")
        self.compute_dtype = compute_dtype
        codes = self.checkpoint.codes.to(self.device)
        self.codes = (codes.to(torch.int16) - INT8_MIDPOINT).to(torch.int8).contiguous()  # [out, in]
        s = self.scale.float().reshape(-1)
        self.row_scale = s.to(self.device)
        # (128 - z) * s per row; None for symmetric codes, whose zero is 128
        self.row_offset = None if self.zero is None else ((INT8_MIDPOINT - self.zero.float().reshape(-1)) * s).to(self.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        rows = as_rows(x, self.compute_dtype or x.dtype)
        if rows.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], self.out_features)
        scale = self.row_scale if self.device.type == "cuda" else self.row_scale.to(rows.dtype)
        y = torch.ops.aten._weight_int8pack_mm(rows, self.codes, scale)
        if self.row_offset is not None:
            y = y.float() + rows.float().sum(-1, keepdim=True) * self.row_offset
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
