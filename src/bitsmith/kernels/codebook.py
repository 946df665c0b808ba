"""The native kernel of vector-codebook layers (``vq`` specs, csrc/codebook.cpp).

Keeps what the checkpoint stores (packed indices, fp16 group scales) plus the codebook as float32
(at most 256 x 4 floats, 4 KB: it stays in L1 while a row is gathered). Decode and small batches (up
to ``GEMV_MAX_ROWS`` activation rows) run ``bs_vq_gemv`` straight from the indices; larger batches
dequantize a few MB of rows at a time (``bs_vq_dequant``) and hand them to torch's float32 ``mm``.
Other devices and autograd fall back to the dequantize-then-matmul oracle.

With ``int8=True`` (``RuntimeOptions.int8_decode``, the default) and an AVX-512 VBMI + VNNI build,
1 to 8 activation rows instead run ``bs_vq_gemm_int8`` (csrc/codebook_int8.cpp): the codebook rounded
once to int8 with one per-codebook scale (``int8_codebook``) and looked up with byte shuffles, the
activations rounded to int8 per 32-weight block; it equals ``int8_oracle`` exactly (to float rounding).
With ``prefill="int8"`` or ``"auto"`` (``RuntimeOptions.prefill``), more rows (prefill, eval) take the
same arithmetic through the int8 prefill GEMM's tiles (``bs_vq_gemm_prefill``: csrc/gemm_tile.h, each
tile's indices looked up into natural-order int8 weights once per call) instead of the float32 blocks.
"""

from __future__ import annotations

import ctypes

import torch

from bitsmith.formats.packing import pack, packed_row_bytes
from bitsmith.kernels.torch_path import reference_linear
from bitsmith.runtime.options import PREFILL_CHOICES
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

GEMV_MAX_ROWS = 8  # the C gemv is specialised for 1..8 activation rows
CHUNK_BYTES = 2 << 20  # fp32 weight rows dequantized at a time on the batched path
PARALLEL_MIN_WEIGHTS = 1 << 16  # smaller matrices run on one thread

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the C signatures of csrc/codebook.cpp's functions on the loaded library."""
    lib.bs_vq_gemv.argtypes = [_PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _I64]
    lib.bs_vq_gemv.restype = None
    lib.bs_vq_dequant.argtypes = [_PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _I64, _PTR, _I64]
    lib.bs_vq_dequant.restype = None
    lib.bs_vq8_available.argtypes = []
    lib.bs_vq8_available.restype = ctypes.c_int
    lib.bs_vq_gemm_int8.argtypes = [_PTR, _I64, _PTR, _PTR, _PTR, ctypes.c_float, _I64, _I64, _I64, _I64, _I64, _PTR,
                                    _I64]
    lib.bs_vq_gemm_int8.restype = ctypes.c_int
    lib.bs_vq_gemm_prefill.argtypes = [_PTR, _I64, _PTR, _PTR, _PTR, ctypes.c_float, _I64, _I64, _I64, _I64, _I64, _PTR,
                                       _I64]
    lib.bs_vq_gemm_prefill.restype = ctypes.c_int
    return lib


