"""The small-batch packed matmul (csrc/smallbatch.cpp) against the dequantize-then-matmul oracle on random
shapes, widths and groups (ragged last groups included), and row by row against the single-row exact gemv
(bit for bit: speculative verification depends on it)."""

from __future__ import annotations

import pytest
import torch

from bitsmith.kernels.build import native_library
from bitsmith.kernels.cpu import GEMV_MAX_ROWS, NativeKernel
from bitsmith.kernels.small import SMALL_MAX_ROWS, small_gemm, small_gemm_tiled
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

native = native_library()
pytestmark = [pytest.mark.skipif(native is None, reason="native kernels could not be built (no C++ compiler?)"),
              pytest.mark.usefixtures("one_thread")]  # tests/conftest.py: one torch thread per test

# (spec, out, in): the tiled layout (4-bit, whole groups of 32k) and everything the general gemv takes:
# other widths, a ragged last group (in not a multiple of the group), in not a multiple of 8, per-channel
SHAPES = [("w4g128", 72, 512), ("w4g32", 33, 96), ("w4g64", 17, 640), ("w4g128", 40, 200), ("w4g32", 9, 100),
          ("w2g64", 31, 192), ("w3g128", 24, 300), ("w5g32", 12, 77), ("w8g128", 20, 256), ("w4", 16, 64),
          ("w6g64", 8, 130), ("w7g32", 5, 64)]


def random_kernel(spec_text: str, out: int, inp: int, seed: int, symmetric: bool) -> tuple[NativeKernel, torch.Tensor]:
    """A native kernel over random codes, scales and zeros, and its oracle weight [out, in] (float64)."""
    parsed = QuantSpec.parse(spec_text)
    spec = QuantSpec(parsed.bits, parsed.group_size, symmetric)
    g = torch.Generator().manual_seed(seed)
    groups = spec.groups_per_row(inp)
    codes = torch.randint(0, spec.qmax + 1, (out, inp), generator=g, dtype=torch.uint8)
    scale = (torch.rand(out, groups, generator=g) * 0.1 + 0.01).half()
    zero = None if symmetric else (torch.rand(out, groups, generator=g) * spec.qmax).half()  # fractional zeros
    qt = QuantizedTensor(codes, scale, zero, spec)
    state = qt.to_state("w")
    kernel = NativeKernel(native, state["w.qweight"], state["w.scale"], state.get("w.zero"), spec, inp,
                          int8_decode=False, threads=1)
    return kernel, qt.dequantize().double()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}x{s[2]}")
@pytest.mark.parametrize("symmetric", [False, True])
def test_small_gemm_equals_the_oracle_and_each_row_alone(shape: tuple[str, int, int], symmetric: bool) -> None:
    spec, out, inp = shape
    kernel, weight = random_kernel(spec, out, inp, seed=out * inp + symmetric, symmetric=symmetric)
    g = torch.Generator().manual_seed(inp)
    for rows in (2, 3, 5, 8, 9, 12, SMALL_MAX_ROWS):
        x = torch.randn(rows, inp, generator=g)
        y = torch.full((rows, out), float("nan"))
        small_gemm(native, kernel._args, x, y, 1)
        want = x.double() @ weight.t()
        assert torch.linalg.norm(y.double() - want) <= 1e-5 * torch.linalg.norm(want) + 1e-6, (spec, rows)
        alone = torch.cat([kernel(x[t : t + 1]) for t in range(rows)])  # the exact single-row decode gemv
        assert torch.equal(y, alone), (spec, rows)
        if rows <= GEMV_MAX_ROWS:  # NativeKernel routes 2..GEMV_MAX_ROWS exact rows here
            assert torch.equal(kernel(x), alone)


def test_the_common_layout_takes_the_tiles() -> None:
    if not small_gemm_tiled(native, 4, 512, 128):
        pytest.skip("this build has no AVX-512: every layout takes the general gemv")
    assert not small_gemm_tiled(native, 4, 200, 128) and not small_gemm_tiled(native, 3, 512, 128)


def test_wrong_shapes_are_refused() -> None:
    kernel, _ = random_kernel("w4g32", 8, 64, seed=0, symmetric=False)
    with pytest.raises(ValueError, match="do not fit"):
        small_gemm(native, kernel._args, torch.zeros(2, 32), torch.zeros(2, 8), 1)
