"""Kernels written in torch alone: the reference (the oracle, kept whole) and the chunked fallback
used when the native library cannot be built."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bitsmith.tensor import QuantizedTensor

CHUNK_BYTES = 4 << 20  # fp32 weight rows dequantized at a time by the chunked path


def reference_linear(x: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """The oracle: dequantize the whole matrix to float32, then ``F.linear``. Also the path for inputs
    on another device (CUDA): the packed tensors stay on the CPU and the dequantized weight moves to
    the input's device per call (works, slowly; untested here, no GPU)."""
    return F.linear(x, qt.dequantize().to(device=x.device, dtype=x.dtype))


class ReferenceKernel:
    """Dequantize-then-matmul on every call; holds the unpacked QuantizedTensor."""

    name = "reference"

    def __init__(self, qt: QuantizedTensor) -> None:
        self.qt = qt

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return reference_linear(x, self.qt)

    def quantized(self) -> QuantizedTensor:
        return self.qt

    def to_state(self, prefix: str) -> dict[str, torch.Tensor]:
        return self.qt.to_state(prefix)


def dequantize_rows(qt: QuantizedTensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of ``qt.dequantize()``, float32 [stop - start, in], same arithmetic."""
    return qt.rows(slice(start, stop)).dequantize()


class ChunkedKernel(ReferenceKernel):
    """Dequantize a few MB of weight rows at a time and matmul them, so no fp32 copy of the whole
    matrix ever lives; the fallback when the native kernels are unavailable."""

    name = "torch-chunked"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out_features, in_features = self.qt.shape
        rows = max(1, CHUNK_BYTES // (4 * max(in_features, 1)))
        y = x.new_empty(*x.shape[:-1], out_features)  # [..., out]
        for start in range(0, out_features, rows):
            stop = min(start + rows, out_features)
            y[..., start:stop] = F.linear(x, dequantize_rows(self.qt, start, stop).to(device=x.device, dtype=x.dtype))
        return y
