"""The kernel for accelerators (CUDA, or any torch device): packed codes resident on the device,
dequantized there in row blocks and multiplied with the device's own matmul.

Resident device memory is the packed checkpoint bytes (codes, fp16 scales and zeros), not a float
copy of the weights; each call dequantizes at most ``CHUNK_ELEMENTS`` weights at a time into a
transient buffer in the input's dtype. The arithmetic is the reference's (codes and scales in
float32, ``(q - z) * s``), rounded once to the input's dtype, so on a CPU it equals
:func:`bitsmith.kernels.reference_linear` bit for bit in float32; the same code is what runs on a
GPU, which is how CI (no GPU) tests the GPU path. A fused Triton/tinygemm kernel would skip the
transient buffer; on CUDA the dequantization is compiled by ``torch.compile`` (Triton) into one
fused kernel where that works, else it runs as eager torch ops (``RuntimeOptions.compile=False``, the
user's ``$BITSMITH_COMPILE=0``, forces eager; ``True`` compiles on any device).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from bitsmith.formats.packing import unpack
from bitsmith.primitives import expand_groups
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

log = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 25  # weights dequantized per block (128 MB of float32): few launches, bounded memory


def dequantize_packed(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, grid: torch.Tensor | None,
                      spec: QuantSpec, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, in] in ``dtype``: the reference's float32 ``(q - z) * s`` (or ``grid[q] * s``), rounded once."""
    if spec.grid == "vq":  # one index per vq_dim weights into the codebook: the tensor's own reconstruction
        return QuantizedTensor.from_state(qweight, scale, None, spec, in_features, grid).dequantize().to(dtype)
    codes = unpack(qweight, spec.bits, in_features)  # uint8 [R, in]
    rows = codes.shape[0]
    width = spec.group_width(in_features)
    if in_features % width == 0:  # whole groups: broadcast per group instead of materialising expanded scales
        groups = in_features // width
        s = scale.float().view(rows, groups, 1)
        q = codes.view(rows, groups, width)
        if grid is not None:
            w = grid.float()[q.long()] * s
        else:
            z = zero.float().view(rows, groups, 1) if zero is not None else (spec.qmax + 1) / 2
            w = (q.float() - z) * s
        return w.view(rows, in_features).to(dtype)
    s = expand_groups(scale.float(), spec, in_features)
    if grid is not None:
        return (grid.float()[codes.long()] * s).to(dtype)
    z = expand_groups(zero.float(), spec, in_features) if zero is not None else (spec.qmax + 1) / 2
    return ((codes.float() - z) * s).to(dtype)


_compiled = None  # torch.compile(dequantize_packed), made on first use
_COMPILE_FAILED: set[int] = set()  # bit widths whose compilation failed once: not tried again (one warning)


def _compiled_dequantize():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(dequantize_packed)  # ints (bits, group) stay static; shapes go dynamic on a recompile
    return _compiled


def want_compile(device: torch.device, choice: bool | None) -> bool:
    """Whether to compile the dequantization: ``choice`` when given, else (None, auto) on CUDA only."""
    return device.type == "cuda" if choice is None else choice


def check_layer_input(x: torch.Tensor, in_features: int, device: torch.device) -> None:
    """A clear error for an input of the wrong width or on another device than the layer's weights."""
    if x.shape[-1:] != (in_features,):
        raise ValueError(f"input has {tuple(x.shape)[-1:]} features; this layer takes {in_features}")
    if x.device != device:
        raise ValueError(f"input is on {x.device} but this layer's weights are on {device}; move the model "
                         f"with model.to({str(x.device)!r}) or the input with x.to({str(device)!r})")


class DeviceKernel:
    """x [..., in] on ``device`` -> y [..., out] in x's dtype, from packed codes kept on ``device``."""

    name = "device"

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec,
                 in_features: int, device: torch.device | str, grid: torch.Tensor | None = None,
                 compile: bool | None = None) -> None:
        self.device = torch.device(device)
        self.spec, self.in_features, self.out_features = spec, in_features, qweight.shape[0]
        self.qweight = qweight.to(self.device).contiguous()  # uint8 [out, row_bytes], formats.packing layout
        self.scale = scale.to(self.device, torch.float16).contiguous()  # fp16 [out, G]
        self.zero = None if zero is None else zero.to(self.device, torch.float16).contiguous()
        self.grid = None if grid is None else grid.to(self.device)
        # validates shapes against the spec once, on the device
        QuantizedTensor.from_state(self.qweight[:1], self.scale[:1], None if self.zero is None else self.zero[:1],
                                   spec, in_features, self.grid)
        self._rows = max(1, CHUNK_ELEMENTS // max(in_features, 1))
        self._compile = want_compile(self.device, compile)

    def _weights(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [start, stop) dequantized on the device, [stop - start, in] in ``dtype``."""
        args = (self.qweight[start:stop], self.scale[start:stop], None if self.zero is None else self.zero[start:stop],
                self.grid, self.spec, self.in_features, dtype)
        if self._compile and self.spec.bits not in _COMPILE_FAILED:
            try:
                return _compiled_dequantize()(*args)
            except Exception as exc:  # no Triton, an old GPU, a compiler bug: eager ops give the same values
                # seen on torch 2.11 + CUDA for 2-6 bits ("failed to eval lshift"); 8 bits compiled there
                _COMPILE_FAILED.add(self.spec.bits)
                log.warning("torch.compile of the %d-bit dequantization failed (%s: %s); using eager torch ops",
                            self.spec.bits, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                self._compile = False
        return dequantize_packed(*args)

    def _block(self, start: int, stop: int) -> QuantizedTensor:
        zero = None if self.zero is None else self.zero[start:stop]
        return QuantizedTensor.from_state(self.qweight[start:stop], self.scale[start:stop], zero, self.spec,
                                          self.in_features, self.grid)

    def check_input(self, x: torch.Tensor) -> None:
        check_layer_input(x, self.in_features, self.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.out_features <= self._rows:
            return F.linear(x, self._weights(0, self.out_features, x.dtype))
        y = x.new_empty(*x.shape[:-1], self.out_features)  # [..., out]
        for start in range(0, self.out_features, self._rows):
            stop = min(start + self._rows, self.out_features)
            y[..., start:stop] = F.linear(x, self._weights(start, stop, x.dtype))
        return y

    def quantized(self) -> QuantizedTensor:
        """The QuantizedTensor (codes unpacked on the device)."""
        return self._block(0, self.out_features)

    def to_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The packed tensors, on the CPU, as a checkpoint stores them."""
        state = {f"{prefix}.qweight": self.qweight.cpu(), f"{prefix}.scale": self.scale.cpu()}
        if self.zero is not None:
            state[f"{prefix}.zero"] = self.zero.cpu()
        if self.grid is not None:
            state[f"{prefix}.grid"] = self.grid.cpu()
        return state
