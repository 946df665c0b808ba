"""Every kernel against the oracle (reference dequantize-then-matmul) on fresh random inputs."""

from __future__ import annotations

import itertools

import pytest
import torch

from bitsmith.kernels import KERNEL_ENV, prepare, prepare_packed, reference_linear
from bitsmith.kernels.build import int8_widths, native_library
from bitsmith.kernels.cpu import GEMV_MAX_ROWS, NativeKernel
from bitsmith.kernels.torch_path import ChunkedKernel, ReferenceKernel
from bitsmith.nn.qlinear import QuantLinear
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.spec import QuantSpec
from tests.kernels.int8_oracle import int8_oracle, random_qt

RTOL = 1e-4  # relative error (Frobenius) against the fp32 reference; all kernels compute in fp32

# These tests hold every kernel to the float reference at RTOL, so 4-bit decode runs its exact float
# path here; the int8-activation path (the default) has its own oracle below, and the bf16 prefill
# path (the default on CPUs with AMX / AVX512-BF16) its own in test_kernels_bf16.py.
EXACT = RuntimeOptions(int8_decode=False, prefill="exact")

native = native_library()
needs_native = pytest.mark.skipif(native is None, reason="native kernels could not be built (no C++ compiler?)")


# Small shapes run single-threaded (tests/conftest.py one_thread): on a busy machine every parallel
# region can wait a whole scheduler slice for its second thread. The real-size test below sets its own count.
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread per test


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


SPECS = [QuantSpec(b, g, s) for b in range(2, 9) for g in (None, 32, 128) for s in (False, True)]
SHAPES = [(7, 200), (33, 576), (16, 1001), (64, 256), (5, 8), (3, 1)]


def _native_kernels() -> list[tuple[str, object]]:
    """The default build plus portable builds (AVX2, baseline x86-64), so CI covers the code paths
    of CPUs other than its own."""
    kernels = [("native", native)]
    import platform

    if platform.machine() in ("x86_64", "AMD64"):
        kernels += [("avx2", native_library(("-march=x86-64-v3",))), ("x86-64", native_library(("-march=x86-64",)))]
    return kernels


@needs_native
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_native_matches_reference(spec: QuantSpec) -> None:
    gen = torch.Generator().manual_seed(spec.bits * 100 + (spec.group_size or 0) + spec.symmetric)
    for (out, inp), rows in itertools.product(SHAPES, (1, 3, 4, 6, GEMV_MAX_ROWS + 3)):
        qt = random_qt(out, inp, spec, gen)
        kernel = prepare(qt, EXACT)
        assert isinstance(kernel, NativeKernel)
        x = torch.randn(rows, inp, generator=gen) + 0.5  # a non-zero mean stresses the zero folding
        assert rel_err(kernel(x), reference_linear(x, qt)) < RTOL, (out, inp, rows)


