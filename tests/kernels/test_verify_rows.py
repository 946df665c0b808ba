"""The verify step's matrix products (csrc/verify_rows.cpp, through csrc/verify.cpp's bs_verify_gemm) row by
row against the one-row int8 decode gemv, bit for bit, on random shapes: the superblock and chunk layouts it
runs itself (4-bit groups of 64/128/256, a 64-code tail, out not a multiple of 4, 4..8-bit chunks) and the
layouts it hands to the one-row gemv (2/3-bit, float decode), 1..8 rows, one and two threads."""

from __future__ import annotations

import ctypes

import pytest
import torch

from tests.kernels.test_small_gemm import random_kernel

from bitsmith.kernels.build import native_library
from bitsmith.kernels.cpu import NativeKernel

native = native_library()
pytestmark = [pytest.mark.skipif(native is None, reason="native kernels could not be built (no C++ compiler?)"),
              pytest.mark.usefixtures("one_thread")]

# (spec, out, in): superblocks (G = S, G > S, G < S, a tail chunk), chunks (in = 64, per-channel G = 320, 8/5/6-bit),
# and the one-row fallbacks (2/3-bit, groups of 32 on the qmatmul int8 path)
SHAPES = [("w4g128", 37, 512), ("w4g256", 16, 768), ("w4g64", 21, 384), ("w4g128", 13, 576), ("w4g64", 9, 64),
          ("w4", 10, 320), ("w8g128", 19, 256), ("w8g64", 6, 640), ("w5g64", 7, 128), ("w6g128", 11, 256),
          ("w2g64", 15, 256), ("w3g128", 12, 384), ("w4g32", 8, 128)]


def verify_gemm(kernel: NativeKernel, x: torch.Tensor, threads: int, int8: bool) -> torch.Tensor:
    fn = native.bs_verify_gemm
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                                                   ctypes.c_int64, ctypes.c_int64]
    fn.restype = None
    packed, scale, zero, out, inp, bits, group = kernel._args
    y = torch.full((x.shape[0], out), float("nan"))
    fn(packed, scale, zero, out, inp, bits, group, x.data_ptr(), x.shape[0], y.data_ptr(), threads, int(int8))
    return y


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}x{s[2]}")
@pytest.mark.parametrize("symmetric", [False, True])
def test_every_row_is_the_one_row_int8_decode(shape: tuple[str, int, int], symmetric: bool) -> None:
    spec, out, inp = shape
    kernel, _ = random_kernel(spec, out, inp, seed=out + inp + symmetric, symmetric=symmetric)
    kernel.int8_decode = True  # the one-row oracle: bs_gemv with int8 activations, one row per call
    g = torch.Generator().manual_seed(out * inp)
    for rows in (1, 2, 4, 5, 8):
        x = torch.randn(rows, inp, generator=g) * torch.rand(1, inp, generator=g) * 3  # uneven block ranges
        alone = torch.cat([kernel(x[t : t + 1].contiguous()) for t in range(rows)])
        for threads in (1, 2):
            assert torch.equal(verify_gemm(kernel, x, threads, True), alone), (spec, rows, threads)


def test_the_int8_layouts_take_the_tiles() -> None:
    tiled = native.bs_verify_rows_tiled
    tiled.argtypes, tiled.restype = [ctypes.c_int64] * 3, ctypes.c_int64
    if not tiled(8, 256, 128):
        pytest.skip("this build has no AVX-512 VBMI + VNNI: every layout takes the one-row gemv")
    assert all(tiled(*layout) for layout in [(4, 512, 128), (4, 576, 128), (4, 64, 64), (5, 128, 64), (4, 320, 320)])
    assert not any(tiled(*layout) for layout in [(2, 256, 64), (3, 384, 128), (4, 128, 32)])


def test_float_decode_rows_are_the_one_row_float_gemv() -> None:
    kernel, _ = random_kernel("w4g128", 12, 256, seed=3, symmetric=False)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(3))
    alone = torch.cat([kernel(x[t : t + 1].contiguous()) for t in range(5)])  # int8_decode=False: float
    assert torch.equal(verify_gemm(kernel, x, 1, False), alone)


def test_rows_differ_from_a_wrong_oracle() -> None:
    """The comparison can fail: row 0's x in row 1's place gives other numbers."""
    kernel, _ = random_kernel("w4g128", 8, 256, seed=4, symmetric=False)
    kernel.int8_decode = True
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(4))
    y = verify_gemm(kernel, x, 1, True)
    assert not torch.equal(y[1], kernel(x[:1].contiguous())[0])
