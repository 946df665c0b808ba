"""The bf16 prefill path (RuntimeOptions.prefill) against its oracle on fresh random inputs.

The oracle is the reference reconstruction (dequantize to float32) rounded to bfloat16, times the
activations rounded to bfloat16, summed exactly (float64). The kernel accumulates in float32 and
rounds its output to bfloat16, so each output may differ from the oracle by one bf16 rounding
(2^-8 relative at most) plus float32 accumulation error (bounded by a small multiple of sum |x||w|).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from bitsmith.formats.packing import pack
from bitsmith.kernels import prepare, reference_linear
from bitsmith.kernels.build import native_library
from bitsmith.kernels.cpu import GEMV_MAX_ROWS, NativeKernel, fusable, fuse_native, resolve_prefill
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.spec import QuantSpec
from tests.kernels.int8_oracle import random_qt
from bitsmith.tensor import QuantizedTensor

native = native_library()
needs_native = pytest.mark.skipif(native is None, reason="native kernels could not be built (no C++ compiler?)")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread per test

SPECS = [QuantSpec(b, g, s) for b in range(2, 9) for g in (None, 32, 128) for s in (False, True)]
SHAPES = [(7, 200), (33, 576), (16, 1001), (64, 256), (5, 8), (3, 1)]  # ragged groups, odd rows
BF16 = RuntimeOptions(int8_decode=False, prefill="bf16")


def assert_bf16_oracle(y: torch.Tensor, x: torch.Tensor, qt: QuantizedTensor) -> None:
    """y within one bf16 output rounding (+ float32 accumulation) of the exact bf16-input product."""
    w = qt.dequantize()  # [out, in] float32, the reference reconstruction
    x2 = x.reshape(-1, x.shape[-1])
    exact = x2.bfloat16().double() @ w.bfloat16().double().t()  # [T, out]
    size = x2.abs().double() @ w.abs().double().t()  # sum |x||w|: the accumulation error's scale
    bound = 2.0**-8 * exact.abs() + 1e-5 * size + 1e-30
    err = (y.reshape(exact.shape).double() - exact).abs()
    assert bool((err <= bound).all()), float((err / bound).max())


def builds() -> list[tuple[str, object]]:
    """The default build and the portable ones (their bf16 rounding is the scalar fallback)."""
    import platform

    libs = [("native", native)]
    if platform.machine() in ("x86_64", "AMD64"):
        libs += [("avx2", native_library(("-march=x86-64-v3",))), ("x86-64", native_library(("-march=x86-64",)))]
    return [(name, lib) for name, lib in libs if lib is not None]


@needs_native
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_bf16_rows_are_the_reference_rounded(spec: QuantSpec) -> None:
    """Dequantized bf16 rows equal torch's round-to-nearest-even of the float32 reconstruction, bit
    for bit, on every build."""
    gen = torch.Generator().manual_seed(spec.bits * 10 + (spec.group_size or 0) + spec.symmetric)
    for (name, lib), (out, inp) in itertools.product(builds(), SHAPES):
        qt = random_qt(out, inp, spec, gen)
        kernel = NativeKernel(lib, pack(qt.codes, spec.bits), qt.scale, qt.zero, spec, inp, prefill="bf16")
        assert torch.equal(kernel.dequantize_rows(0, out, torch.bfloat16), qt.dequantize().bfloat16()), name
        assert torch.equal(kernel.dequantize_rows(1, out, torch.bfloat16), qt.dequantize()[1:].bfloat16()), name


@needs_native
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_bf16_prefill_matches_its_oracle(spec: QuantSpec) -> None:
    gen = torch.Generator().manual_seed(spec.bits * 100 + (spec.group_size or 0) + spec.symmetric)
    for (out, inp), rows in itertools.product(SHAPES, (GEMV_MAX_ROWS + 1, 13, 70)):
        qt = random_qt(out, inp, spec, gen)
        kernel = prepare(qt, BF16)
        assert isinstance(kernel, NativeKernel) and kernel.prefill == "bf16"
        x = torch.randn(rows, inp, generator=gen) + 0.5
        assert_bf16_oracle(kernel(x), x, qt)


@needs_native
@pytest.mark.parametrize("bits", [2, 4, 5, 8])
def test_portable_builds_bf16_prefill(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    for (name, lib), spec in itertools.product(builds(), (QuantSpec(bits, 32), QuantSpec(bits, None, True))):
        qt = random_qt(40, 203, spec, gen)
        kernel = NativeKernel(lib, pack(qt.codes, bits), qt.scale, qt.zero, spec, 203, prefill="bf16")
        x = torch.randn(17, 203, generator=gen)
        assert_bf16_oracle(kernel(x), x, qt)


@needs_native
@pytest.mark.parametrize("spec", [QuantSpec(4, 128), QuantSpec(8), QuantSpec(3, 64, True)], ids=str)
def test_bf16_real_sizes_shapes_and_dtypes(spec: QuantSpec) -> None:
    """Several blocks of rows, two threads, leading dimensions, bf16 inputs; decode stays exact."""
    gen = torch.Generator().manual_seed(5)
    torch.set_num_threads(2)
    qt = random_qt(1100, 576, spec, gen)  # SmolLM2's width (4.5 groups of 128)
    kernel = prepare(qt, BF16)
    for shape in ((2, 40, 576), (129, 576)):
        x = torch.randn(*shape, generator=gen)
        y = kernel(x)
        assert y.shape == (*shape[:-1], 1100) and y.dtype == torch.float32
        assert_bf16_oracle(y, x, qt)
        yb = kernel(x.bfloat16())
        assert yb.dtype == torch.bfloat16
        assert_bf16_oracle(yb.float(), x.bfloat16().float(), qt)
    x = torch.randn(GEMV_MAX_ROWS, 576, generator=gen)  # the gemv path: float32 arithmetic, as before
    ref = reference_linear(x, qt)
    assert float((kernel(x) - ref).norm() / ref.norm()) < 1e-4


@needs_native
def test_bf16_block_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small blocks: every block boundary lands mid-matrix and the last block is partial."""
    import bitsmith.kernels.cpu as cpu

    monkeypatch.setattr(cpu, "BF16_CHUNK_BYTES", 64 * 2 * 96)  # 64 rows of 96 bf16 codes per block
    gen = torch.Generator().manual_seed(9)
    qt = random_qt(231, 96, QuantSpec(4, 32), gen)
    x = torch.randn(20, 96, generator=gen)
    assert_bf16_oracle(prepare(qt, BF16)(x), x, qt)