@needs_native
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_portable_builds_match_reference(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    for name, lib in _native_kernels()[1:]:
        if lib is None:
            continue
        for spec, (out, inp), rows in itertools.product(
            (QuantSpec(bits, 32), QuantSpec(bits, None, True)), ((9, 576), (4, 203)), (1, 5, 12)
        ):
            qt = random_qt(out, inp, spec, gen)
            from bitsmith.formats.packing import pack

            kernel = NativeKernel(lib, pack(qt.codes, bits), qt.scale, qt.zero, spec, inp, int8_decode=False)
            x = torch.randn(rows, inp, generator=gen)
            assert rel_err(kernel(x), reference_linear(x, qt)) < RTOL, (name, spec, inp, rows)


@needs_native
@pytest.mark.parametrize("spec", [QuantSpec(4, 128), QuantSpec(8), QuantSpec(3, 64, True)], ids=str)
def test_native_real_sizes_and_shapes(spec: QuantSpec) -> None:
    gen = torch.Generator().manual_seed(7)
    torch.set_num_threads(2)  # the rows split between threads
    qt = random_qt(96, 1536, spec, gen)
    kernel = prepare(qt, EXACT)
    for shape in ((1, 1536), (1, 1, 1536), (2, 5, 1536), (40, 1536), (0, 1536), (1536,)):
        x = torch.randn(*shape, generator=gen)
        y = kernel(x)
        ref = reference_linear(x, qt)
        assert y.shape == ref.shape and y.dtype == x.dtype
        if ref.numel():
            assert rel_err(y, ref) < RTOL, shape


@needs_native
def test_native_rejects_wrong_width() -> None:
    kernel = prepare(random_qt(4, 64, QuantSpec(4, 32), torch.Generator().manual_seed(0)), EXACT)
    with pytest.raises(ValueError, match="takes 64"):
        kernel(torch.randn(2, 65))


@needs_native
def test_native_dequantize_is_the_reference_reconstruction() -> None:
    gen = torch.Generator().manual_seed(3)
    for spec in (QuantSpec(4, 32), QuantSpec(3, 128, True), QuantSpec(8), QuantSpec(6, 64)):
        qt = random_qt(10, 300, spec, gen)
        kernel = prepare(qt, EXACT)
        assert torch.equal(kernel.dequantize_rows(0, 10), qt.dequantize())
        assert torch.equal(kernel.dequantize_rows(4, 7), qt.dequantize()[4:7])


@needs_native
def test_native_low_precision_activations() -> None:
    """bf16 / fp16 x: computed in fp32 inside, returned in x's dtype (tolerance of that dtype)."""
    gen = torch.Generator().manual_seed(5)
    qt = random_qt(48, 512, QuantSpec(4, 64), gen)
    kernel = prepare(qt, EXACT)
    for dtype in (torch.bfloat16, torch.float16):
        for rows in (1, 32):
            x = torch.randn(rows, 512, generator=gen).to(dtype)
            y = kernel(x)
            assert y.dtype == dtype
            assert rel_err(y, reference_linear(x.float(), qt)) < 1e-2


@needs_native
def test_native_keeps_only_packed_bytes_and_round_trips() -> None:
    gen = torch.Generator().manual_seed(11)
    qt = random_qt(24, 200, QuantSpec(3, 64), gen)
    kernel = prepare(qt, EXACT)
    assert kernel.qweight.numel() == 24 * 25 * 3  # ceil(200/8) * 3 bytes per row
    back = kernel.quantized()
    assert torch.equal(back.codes, qt.codes) and torch.equal(back.scale, qt.scale) and torch.equal(back.zero, qt.zero)
    expected = qt.to_state("w")
    state = kernel.to_state("w")
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


@needs_native
def test_native_autograd_falls_back_to_reference() -> None:
    gen = torch.Generator().manual_seed(2)
    qt = random_qt(8, 64, QuantSpec(4, 32), gen)
    x = torch.randn(2, 64, generator=gen, requires_grad=True)
    prepare(qt, EXACT)(x).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("choice,cls", [("reference", ReferenceKernel), ("torch", ChunkedKernel)])
def test_env_switch_and_torch_paths(monkeypatch: pytest.MonkeyPatch, choice: str, cls: type) -> None:
    options = RuntimeOptions.from_env({KERNEL_ENV: choice})
    gen = torch.Generator().manual_seed(13)
    monkeypatch.setattr("bitsmith.kernels.torch_path.CHUNK_BYTES", 4 * 576 * 5)  # several chunks
    for spec in (QuantSpec(4, 128), QuantSpec(2, None, True), QuantSpec(8, 32)):
        qt = random_qt(33, 576, spec, gen)
        kernel = prepare(qt, options)
        assert isinstance(kernel, cls)
        x = torch.randn(2, 3, 576, generator=gen)
        assert rel_err(kernel(x), reference_linear(x, qt)) < RTOL
        from bitsmith.formats.packing import pack

        packed = prepare_packed(pack(qt.codes, spec.bits), qt.scale, qt.zero, spec, 576, options)
        assert isinstance(packed, cls) and torch.equal(packed.quantized().codes, qt.codes)


def test_env_switch_rejects_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="reference"):
        prepare(random_qt(2, 8, QuantSpec(4), torch.Generator().manual_seed(0)), RuntimeOptions.from_env({KERNEL_ENV: "fastest"}))


def test_no_compiler_falls_back_with_warning(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    monkeypatch.setattr("shutil.which", lambda name: None)
    native_library.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="bitsmith.kernels.build"):
            kernel = prepare(random_qt(4, 64, QuantSpec(4, 32), torch.Generator().manual_seed(0)), EXACT)
        assert isinstance(kernel, ChunkedKernel)
        assert "no C++ compiler" in caplog.text
    finally:
        native_library.cache_clear()


