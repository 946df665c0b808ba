"""A Triton GEMM that reads bitsmith's packed codes and dequantizes them inside the matmul (issue 18).

``y [M, N] = x [M, K] @ dequant(W) [N, K]^T``: each program loads a tile of packed code bytes
(:mod:`bitsmith.formats.packing`'s layout), turns it into weights in registers (``(q - z) * s`` in
float32, or ``grid[q] * s`` for nf/fit grids and vq codebooks), rounds them once to x's dtype as
:class:`~bitsmith.kernels.device.DeviceKernel` does, and accumulates the products in float32. No float
copy of the weight is ever written: resident memory is the checkpoint's packed bytes.

The packed layout is one little-endian bit stream per row (8 codes take ``bits`` bytes, code ``c``
at bits ``[c*bits, (c+1)*bits)``), so a code of any width 2-8 lies in the byte ``c*bits // 8`` and, for
3, 5, 6 and 7 bits, sometimes in the next one too: one rule reads every width, and vq indices (6 or 8
bits, one per ``vq_dim`` weights) the same way.

On CUDA the kernel is compiled by Triton. On CPU tensors it runs in Triton's interpreter (numpy, far
slower than the CPU kernels), which Triton switches on only when ``TRITON_INTERPRET=1`` is set before
it is first imported: that is how CI, which has no GPU, tests this same kernel source against the
oracle (``tests/conftest.py`` sets it when no GPU is present), and Triton compiles it for sm_80/sm_90
without a device (``tests/kernels/triton_compile.py``). :func:`supports` says no to a CPU layer unless
the interpreter is on, so the selector never picks this kernel on the CPU.

Triton is an optional dependency (the ``gpu`` extra); without it this module does not import and the
selector keeps the generic :class:`~bitsmith.kernels.device.DeviceKernel`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitsmith.kernels.device import DeviceKernel
from bitsmith.kernels.self_check import kernel_passes, sample_layer
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

DECODE_ROWS = 8  # up to this many activation rows: broadcast-multiply tiles; above, tl.dot tiles
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # x dtypes the fused kernel takes
MIN_CUDA_CAPABILITY = (7, 5)  # the oldest GPUs (Turing) the Triton releases we target still compile for


@triton.jit
def _codes(q_ptr, rn, rk, row_bytes, wmask, CODE_BITS: tl.constexpr, VQ_DIM: tl.constexpr):
    """int32 [BLOCK_K, BLOCK_N]: the code of weight (n, k), bits [c*CODE_BITS, (c+1)*CODE_BITS) of row
    n's little-endian stream, c = k // VQ_DIM (formats.packing)."""
    bit = (rk // VQ_DIM) * CODE_BITS
    byte = q_ptr + rn[None, :] * row_bytes + (bit // 8)[:, None]
    word = tl.load(byte, mask=wmask, other=0).to(tl.int32)
    if 8 % CODE_BITS != 0:  # 3, 5, 6, 7 bits: a code may run into the next byte
        spill = wmask & ((bit % 8 + CODE_BITS) > 8)[:, None]
        word = word | (tl.load(byte + 1, mask=spill, other=0).to(tl.int32) << 8)
    return (word >> (bit % 8)[:, None]) & ((1 << CODE_BITS) - 1)


@triton.jit
def _weights(code, s_ptr, z_ptr, g_ptr, rn, rk, k0, n_ok, wmask, groups, group_width,
             VQ_DIM: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_GRID: tl.constexpr, MID: tl.constexpr):
    """float32 [BLOCK_K, BLOCK_N]: (q - z) * s, (q - MID) * s without zeros, or grid[q] * s; 0 off the matrix.
    The K block lies in one group (block_config), so one scale (and zero) per output row."""
    at = rn[None, :] * groups + k0 // group_width  # [1, BLOCK_N]
    smask = n_ok[None, :]
    scale = tl.load(s_ptr + at, mask=smask, other=0.0).to(tl.float32)
    if HAS_GRID:  # nf/fit levels ([levels]) or a vq codebook ([entries, VQ_DIM]), as float32
        w = tl.load(g_ptr + code * VQ_DIM + (rk % VQ_DIM)[:, None], mask=wmask, other=0.0) * scale
    elif HAS_ZERO:
        w = (code.to(tl.float32) - tl.load(z_ptr + at, mask=smask, other=0.0).to(tl.float32)) * scale
    else:
        w = (code.to(tl.float32) - MID) * scale
    return tl.where(wmask, w, 0.0)


@triton.jit
def _to_dtype(v, DTYPE: tl.constexpr):
    """float32 -> DTYPE, rounded to nearest even. For bfloat16 the rounding is done here in integer
    arithmetic, because Triton's interpreter (the CPU tests) truncates a float32 -> bfloat16 cast."""
    if DTYPE == tl.bfloat16:
        b = v.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536  # keep the high 16 bits, rounded half to even
        v = b.to(tl.float32, bitcast=True)
    return v.to(DTYPE)


@triton.jit
def gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, g_ptr, y_ptr, M, N, K, row_bytes, groups, group_width,
          CODE_BITS: tl.constexpr, VQ_DIM: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_GRID: tl.constexpr,
          MID: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of y; each step of the K loop dequantizes [BLOCK_K, BLOCK_N] weights."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        wmask = k_ok[:, None] & n_ok[None, :]
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        code = _codes(q_ptr, rn, rk, row_bytes, wmask, CODE_BITS, VQ_DIM)
        w = _weights(code, s_ptr, z_ptr, g_ptr, rn, rk, k0, n_ok, wmask, groups, group_width,
                     VQ_DIM, HAS_ZERO, HAS_GRID, MID)
        w = _to_dtype(w, x_ptr.dtype.element_ty)  # rounded once to x's dtype, as DeviceKernel's weights are
        if USE_DOT and DOT_FP32:  # the same exact products, as float32 operands (see dot_in_fp32)
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        elif USE_DOT:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:  # few rows: a dot's 16-row minimum would waste most of the tile
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    out = y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(out, _to_dtype(acc, y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def interpreter_on() -> bool:
    """Whether the user switched Triton's interpreter on (``TRITON_INTERPRET=1``, read by Triton)."""
    knobs = getattr(triton, "knobs", None)
    return bool(knobs is not None and knobs.runtime.interpret)


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether tl.dot gets float32 operands for a ``dtype`` input: bfloat16 under Triton's interpreter,
    whose dot multiplies a bfloat16's storage integers (seen in Triton 3.9). The products of bfloat16
    values are exact in float32 either way; a GPU keeps the bfloat16 tensor-core dot."""
    return dtype == torch.bfloat16 and interpreter_on()


def supports(spec: QuantSpec, grid: torch.Tensor | None, in_features: int, device: torch.device | str) -> bool:
    """Whether :class:`TritonKernel` takes this layer on ``device``: every spec bitsmith writes (2-8 bits,
    any group, zeros or not, nf/fit grids, vq codebooks), on a CUDA GPU Triton compiles for; on the
    CPU only when Triton's interpreter is on (tests and debugging: it is far slower than the CPU kernels).
    The first question for a spec on a device also compiles and checks the kernel (:func:`kernel_works`)."""
    device = torch.device(device)
    if in_features < 1 or (spec.grid != "uniform") != (grid is not None):
        return False
    if device.type == "cpu":
        usable = interpreter_on()
    elif device.type != "cuda" or not torch.cuda.is_available():
        return False
    else:
        usable = torch.cuda.get_device_capability(device) >= MIN_CUDA_CAPABILITY
    return usable and kernel_works(spec, device)


def kernel_works(spec: QuantSpec, device: torch.device) -> bool:
    """Whether the kernel compiles for ``spec`` on ``device`` and matches the reference there (:func:`self_check`),
    once per process (:func:`bitsmith.kernels.self_check.kernel_passes`)."""
    return kernel_passes(TritonKernel.name, device, spec, lambda: self_check(spec, device))


def self_check(spec: QuantSpec, device: torch.device) -> bool:
    """One random fp16 layer with a ragged last group through :class:`TritonKernel`, both tile kinds (1 and
    20 rows), against the float64 product of the reference weights (rounded to fp16 like the kernel's);
    within fp16 output rounding plus float32 sums."""
    in_features = 2 * (spec.group_size or 64) + 12  # a short last group, a padded run of 8 codes
    layer = sample_layer(spec, 40, in_features, torch.Generator().manual_seed(0))
    kernel = TritonKernel(layer["qweight"], layer["scale"], layer["zero"], spec, in_features, device, layer["grid"])
    reference = QuantizedTensor.from_state(layer["qweight"], layer["scale"], layer["zero"], spec, in_features, layer["grid"])
    w = reference.dequantize().half().double()
    for rows in (1, 20):
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).half()
        y = kernel(x.to(device)).cpu().double()
        exact = x.double() @ w.T
        bound = 2.0**-10 * ((x.double().abs() @ w.abs().T) + exact.abs())
        if not bool(((y - exact).abs() <= bound).all()):
            return False
    return True


def block_config(rows: int, spec: QuantSpec, in_features: int, dtype: torch.dtype) -> dict:
    """Tile sizes (and warps) for ``rows`` activation rows of ``dtype``: decode (<= DECODE_ROWS) multiplies a
    [rows, K, N] tile and sums it; prefill uses tl.dot tiles of 16-64 rows (16-32 for float32, whose
    exact dot has no tensor cores). Sized so ptxas keeps them in registers on sm_90 (Triton 3.9: 94-121
    registers for decode, 140-144 for 64 x 64 x 64 at 8 warps, 254 for float32 32 x 32 x 32; none spilled).
    A K block never straddles two groups: group widths are powers of two from 32 (spec.GROUP_SIZES), so a
    block of min(BLOCK_K, width) divides one."""
    width = spec.group_width(in_features)
    grouped = spec.groups_per_row(in_features) > 1
    tile = 32 if dtype == torch.float32 else 64
    if rows <= DECODE_ROWS:
        block = {"BLOCK_M": triton.next_power_of_2(rows), "BLOCK_N": 32, "BLOCK_K": 128, "USE_DOT": False,
                 "num_warps": 4}
    else:
        block = {"BLOCK_M": min(tile, max(16, triton.next_power_of_2(rows))), "BLOCK_N": tile, "BLOCK_K": tile,
                 "USE_DOT": True, "num_warps": 8 if tile == 64 else 4}
    if grouped:
        block["BLOCK_K"] = min(block["BLOCK_K"], width)
        if width % block["BLOCK_K"]:
            raise ValueError(f"group width {width} is not a multiple of a K block of {block['BLOCK_K']}")
    return block


class TritonKernel(DeviceKernel):
    """x [..., in] on ``device`` -> y [..., out] in x's dtype, one fused Triton GEMM per call.

    Holds the same packed tensors as :class:`DeviceKernel` (``quantized``, ``to_state`` are its), plus
    a float32 copy of a grid (at most 256 x 4 values) for the kernel's lookups."""

    name = "triton"

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec,
                 in_features: int, device: torch.device | str, grid: torch.Tensor | None = None) -> None:
        if torch.device(device).type == "cpu" and not interpreter_on():
            raise ValueError("the Triton kernel runs on the CPU only in Triton's interpreter: set TRITON_INTERPRET=1 "
                             "before Python starts, or use the CPU kernels (bitsmith.kernels.prepare_packed)")
        super().__init__(qweight, scale, zero, spec, in_features, device, grid, compile=False)
        self._grid32 = None if self.grid is None else self.grid.float().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if x.dtype not in KERNEL_DTYPES:  # float64 and the like: the generic dequantize-then-matmul
            return super().__call__(x)
        x2 = x.reshape(-1, self.in_features).contiguous()
        rows = x2.shape[0]
        y = torch.empty(rows, self.out_features, dtype=x.dtype, device=x.device)
        if rows == 0:
            return y.view(*x.shape[:-1], self.out_features)
        block = block_config(rows, self.spec, self.in_features, x.dtype)
        spec = self.spec
        launch_grid = (triton.cdiv(rows, block["BLOCK_M"]), triton.cdiv(self.out_features, block["BLOCK_N"]))
        placeholder = self.scale  # never read: the constexpr flags skip the absent zero / grid
        gemm_kernel[launch_grid](
            x2, self.qweight, self.scale, placeholder if self.zero is None else self.zero,
            placeholder if self._grid32 is None else self._grid32, y,
            rows, self.out_features, self.in_features, self.qweight.shape[1], self.scale.shape[1],
            spec.group_width(self.in_features),
            CODE_BITS=spec.index_bits, VQ_DIM=spec.vq_dim, HAS_ZERO=self.zero is not None,
            HAS_GRID=self._grid32 is not None, MID=float((spec.qmax + 1) / 2), DOT_FP32=dot_in_fp32(x.dtype), **block)
        return y.view(*x.shape[:-1], self.out_features)