@needs_native
def test_exact_prefill_is_the_old_path() -> None:
    """prefill="exact" keeps the float32 dequantize-then-matmul, bit for bit the exact path."""
    gen = torch.Generator().manual_seed(2)
    qt = random_qt(50, 300, QuantSpec(4, 64), gen)
    exact = prepare(qt, RuntimeOptions(int8_decode=False, prefill="exact"))
    default = NativeKernel(native, exact.qweight, qt.scale, qt.zero, qt.spec, 300, int8_decode=False)
    x = torch.randn(30, 300, generator=gen)
    assert exact.prefill == "exact" and torch.equal(exact(x), default(x))
    assert float((exact(x) - reference_linear(x, qt)).norm() / reference_linear(x, qt).norm()) < 1e-4


@needs_native
def test_fusion_keeps_the_prefill_choice() -> None:
    gen = torch.Generator().manual_seed(4)
    qts = [random_qt(out, 128, QuantSpec(4, 32), gen) for out in (24, 8)]
    kernels = [prepare(qt, BF16) for qt in qts]
    assert not fusable([kernels[0], prepare(qts[1], RuntimeOptions(int8_decode=False, prefill="exact"))])
    fused = fuse_native(kernels)
    assert fused.prefill == "bf16"
    x = torch.randn(16, 128, generator=gen)
    y = fused(x)
    assert_bf16_oracle(y[:, :24], x, qts[0])
    assert_bf16_oracle(y[:, 24:], x, qts[1])


def test_prefill_option(monkeypatch: pytest.MonkeyPatch) -> None:
    import bitsmith.kernels.cpu as cpu

    assert RuntimeOptions().prefill == "auto"
    assert RuntimeOptions.from_env({"BITSMITH_PREFILL": " Exact "}).prefill == "exact"
    with pytest.raises(ValueError, match="BITSMITH_PREFILL"):
        RuntimeOptions.from_env({"BITSMITH_PREFILL": "int4"})
    assert resolve_prefill("exact") == "exact" and resolve_prefill("bf16") == "bf16"
    monkeypatch.setattr(cpu, "native_bf16", lambda: False)  # a CPU without AMX
    monkeypatch.setattr(cpu, "native_int8_gemm", lambda: False)  # ... and without the int8 GEMM
    assert resolve_prefill("auto") == "exact"
    monkeypatch.setattr(cpu, "native_bf16", lambda: True)
    assert resolve_prefill("auto") == "bf16"


@needs_native
@pytest.mark.parametrize("name, lib", builds(), ids=[n for n, _ in builds()])
@pytest.mark.parametrize("rows, cols", [(1, 1), (3, 15), (9, 16), (17, 37), (40, 682)])
def test_widen_bf16_is_exact_into_strided_columns(name: str, lib: object, rows: int, cols: int) -> None:
    """The bf16 prefill's block widening: every value (specials included) equals torch's .float(), written
    only into its columns of a wider float32 output."""
    from bitsmith.kernels.cpu import widen_bf16

    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    src = (torch.randn(rows, cols, generator=gen) * 10 ** torch.randint(-40, 39, (rows, cols), generator=gen)).bfloat16()
    src.view(-1)[:: 7] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e-40, -3e38])[
        torch.arange(src.view(-1)[::7].numel()) % 7].bfloat16()
    out = torch.full((rows, cols + 11), 7.0)
    widen_bf16(lib, src, out[:, 5 : 5 + cols])
    assert torch.equal(out[:, 5 : 5 + cols].view(torch.int32), src.float().view(torch.int32))
    assert bool((out[:, :5] == 7.0).all()) and bool((out[:, 5 + cols :] == 7.0).all())
    with pytest.raises(ValueError, match="bf16 src"):
        widen_bf16(lib, src.float(), out[:, :cols])