def int8_codebook(grid: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The codebook [entries, d] as int8 entries and one scale: ``grid ~= q * scale``, |q| <= 127."""
    cb = grid.float()
    amax = float(cb.abs().max()) if cb.numel() else 0.0
    scale = amax / 127.0 if amax > 0 else 1.0
    return torch.round(cb / scale).clamp(-127, 127).to(torch.int8), scale


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x [..., in] rounded to int8 per 32-weight block (scale amax / 127; a short last block), as floats:
    what the int8 decode kernels multiply."""
    inn = x.shape[-1]
    pad = (-inn) % 32
    xb = torch.nn.functional.pad(x.float(), (0, pad)).reshape(*x.shape[:-1], -1, 32)
    scale = xb.abs().amax(dim=-1, keepdim=True) / 127.0
    q = torch.where(scale > 0, torch.round(xb / torch.where(scale > 0, scale, 1.0)), 0.0)
    return (q * scale).reshape(*x.shape[:-1], -1)[..., :inn]


def int8_oracle(x: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """What the int8 vq decode computes: the weights dequantized with the int8 codebook, times the
    int8-rounded activations (float64 products, so the kernel is held to its own rounding only)."""
    q, scale = int8_codebook(qt.grid)
    rounded = QuantizedTensor(qt.codes, qt.scale, None, qt.spec, (q.double() * scale))
    w = rounded.dequantize().double()
    return (int8_activations(x).double() @ w.T).float()


class CodebookKernel:
    """x [..., in] -> x W^T for a vq QuantizedTensor, from its packed indices."""

    name = "native-vq"

    def __init__(self, lib: ctypes.CDLL, qweight: torch.Tensor, scale: torch.Tensor, grid: torch.Tensor,
                 spec: QuantSpec, in_features: int, threads: int | None = None, int8: bool = False,
                 prefill: str = "exact") -> None:
        if spec.grid != "vq":
            raise ValueError(f"CodebookKernel runs vq specs, not {spec}")
        out_features = qweight.shape[0]
        if tuple(qweight.shape) != (out_features, packed_row_bytes(in_features // spec.vq_dim, spec.index_bits)):
            raise ValueError(f"packed indices {tuple(qweight.shape)} do not hold {in_features} inputs of {spec}")
        self._lib = declare(lib)
        self.spec, self.in_features, self.out_features, self.threads = spec, in_features, out_features, threads
        # the kernels read each run of indices as one 64-bit word: 8 bytes of padding after the last row
        padded = torch.zeros(qweight.numel() + 8, dtype=torch.uint8)
        self.qweight = padded[: qweight.numel()].view(qweight.shape)
        self.qweight.copy_(qweight)
        self.scale = scale.to(torch.float16).contiguous()
        self.grid = grid.to(torch.float16).contiguous()  # as stored
        self.codebook = self.grid.float().contiguous()  # what the kernel gathers from
        self._group = spec.group_size or max(in_features, 1)
        self._small = out_features * in_features < PARALLEL_MIN_WEIGHTS
        self.int8 = bool(int8) and bool(lib.bs_vq8_available())
        # the batched path: int8 through the int8 GEMM's tiles for "int8" and "auto" (on every CPU: vq has
        # no bf16 prefill, so "auto" does not mean bf16 here), else dequantize + float32 mm ("exact", "bf16")
        if prefill not in PREFILL_CHOICES:
            raise ValueError(f"prefill={prefill!r}; use one of {', '.join(PREFILL_CHOICES)}")
        self.prefill = "int8" if prefill in ("auto", "int8") and lib.bs_vq8_available() else "exact"
        if self.int8 or self.prefill == "int8":  # planes [d][entries] of the int8 codebook + 128 (what the byte shuffles index)
            q, self._cb_scale = int8_codebook(self.grid)
            self._tables = (q.to(torch.int16).T + 128).to(torch.uint8).contiguous()

    @classmethod
    def of(cls, lib: ctypes.CDLL, qt: QuantizedTensor, threads: int | None = None,
           int8: bool = False, prefill: str = "exact") -> "CodebookKernel":
        return cls(lib, pack(qt.codes, qt.spec.index_bits), qt.scale, qt.grid, qt.spec, qt.shape[1], threads, int8,
                   prefill)

    def _threads(self) -> int:
        return 1 if self._small else self.threads or torch.get_num_threads()

    def _shape_args(self) -> tuple[int, int, int, int]:
        return self.in_features, self.spec.vq_dim, self.spec.index_bits, self._group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
            return reference_linear(x, self.quantized())
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"input has {tuple(x.shape)[-1:]} features; this layer takes {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.float32).contiguous()  # [T, in]
        rows = x2.shape[0]
        y = torch.empty(rows, self.out_features, dtype=torch.float32)
        if rows and self.out_features:
            if rows <= GEMV_MAX_ROWS and self.int8 and self._gemm_int8(x2, y):
                pass
            elif rows <= GEMV_MAX_ROWS:
                self._lib.bs_vq_gemv(x2.data_ptr(), rows, self.qweight.data_ptr(), self.scale.data_ptr(),
                                     self.codebook.data_ptr(), self.out_features, self.in_features, self.spec.vq_dim,
                                     self.spec.index_bits, self._group, y.data_ptr(), self._threads())
            elif not (self.prefill == "int8" and self._gemm_prefill(x2, y)):
                self._blocked(x2, y)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def _gemm_int8(self, x2: torch.Tensor, y: torch.Tensor) -> bool:
        """1..8 rows through csrc/codebook_int8.cpp; False where that path does not take the shape."""
        return bool(self._lib.bs_vq_gemm_int8(
            x2.data_ptr(), x2.shape[0], self.qweight.data_ptr(), self.scale.data_ptr(), self._tables.data_ptr(), self._cb_scale,
            self.out_features, self.in_features, self.spec.vq_dim, self.spec.index_bits, self._group, y.data_ptr(),
            self._threads()))

    def _gemm_prefill(self, x2: torch.Tensor, y: torch.Tensor) -> bool:
        """Any number of rows through the int8 GEMM's tiles (csrc/codebook_int8.cpp bs_vq_gemm_prefill): the
        same int8 codebook and activations as the decode; False where that path does not take the shape."""
        return bool(self._lib.bs_vq_gemm_prefill(
            x2.data_ptr(), x2.shape[0], self.qweight.data_ptr(), self.scale.data_ptr(), self._tables.data_ptr(),
            self._cb_scale, self.out_features, self.in_features, self.spec.vq_dim, self.spec.index_bits, self._group,
            y.data_ptr(), self._threads()))

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of W, float32 [stop - start, in], computed by the native kernel."""
        buf = torch.empty(stop - start, self.in_features, dtype=torch.float32)
        self._lib.bs_vq_dequant(self.qweight.data_ptr(), self.scale.data_ptr(), self.codebook.data_ptr(),
                                *self._shape_args(), start, stop - start, buf.data_ptr(), self._threads())
        return buf

    def _blocked(self, x2: torch.Tensor, y: torch.Tensor) -> None:
        rows = max(1, CHUNK_BYTES // (4 * max(self.in_features, 1)))
        for start in range(0, self.out_features, rows):
            stop = min(start + rows, self.out_features)
            y[:, start:stop] = x2 @ self.dequantize_rows(start, stop).T

    def quantized(self) -> QuantizedTensor:
        return QuantizedTensor.from_state(self.qweight, self.scale, None, self.spec, self.in_features, self.grid)

    def to_state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.qweight": self.qweight, f"{prefix}.scale": self.scale, f"{prefix}.grid": self.grid}


def prepare_codebook(qt: QuantizedTensor, threads: int | None = None, int8: bool = False,
                     prefill: str = "exact") -> CodebookKernel | None:
    """The native kernel for a vq tensor, or None when the native library cannot be built. ``int8``:
    1 to 8 activation rows with the int8 codebook and activations where the CPU has the instructions;
    ``prefill`` (``RuntimeOptions.prefill``): more rows the same way when it is ``int8`` or ``auto``."""
    from bitsmith.kernels.build import native_library

    lib = native_library()
    return None if lib is None else CodebookKernel.of(lib, qt, threads, int8, prefill)
