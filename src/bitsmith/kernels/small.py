"""The small-batch packed matmul (csrc/smallbatch.cpp): 2..16 activation rows, each weight row read and
widened once for all of them, every row bit-identical to the exact single-row gemv.

Speculative decoding's verify forward (k + 1 rows) and serving's batched decode step both multiply a
few rows by every weight; :class:`~bitsmith.kernels.cpu.NativeKernel` sends calls of 2..``GEMV_MAX_ROWS``
rows here when its decode arithmetic is the exact float one (``RuntimeOptions.int8_decode`` off), so a
verified row equals the plain decode of the same row. (Above ``GEMV_MAX_ROWS`` rows NativeKernel keeps its
prefill path, whose bf16 arithmetic other code and tests rely on; the kernel itself takes up to
``SMALL_MAX_ROWS`` and more.)
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

__all__ = ["SMALL_MAX_ROWS", "small_gemm", "small_gemm_tiled"]

SMALL_MAX_ROWS = 16

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p
_DECLARED: set[int] = set()


def _declare(lib: ctypes.CDLL) -> None:
    if id(lib) in _DECLARED:
        return
    lib.bs_small_gemm.argtypes = [_PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _PTR, _I64, _PTR, _I64]
    lib.bs_small_gemm.restype = None
    lib.bs_small_gemm_tiled.argtypes = [_I64, _I64, _I64]
    lib.bs_small_gemm_tiled.restype = _I64
    _DECLARED.add(id(lib))


def small_gemm_tiled(lib: ctypes.CDLL, bits: int, in_features: int, group: int) -> bool:
    """Whether this build runs the layout on its own register tiles (4-bit, whole groups of 32k, AVX-512);
    other layouts are still computed exactly, by the general gemv."""
    _declare(lib)
    return bool(lib.bs_small_gemm_tiled(bits, in_features, group))


def small_gemm(lib: ctypes.CDLL, weight_args: tuple[Any, ...], x2: torch.Tensor, y: torch.Tensor, threads: int) -> None:
    """y [T, out] = x2 [T, in] @ W^T (float32, contiguous) for the packed weights ``weight_args``
    (NativeKernel's C arguments: codes, scale, zero, out, in, bits, group)."""
    _declare(lib)
    if x2.dtype != torch.float32 or y.dtype != torch.float32 or not (x2.is_contiguous() and y.is_contiguous()):
        raise ValueError("small_gemm takes contiguous float32 x and y")
    if x2.shape[0] != y.shape[0] or x2.shape[1] != weight_args[4] or y.shape[1] != weight_args[3]:
        raise ValueError(f"shapes x {tuple(x2.shape)} and y {tuple(y.shape)} do not fit weights "
                         f"[{weight_args[3]}, {weight_args[4]}]")
    lib.bs_small_gemm(*weight_args, x2.data_ptr(), x2.shape[0], y.data_ptr(), threads)
