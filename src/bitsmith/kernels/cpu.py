"""The native CPU kernel: matmul straight from the packed on-disk codes (csrc/qmatmul.cpp).

It keeps exactly what a checkpoint stores (packed codes, fp16 scale, fp16 zero), so resident memory
is the packed size; 3-bit codes for the int8 decode are held with each 256-code superblock's bytes
reordered (the mixed layout, csrc/strided.h: same size, half the unpack work). Decode and small batches (up to ``GEMV_MAX_ROWS`` activation rows) run the
fused gemv: codes are widened to float in registers and multiplied into x, group by group, with the
zero point folded into a per-group sum of x. Larger batches (prefill, evaluation) run the int8 GEMM
(csrc/gemm_int8.cpp: x rounded to int8 per 32-block, AVX-512 VNNI), or dequantize a few MB of weight
rows at a time into a reused buffer and hand each block to torch's ``mm``: float32 (MKL sgemm) on the
exact path, bfloat16 (oneDNN, AMX tiles) on CPUs with AMX (``RuntimeOptions.prefill``;
:func:`resolve_prefill` decides what ``auto`` means on this CPU).
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from bitsmith.formats.packing import packed_row_bytes
from bitsmith.kernels.small import small_gemm
from bitsmith.kernels.torch_path import reference_linear
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

GEMV_MAX_ROWS = 8  # above this many activation rows, dequantize blocks + BLAS is faster
CHUNK_BYTES = 2 << 20  # fp32 weight rows per block on the prefill path
BF16_CHUNK_BYTES = 2 << 20  # bf16 weight rows per block on the bf16 prefill path
# /proc/cpuinfo flags of CPUs where a bf16 matmul beats float32: AMX. AVX512-BF16 alone is native too, but
# on a Xeon without AMX (session 21) the bf16 prefill ran at 0.82x (Qwen2.5-Coder-1.5B) and 0.85x (SmolLM2)
# of the float32 one (bench/speed.py --prefill exact,bf16), so there `auto` keeps float32
BF16_FLAGS = ("amx_bf16",)
PARALLEL_MIN_WEIGHTS = 1 << 16  # smaller matrices run on one thread: waking others costs more
LAYOUT_SHIFT = 8  # csrc/gemv.h kLayoutShift: the C entries' bits argument carries the packed layout above it
MIXED3 = 1  # csrc/gemv.h kMixed3: 3-bit superblocks repacked at load for the int8 decode (csrc/strided.h)


HUGE_PAGE = 2 << 20
HUGE_MIN_BYTES = 2 * HUGE_PAGE  # smaller buffers hold at most one aligned 2 MB page: not worth a syscall
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25  # Linux <asm-generic/mman-common.h>
_madvise = None


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Back the 2 MB-aligned interior of a large CPU tensor with transparent huge pages, in place.

    Decode streams every packed byte once per token; with 4 KB pages each one costs a TLB entry and the
    hardware prefetchers stop at every page boundary. Measured on this machine's Qwen2.5-1.5B-sized
    sweep (w4g128 layers + w8 head, 2 threads, alternating in one process): 19.3 -> 21.2 GB/s median.
    MADV_HUGEPAGE marks the range (THP is often "madvise"-only) and MADV_COLLAPSE (Linux >= 6.1)
    moves it onto huge pages now rather than whenever khugepaged gets to it; contents and addresses
    are unchanged. Anything unsupported (another OS, an older kernel, THP disabled) is a silent no-op.
    Returns whether the collapse succeeded.
    """
    global _madvise
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes < HUGE_MIN_BYTES:
        return False
    if _madvise is None:
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            libc.madvise.restype = ctypes.c_int
            _madvise = libc.madvise
        except (OSError, AttributeError):
            _madvise = False
    if not _madvise:
        return False
    start = (t.data_ptr() + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    stop = (t.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
    if stop <= start:
        return False
    _madvise(start, stop - start, _MADV_HUGEPAGE)
    return _madvise(start, stop - start, _MADV_COLLAPSE) == 0


@lru_cache(maxsize=None)
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 faster than float32 through oneDNN (AMX: ``BF16_FLAGS``).
    Elsewhere a bf16 ``mm`` is emulated, or (AVX512-BF16 without AMX) native but measured slower than
    float32, so ``auto`` keeps the exact path there."""
    from bitsmith.kernels.build import cpu_flags

    flags = cpu_flags().split()
    return torch.backends.mkldnn.is_available() and any(f in flags for f in BF16_FLAGS)


BF16_MIN_SPEEDUP = 2.0  # fast_bf16_matmul: a bf16 matmul at least this many times float32's speed


def bf16_speedup() -> float:
    """float32 matmul time / bfloat16 matmul time on this CPU and torch's thread count: a 512 x 1024 x 1024
    product, best of 3 each after one warm-up (~30 ms in all)."""
    import time

    def best(a: torch.Tensor, b: torch.Tensor) -> float:
        torch.mm(a, b)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        return min(times)

    a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
    return best(a, b) / best(a.bfloat16(), b.bfloat16())


@lru_cache(maxsize=None)
def fast_bf16_matmul() -> bool:
    """Whether bfloat16 matmuls pay on this CPU, for the calibrated passes' forwards and searches: AMX
    (:func:`native_bf16`), or AVX512-BF16 with a bf16 matmul measured at least ``BF16_MIN_SPEEDUP`` times
    float32's. The flags alone do not tell: on a Zen 5 without AMX bf16 ran 4.1-5.1x float32 (oneDNN,
    2 threads, session 22), on a Xeon without AMX 0.82-0.85x (session 21). Measured once per process."""
    from bitsmith.kernels.build import cpu_flags

    if native_bf16():
        return True
    if "avx512_bf16" not in cpu_flags().split() or not torch.backends.mkldnn.is_available():
        return False
    return bf16_speedup() >= BF16_MIN_SPEEDUP


def _widen_bf16(lib: ctypes.CDLL):
    """csrc/qmatmul.cpp ``bs_widen_bf16`` with its C signature declared (once per library)."""
    fn = lib.bs_widen_bf16
    if fn.argtypes is None:
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
    return fn


def widen_bf16(lib: ctypes.CDLL, src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst [T, n] (float32, rows may be strided, columns contiguous) = src [T, n] (contiguous bfloat16)
    widened exactly, by the native kernel the bf16 prefill uses for its block outputs."""
    if src.dtype != torch.bfloat16 or dst.dtype != torch.float32 or src.dim() != 2 or src.shape != dst.shape:
        raise ValueError(f"widen_bf16 takes bf16 src and float32 dst of one 2-D shape, got {src.dtype} "
                         f"{tuple(src.shape)} and {dst.dtype} {tuple(dst.shape)}")
    if not src.is_contiguous() or dst.stride(1) != 1:
        raise ValueError("widen_bf16 needs a contiguous src and dst rows with contiguous columns")
    _widen_bf16(lib)(src.data_ptr(), src.shape[0], src.shape[1], dst.data_ptr(), dst.stride(0))


@lru_cache(maxsize=None)
def native_int8_gemm() -> bool:
    """Whether this build runs the int8 prefill GEMM (csrc/gemm_int8.cpp: AVX-512 VNNI + VBMI)."""
    from bitsmith.kernels.build import native_library

    lib = native_library()
    return lib is not None and hasattr(lib, "bs_gemm_int8_takes") and bool(lib.bs_gemm_int8_takes(64, 4, 64))


def resolve_prefill(choice: str) -> str:
    """``RuntimeOptions.prefill`` as the kernel runs it: ``int8``, ``bf16`` or ``exact`` (``auto`` asks
    the CPU: bf16 with AMX, else int8 where the int8 GEMM is built, else exact)."""
    if choice == "auto":
        return "bf16" if native_bf16() else "int8" if native_int8_gemm() else "exact"
    if choice not in ("int8", "bf16", "exact"):
        raise ValueError(f"prefill={choice!r}; use auto, int8, bf16 or exact")
    return choice


class NativeKernel:
    """x [..., in] -> y [..., out] with the compiled kernels; float32 arithmetic, output in x's dtype."""

    name = "native"

    def __init__(
        self,
        lib: ctypes.CDLL,
        qweight: torch.Tensor,  # uint8 [out, ceil(in/8)*bits], formats.packing layout
        scale: torch.Tensor,  # fp16 [out, G]
        zero: torch.Tensor | None,  # fp16 [out, G]; None when symmetric
        spec: QuantSpec,
        in_features: int,
        int8_decode: bool = True,  # decode products with int8 activations (csrc/qmatmul.cpp, csrc/vbmi.cpp)
        threads: int | None = None,  # None: torch's thread count at each call
        prefill: str = "exact",  # batched matmul: "exact" float32, "int8", "bf16" (or "auto": resolve_prefill)
        mixed3: bool = False,  # qweight's whole 3-bit superblocks are already in the mixed layout (fuse_native)
    ) -> None:
        out_features = qweight.shape[0]
        if tuple(qweight.shape) != (out_features, packed_row_bytes(in_features, spec.bits)):
            raise ValueError(f"packed codes {tuple(qweight.shape)} do not hold {in_features} {spec.bits}-bit codes per row")
        self._lib = lib
        self.spec = spec
        self._int8_decode, self.threads = bool(int8_decode), threads
        self.prefill = resolve_prefill(prefill)
        self.in_features, self.out_features = in_features, out_features
        if spec.bits == 8 and in_features % 8 == 0 and qweight.dtype == torch.uint8 and qweight.is_contiguous():
            # 8-bit rows of whole runs are never read past their end: keep the caller's tensor as is
            # (a tied head then shares the quantized embedding's codes instead of copying them).
            self.qweight = qweight
        else:
            # The kernels read whole 64-bit words, so the codes live in a buffer 8 bytes longer than they are.
            padded = torch.zeros(qweight.numel() + 8, dtype=torch.uint8)
            self.qweight = padded[: qweight.numel()].view(qweight.shape)  # uint8 [out, row_bytes]
            self.qweight.copy_(qweight)
        advise_huge_pages(self.qweight)
        self.scale = scale.to(torch.float16).contiguous()
        self.zero = None if zero is None else zero.to(torch.float16).contiguous()
        self._group = spec.group_size or max(in_features, 1)
        self._small = out_features * in_features < PARALLEL_MIN_WEIGHTS
        self._shared = False  # tensors are views into a fused buffer (see fuse_native)
        self._mixed3 = bool(mixed3)
        self._lay_out()

    @property
    def mixed3(self) -> bool:
        """Whether the codes are held in the 3-bit mixed layout (``natural_qweight`` gives the file's bytes)."""
        return self._mixed3

    @property
    def int8_decode(self) -> bool:
        return self._int8_decode

    @int8_decode.setter
    def int8_decode(self, on: bool) -> None:
        """The layout follows: a 3-bit matrix is held in the mixed layout only for the int8 decode."""
        if bool(on) != self._int8_decode and self._shared and self._wants_mixed3(bool(on)) != self._mixed3:
            raise ValueError("a fused kernel's int8_decode is fixed (its rows are shared with others); "
                             "build the layers again with the RuntimeOptions you want")
        self._int8_decode = bool(on)
        self._lay_out()

    def _wants_mixed3(self, int8_decode: bool) -> bool:
        return (int8_decode and self.spec.bits == 3 and hasattr(self._lib, "bs_mixed3_takes")  # older libraries: none
                and bool(self._lib.bs_mixed3_takes(self.in_features, self._group)))

    def _lay_out(self) -> None:
        """Hold 3-bit codes in the mixed layout exactly when the int8 decode runs on it, then bind."""
        want = self._wants_mixed3(self._int8_decode)
        if want != self._mixed3:
            repack(self._lib, self.qweight, self.in_features, want, self._threads())
            self._mixed3 = want
        self._bind()

    def _bind(self) -> None:
        """Cache the C arguments that describe the weights (pointers change only when rebound)."""
        zero = None if self.zero is None else self.zero.data_ptr()
        bits = self.spec.bits | (MIXED3 << LAYOUT_SHIFT if self._mixed3 else 0)
        self._args = (self.qweight.data_ptr(), self.scale.data_ptr(), zero, self.out_features, self.in_features,
                      bits, self._group)
        self._gemm_int8 = (self.prefill == "int8" and hasattr(self._lib, "bs_gemm_int8_takes")
                           and bool(self._lib.bs_gemm_int8_takes(self.in_features, bits, self._group)))

    def _threads(self) -> int:
        return 1 if self._small else self.threads or torch.get_num_threads()

    def _weight_args(self) -> tuple[int, int, int | None, int, int, int, int]:
        return self._args

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
            return reference_linear(x, self.quantized())  # other devices and autograd: the oracle
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"input has {tuple(x.shape)[-1:]} features; this layer takes {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.to(torch.float32).contiguous()  # [T, in]
        rows = x2.shape[0]
        y = torch.empty(rows, self.out_features, dtype=torch.float32)  # [T, out]
        if rows and self.out_features:
            if 1 < rows <= GEMV_MAX_ROWS and not self.int8_decode:  # exact small batch: each row as alone
                small_gemm(self._lib, self._args, x2, y, self._threads())
            elif rows <= GEMV_MAX_ROWS:
                self._lib.bs_gemv(*self._args, x2.data_ptr(), rows, y.data_ptr(), self._threads(), int(self.int8_decode))
            elif self.prefill == "int8" and self._gemm_int8:
                self._lib.bs_gemm_int8(*self._args, x2.data_ptr(), rows, y.data_ptr(), self._threads())
            elif self.prefill == "bf16":
                self._blocked_bf16(x2, y)
            else:
                self._blocked(x2, y)
        y = y.view(*lead, self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _blocked(self, x2: torch.Tensor, y: torch.Tensor) -> None:
        """Prefill: dequantize weight rows block by block into one buffer; BLAS does each block."""
        block = max(16, CHUNK_BYTES // (4 * max(self.in_features, 1)))
        block = min(block, self.out_features)
        buf = torch.empty(block, self.in_features, dtype=torch.float32)  # [block, in]
        threads = self._threads()
        permuted = self.spec.bits == 4  # 4-bit rows come out in nibble order; permute x to match
        if permuted:
            xp = torch.empty_like(x2)
            self._lib.bs_permute4(x2.data_ptr(), xp.data_ptr(), x2.shape[0], self.in_features)
            x2 = xp
        for start in range(0, self.out_features, block):
            n = min(block, self.out_features - start)
            self._lib.bs_dequant(*self._weight_args(), start, n, buf.data_ptr(), int(permuted), threads)
            torch.mm(x2, buf[:n].t(), out=y[:, start : start + n])

    def _blocked_bf16(self, x2: torch.Tensor, y: torch.Tensor) -> None:
        """Prefill in bfloat16: weight blocks dequantized straight to bf16 (rounded to nearest even from
        the exact float32 values), activations rounded to bf16 once, each block one oneDNN ``mm``
        (float32 accumulation inside, bf16 out) widened into its columns of the float32 ``y``. Writing
        y directly, rather than a bf16 [T, out] then converting it, saves a pass over the output:
        measured 180 vs 258 ms for a 49152x576 head at T=512 (the output's page faults dominate)."""
        block = min(max(32, BF16_CHUNK_BYTES // (2 * max(self.in_features, 1))), self.out_features)
        buf = torch.empty(block, self.in_features, dtype=torch.bfloat16)  # [block, in]
        threads = self._threads()
        permuted = self.spec.bits == 4  # as in _blocked: x follows the nibble order of the rows
        xb = torch.empty(x2.shape, dtype=torch.bfloat16)  # [T, in]
        self._lib.bs_to_bf16(x2.data_ptr(), xb.data_ptr(), x2.shape[0], self.in_features, int(permuted))
        widen = _widen_bf16(self._lib)
        for start in range(0, self.out_features, block):
            n = min(block, self.out_features - start)
            self._lib.bs_dequant_bf16(*self._weight_args(), start, n, buf.data_ptr(), int(permuted), threads)
            yb = torch.mm(xb, buf[:n].t())  # [T, n] bf16, contiguous
            widen(yb.data_ptr(), yb.shape[0], n, y.data_ptr() + 4 * start, self.out_features)  # y[:, start:start+n]

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[stop - start, in]: the reference reconstruction of those rows in float32, or (``dtype``
        bfloat16) that reconstruction rounded to bf16 as the bf16 prefill multiplies it."""
        buf = torch.empty(stop - start, self.in_features, dtype=dtype)
        if stop > start:
            if dtype not in (torch.float32, torch.bfloat16):
                raise ValueError(f"rows dequantize to float32 or bfloat16, not {dtype}")
            fn = self._lib.bs_dequant_bf16 if dtype == torch.bfloat16 else self._lib.bs_dequant
            fn(*self._weight_args(), start, stop - start, buf.data_ptr(), 0, self._threads())
        return buf

    def natural_qweight(self) -> torch.Tensor:
        """The packed codes in formats.packing's layout (a copy where they are held in the mixed layout)."""
        if not self._mixed3:
            return self.qweight
        natural = self.qweight.clone()
        repack(self._lib, natural, self.in_features, False, self._threads())
        return natural

    def quantized(self) -> QuantizedTensor:
        """The QuantizedTensor again (codes unpacked on demand; nothing else is kept)."""
        return QuantizedTensor.from_state(self.natural_qweight(), self.scale, self.zero, self.spec, self.in_features)

    def to_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The same tensors as ``self.quantized().to_state(prefix)``, without unpacking (copies when
        they are views into a fused buffer, so a checkpoint writer never sees shared storage)."""
        own = (lambda t: t.clone()) if self._shared else (lambda t: t)
        qweight = self.natural_qweight() if self._mixed3 else own(self.qweight)
        state = {f"{prefix}.qweight": qweight, f"{prefix}.scale": own(self.scale)}
        if self.zero is not None:
            state[f"{prefix}.zero"] = own(self.zero)
        return state


def repack(lib: ctypes.CDLL, qweight: torch.Tensor, in_features: int, to_mixed: bool, threads: int) -> None:
    """3-bit packed rows [out, row_bytes] in place: every whole 256-code superblock into the mixed layout
    (csrc/strided.h) or back into formats.packing's; the rows' tails stay as they are."""
    if qweight.dtype != torch.uint8 or not qweight.is_contiguous() or qweight.dim() != 2:
        raise ValueError("repack takes contiguous uint8 rows [out, row_bytes]")
    if qweight.shape[1] != packed_row_bytes(in_features, 3):
        raise ValueError(f"rows of {qweight.shape[1]} bytes do not hold {in_features} 3-bit codes")
    if lib.bs_mixed3_repack(qweight.data_ptr(), qweight.shape[0], in_features, int(to_mixed), threads) != 0:
        raise ValueError(f"this kernel library cannot hold {in_features}-input 3-bit rows in the mixed layout")


def fusable(kernels: list[object]) -> bool:
    """Whether these kernels can share one call: native, same spec, inputs, zero-point kind and options."""
    if len(kernels) < 2 or not all(isinstance(k, NativeKernel) for k in kernels):
        return False
    first = kernels[0]
    return all(k.spec == first.spec and k.in_features == first.in_features and (k.zero is None) == (first.zero is None)
               and k._lib is first._lib
               and (k.int8_decode, k.threads, k.prefill, k._mixed3) == (first.int8_decode, first.threads, first.prefill,
                                                                        first._mixed3)
               for k in kernels)


def fuse_native(kernels: list[NativeKernel]) -> NativeKernel:
    """One kernel computing ``cat([k(x) for k in kernels], -1)`` in a single call (q/k/v, gate/up).

    The packed rows, scales and zeros are concatenated once; each given kernel is then rebound to row
    views of the fused tensors, so the bytes exist once and every kernel keeps working on its own.
    """
    if not fusable(kernels):
        raise ValueError("only native kernels with the same spec, input size and zero-point kind fuse")
    first = kernels[0]
    qweight = torch.cat([k.qweight for k in kernels])
    scale = torch.cat([k.scale for k in kernels])
    zero = None if first.zero is None else torch.cat([k.zero for k in kernels])
    fused = NativeKernel(first._lib, qweight, scale, zero, first.spec, first.in_features, first.int8_decode,
                         first.threads, first.prefill, mixed3=first._mixed3)
    del qweight
    row = 0
    for k in kernels:
        rows = slice(row, row + k.out_features)
        k.qweight, k.scale = fused.qweight[rows], fused.scale[rows]
        k.zero = None if fused.zero is None else fused.zero[rows]
        k._shared = True
        k._bind()
        row += k.out_features
    fused._shared = True
    return fused