def test_quant_linear_module() -> None:
    gen = torch.Generator().manual_seed(17)
    qt = random_qt(40, 96, QuantSpec(4, 32), gen)
    bias = torch.randn(40, generator=gen)
    layer = QuantLinear(qt, bias, EXACT)
    assert (layer.in_features, layer.out_features, layer.spec) == (96, 40, qt.spec)
    x = torch.randn(3, 2, 96, generator=gen)
    ref = reference_linear(x, qt) + bias
    assert rel_err(layer(x), ref) < RTOL
    assert torch.equal(layer.quantized().codes, qt.codes) and torch.equal(layer.qt.codes, qt.codes)
    state = layer.to_state("m")
    assert all(torch.equal(v, qt.to_state("m")[k]) for k, v in state.items())
    again = QuantLinear.from_state(state["m.qweight"], state["m.scale"], state["m.zero"], qt.spec, 96, bias, EXACT)
    assert torch.equal(again(x), layer(x))
    assert not hasattr(layer, "_qt_cache") and "qt" not in vars(layer)  # no unpacked copy kept


def test_generate_fast_path_equals_reference_path(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy generation from a checkpoint gives the same tokens with the native kernel and the oracle."""
    from tests.tiny import make_tiny_model

    from bitsmith.infer.generate import generate
    from bitsmith.runtime.load import load_model
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize

    src = make_tiny_model(tmp_path / "m")
    ckpt = quantize(src, tmp_path / "q", QuantizePlan(QuantSpec.parse("w4g32")))
    runs = {}
    for choice in ("auto", "reference"):
        options = RuntimeOptions(kernel=choice, int8_decode=False)
        loaded = load_model(ckpt, options=options)
        runs[choice] = generate(loaded.model, loaded.tokenizer, "the cat sat", max_new_tokens=12, stop_at_eos=False,
                                options=options).token_ids
    assert len(runs["auto"]) == 12 and runs["auto"] == runs["reference"]


@needs_native
@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(4, 128, True), QuantSpec(8, None), QuantSpec(3, 64), QuantSpec(2, 32)], ids=str)
@pytest.mark.parametrize("inp", [96, 200, 1001])
def test_fused_kernels_match_each_reference(spec: QuantSpec, inp: int) -> None:
    """q/k/v-style fusion: one call equals the concatenated references, and every member kernel,
    now reading row views of the fused buffer, still equals its own reference and round-trips."""
    from bitsmith.kernels.cpu import fusable, fuse_native

    gen = torch.Generator().manual_seed(inp + spec.bits)
    qts = [random_qt(out, inp, spec, gen) for out in (24, 8, 8)]
    kernels = [prepare(qt, EXACT) for qt in qts]
    assert fusable(kernels)
    fused = fuse_native(kernels)
    for rows in (1, 3, GEMV_MAX_ROWS + 5):  # decode and the blocked prefill path
        x = torch.randn(rows, inp, generator=gen)
        refs = [reference_linear(x, qt) for qt in qts]
        assert rel_err(fused(x), torch.cat(refs, -1)) < RTOL
        for kernel, ref in zip(kernels, refs):
            assert rel_err(kernel(x), ref) < RTOL
    for kernel, qt in zip(kernels, qts):
        state, want = kernel.to_state("m"), qt.to_state("m")
        assert all(torch.equal(state[k], want[k]) for k in want)
        assert state["m.qweight"].untyped_storage().data_ptr() != fused.qweight.untyped_storage().data_ptr()  # a copy
    assert not fusable([kernels[0], prepare(random_qt(8, inp + 8, spec, gen), EXACT)])  # other input width


@needs_native
def test_eight_bit_codes_are_shared_not_copied() -> None:
    gen = torch.Generator().manual_seed(3)
    for inp, shared in ((64, True), (61, False)):  # whole runs of 8 codes: the codes are the packed layout
        qt = random_qt(12, inp, QuantSpec(8, 32), gen)
        kernel = prepare(qt, EXACT)
        assert (kernel.qweight.data_ptr() == qt.codes.data_ptr()) == shared
        x = torch.randn(2, inp, generator=gen)
        assert rel_err(kernel(x), reference_linear(x, qt)) < RTOL


@needs_native
@pytest.mark.parametrize("spec", [QuantSpec(b, g, s) for b in (2, 3, 4, 6, 8) for g in (32, 64, 128, 256, None)
                                  for s in (False, True)], ids=str)
def test_int8_decode_matches_its_oracle(spec: QuantSpec) -> None:
    """Default decode: exact to the int8-activation oracle, and within the stated few-1e-3 of the float
    reference, for every width the build runs that way (4 and 8 bits with VNNI; every width on
    AVX-512 VBMI, csrc/vbmi.cpp; 2, 3 and 8 bits on AVX2 without VNNI too, csrc/avx2_int8.cpp and
    qmatmul_int8.h row_tile_int8); shapes the path cannot take stay exact."""
    from bitsmith.formats.packing import pack

    gen = torch.Generator().manual_seed(11 + spec.bits + (spec.group_size or 0) + spec.symmetric)
    for name, lib in _native_kernels():
        if lib is None:
            continue
        widths = int8_widths(lib)  # the int8 path is the default (int8_decode=True)
        # 576 = 4.5 groups of 128 (SmolLM2's width: a partial last group); 288 is not whole 64-code
        # chunks (4-bit) but whole 32-blocks (8-bit); 200 is neither
        for (out, inp), rows in itertools.product(((33, 512), (64, 1536), (7, 576), (5, 200), (9, 288)), (1, 3, 4, 7)):
            qt = random_qt(out, inp, spec, gen)
            kernel = NativeKernel(lib, pack(qt.codes, spec.bits), qt.scale, qt.zero, spec, inp)
            x = torch.randn(rows, inp, generator=gen) * torch.rand(inp, generator=gen) * 3 + 0.2  # uneven channels
            x[0, :3] = 0.0  # zeros and a group of zeros must not divide by zero
            if spec.group_size and rows > 1:
                x[-1, : spec.group_size] = 0.0
            y, ref = kernel(x), reference_linear(x, qt)
            group = spec.group_size or inp
            vbmi = widths >= set(range(2, 9))  # vbmi.cpp: whole 64-code chunks that never split a group
            if vbmi and inp % 64 == 0 and group % 64 == 0:
                takes_path = True
            elif spec.bits == 4:
                takes_path = inp % 64 == 0 and (group == 32 or group % 64 == 0)
            elif spec.bits in (2, 3) and not vbmi:  # avx2_int8.cpp (compiled without AVX-512 only): whole
                # chunks of 128 (2-bit) or 64 (3-bit) codes; on a VBMI build groups of 32 stay exact
                chunk = 128 if spec.bits == 2 else 64
                takes_path = inp % chunk == 0 and (group % chunk == 0 or group in (32, 64) and group < chunk)
            else:
                takes_path = spec.bits == 8 and inp % 32 == 0 and group % 32 == 0
            if spec.bits in widths and takes_path:
                assert rel_err(y, int8_oracle(x, qt)) < RTOL, (name, out, inp, rows)
                assert 1e-5 < rel_err(y, ref) < 2e-2, (name, out, inp, rows)  # the approximation, bounded
            else:
                assert rel_err(y, ref) < RTOL, (name, out, inp, rows)


@needs_native
def test_huge_page_advice_keeps_contents_and_results() -> None:
    """advise_huge_pages works in place: same address, same bytes, same products (whether or not this
    kernel grants huge pages), and small or non-CPU tensors are left alone."""
    from bitsmith.kernels.cpu import HUGE_MIN_BYTES, advise_huge_pages

    gen = torch.Generator().manual_seed(21)
    qt = random_qt(6000, 2048, QuantSpec(4, 128), gen)  # 6 MB of packed codes
    kernel = prepare(qt, EXACT)
    x = torch.randn(2, 2048, generator=gen)
    before, ptr, data = kernel(x), kernel.qweight.data_ptr(), kernel.qweight.clone()
    advise_huge_pages(kernel.qweight)  # again: the constructor already did
    assert kernel.qweight.data_ptr() == ptr and torch.equal(kernel.qweight, data)
    assert torch.equal(kernel(x), before)
    assert not advise_huge_pages(torch.zeros(HUGE_MIN_BYTES - 1, dtype=torch.uint8))


@needs_native
def test_half_rounding_matches_torch() -> None:
    """The fp16 KV cache's float -> half -> float (F16C, and the portable code of a baseline x86-64
    build) equals torch's .half() on random values and the edges: subnormals, ties, overflow, inf, nan."""
    gen = torch.Generator().manual_seed(5)
    x = torch.cat([
        torch.randn(4096, generator=gen) * torch.logspace(-9, 5, 4096),
        torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, 6e-8, 2.9e-8, 3e-8, 1e-9, 5.96e-8,
                      1.0 + 2**-11, 1.0 + 3 * 2**-11, 2**-14, 2**-14 * (1 - 2**-11), float("inf"), float("-inf")]),
    ])
    want = x.half().float()
    for name, lib in _native_kernels():
        if lib is None:
            continue
        y = torch.empty_like(x)
        lib.bs_half_roundtrip(x.data_ptr(), y.data_ptr(), x.numel())
        assert torch.equal(y, want), (name, x[y != want][:5], y[y != want][:5], want[y != want][:5])
        nan = torch.tensor([float("nan")])
        lib.bs_half_roundtrip(nan.data_ptr(), y.data_ptr(), 1)
        assert torch.isnan(y[0]), name
