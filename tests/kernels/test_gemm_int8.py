"""The int8 prefill GEMM (csrc/gemm_int8.cpp, RuntimeOptions.prefill="int8") against its oracle on fresh
random inputs: x rounded to int8 per 32-block (tests/kernels/int8_oracle.py, the int8 decode's oracle
too), then the exact dequantize-then-matmul. The kernel sums int32 products exactly and scales them in
float32, so it meets the oracle to float32 accumulation error."""

from __future__ import annotations

import itertools

import pytest
import torch

from bitsmith.formats.packing import pack
from bitsmith.kernels import prepare, reference_linear
from bitsmith.kernels.build import native_library
from bitsmith.kernels.cpu import GEMV_MAX_ROWS, NativeKernel, fuse_native, resolve_prefill
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.spec import QuantSpec
from tests.kernels.int8_oracle import int8_oracle, random_qt, rel

native = native_library()
gemm = native is not None and hasattr(native, "bs_gemm_int8_takes") and bool(native.bs_gemm_int8_takes(64, 4, 64))
needs_gemm = pytest.mark.skipif(not gemm, reason="this build has no int8 GEMM (needs AVX-512 VNNI + VBMI)")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread per test

RTOL = 2e-5  # float32 accumulation over up to ~9k products; observed ~1.5e-6
# (out, in): partial 32-row tiles (7, 33, 40), a partial last group (576 = 4.5 groups of 128), one group
SHAPES = [(33, 512), (64, 1536), (7, 576), (40, 128), (70, 64)]
ROWS = [GEMV_MAX_ROWS + 1, 12, 31]  # the 4-row microkernel and its 1-3-row tails


def x_for(rows: int, inp: int, gen: torch.Generator) -> torch.Tensor:
    """Uneven channels, a few zeros and a whole zero block (no division by a zero max)."""
    x = torch.randn(rows, inp, generator=gen) * torch.rand(inp, generator=gen) * 3 + 0.2
    x[0, :3] = 0.0
    x[-1, :32] = 0.0
    return x


@needs_gemm
@pytest.mark.parametrize("spec", [QuantSpec(b, g, s) for b in range(2, 9) for g in (32, 64, 128, None)
                                  for s in (False, True)], ids=str)
def test_int8_gemm_matches_its_oracle(spec: QuantSpec) -> None:
    gen = torch.Generator().manual_seed(spec.bits * 1000 + (spec.group_size or 0) + spec.symmetric)
    for (out, inp), rows in itertools.product(SHAPES, ROWS):
        qt = random_qt(out, inp, spec, gen)
        kernel = NativeKernel(native, pack(qt.codes, spec.bits), qt.scale, qt.zero, spec, inp, prefill="int8")
        assert kernel._gemm_int8, (out, inp)
        x = x_for(rows, inp, gen)
        y = kernel(x)
        assert rel(y, int8_oracle(x, qt)) < RTOL, (out, inp, rows)
        assert rel(y, reference_linear(x, qt)) < 2e-2  # the int8 rounding of x itself: a few 1e-3


@needs_gemm
def test_int8_gemm_reads_the_3bit_mixed_layout() -> None:
    """3-bit rows held in the decode's mixed layout (repacked at load) give the same products."""
    spec = QuantSpec(3, 128, False)
    if not native.bs_mixed3_takes(1536, 128):
        pytest.skip("this build holds no 3-bit mixed layout")
    gen = torch.Generator().manual_seed(3)
    qt = random_qt(45, 1536, spec, gen)
    kernel = NativeKernel(native, pack(qt.codes, 3), qt.scale, qt.zero, spec, 1536, int8_decode=True, prefill="int8")
    assert kernel.mixed3 and kernel._gemm_int8
    x = x_for(17, 1536, gen)
    assert rel(kernel(x), int8_oracle(x, qt)) < RTOL


@needs_gemm
@pytest.mark.parametrize("threads", [2, 3])
def test_int8_gemm_threads_split_tiles_not_results(threads: int) -> None:
    """More threads than one share the 32-row tiles and the activation rows: bit for bit one thread's."""
    spec = QuantSpec(4, 128, False)
    gen = torch.Generator().manual_seed(threads)
    qt = random_qt(200, 576, spec, gen)
    x = x_for(37, 576, gen)
    one = NativeKernel(native, pack(qt.codes, 4), qt.scale, qt.zero, spec, 576, threads=1, prefill="int8")(x)
    many = NativeKernel(native, pack(qt.codes, 4), qt.scale, qt.zero, spec, 576, threads=threads, prefill="int8")(x)
    assert torch.equal(one, many)


@needs_gemm
def test_shapes_the_gemm_cannot_take_stay_exact() -> None:
    """in not whole 64-code chunks, or groups not whole 32-blocks: the exact float path, bit for bit."""
    gen = torch.Generator().manual_seed(5)
    for spec, inp in ((QuantSpec(4, 32, False), 200), (QuantSpec(4, None, False), 160), (QuantSpec(8, None, True), 100)):
        qt = random_qt(20, inp, spec, gen)
        int8 = NativeKernel(native, pack(qt.codes, spec.bits), qt.scale, qt.zero, spec, inp, prefill="int8")
        exact = NativeKernel(native, pack(qt.codes, spec.bits), qt.scale, qt.zero, spec, inp, prefill="exact")
        assert not int8._gemm_int8
        x = x_for(GEMV_MAX_ROWS + 5, inp, gen)
        assert torch.equal(int8(x), exact(x))


@needs_gemm
def test_fused_kernels_keep_the_int8_prefill() -> None:
    """q/k/v fused into one call run the GEMM over the concatenated rows: each part still its oracle."""
    spec = QuantSpec(4, 64, False)
    gen = torch.Generator().manual_seed(8)
    qts = [random_qt(n, 256, spec, gen) for n in (40, 24)]
    options = RuntimeOptions(prefill="int8")
    fused = fuse_native([prepare(qt, options) for qt in qts])
    assert fused.prefill == "int8" and fused._gemm_int8
    x = x_for(20, 256, gen)
    y = fused(x)
    assert rel(y[:, :40], int8_oracle(x, qts[0])) < RTOL
    assert rel(y[:, 40:], int8_oracle(x, qts[1])) < RTOL


def test_auto_prefers_amx_bf16_then_the_int8_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    import bitsmith.kernels.cpu as cpu

    assert resolve_prefill("int8") == "int8"
    for bf16, int8, expected in ((True, True, "bf16"), (False, True, "int8"), (False, False, "exact")):
        monkeypatch.setattr(cpu, "native_bf16", lambda v=bf16: v)
        monkeypatch.setattr(cpu, "native_int8_gemm", lambda v=int8: v)
        assert resolve_prefill("auto") == expected
    assert RuntimeOptions.from_env({"BITSMITH_PREFILL": "INT8"}).prefill == "int8"
    assert RuntimeOptions.for_measurement({}).prefill == "exact"  # eval and compare measure the checkpoint
