"""The 3-bit mixed layout (csrc/strided.h, csrc/mixed3.cpp): NativeKernel holds the whole 256-code
superblocks of 3-bit rows repacked at load wherever the int8 decode runs on them.

Held to: a torch writing of the layout from strided.h's notes, byte for byte, and the way back to
formats.packing's bytes; the int8 oracle (x rounded to int8 per 32-block, then the exact
dequantize-then-matmul) at 1-8 activation rows on ragged shapes (rows ending in natural-order tail
chunks), groups smaller than, equal to and larger than a superblock, one and two threads; the one-row
decode bit for bit equal to the natural layout's (the same integer products in the same float order);
prefill's dequantization bit for bit equal to the natural layout's; the int8_decode switch, to_state
and fuse_native.
"""

from __future__ import annotations

import pytest
import torch

from bitsmith.formats.packing import pack
from bitsmith.kernels.build import int8_widths, native_library
from bitsmith.kernels.cpu import NativeKernel, fuse_native
from bitsmith.kernels.torch_path import reference_linear
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor
from tests.kernels.int8_oracle import int8_oracle, random_qt, rel

native = native_library()
VBMI = native is not None and int8_widths(native) >= set(range(2, 9))
pytestmark = [pytest.mark.skipif(not VBMI, reason="the mixed layout needs AVX-512 VBMI + VNNI + GFNI"),
              pytest.mark.usefixtures("one_thread")]

WIDTHS = (256, 320, 448, 576, 1088, 1536)  # whole superblocks, and 1-3 natural tail chunks after them




def _sources() -> torch.Tensor:
    """[4, 64]: the natural code read by dot k's byte p (vbmi.cpp's x permutation, strided_source(3, .))."""
    n = []
    for p in range(256):
        k, j, e = p // 64, p % 64 // 8, p % 8
        run = 4 * j + (0 if e < 4 else 2) + k // 2
        n.append(8 * run + e % 4 + 4 * (k % 2))
    return torch.tensor(n).view(4, 64)


def _mixed_bytes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [out, row_bytes]: strided.h's layout notes written with torch ops."""
    out, inp = codes.shape
    whole = inp // 256 * 256
    c = codes[:, :whole].view(out, -1, 256)[..., _sources()].to(torch.int32)  # [out, blocks, 4, 64]
    a = c[..., 0, :] | c[..., 1, :] << 3 | (c[..., 3, :] & 3) << 6
    hi = c[..., 3, :] >> 2
    b = hi[..., :32] | hi[..., 32:] << 1 | c[..., 2, :32] << 2 | c[..., 2, 32:] << 5
    blocks = torch.cat([a, b], -1).to(torch.uint8).reshape(out, -1)
    return torch.cat([blocks, pack(codes[:, whole:], 3)], 1) if whole < inp else blocks


def _natural_gemv(qt: QuantizedTensor, x: torch.Tensor, threads: int) -> torch.Tensor:
    """bs_gemv with int8 activations on formats.packing's bytes (layout argument 0)."""
    packed = torch.zeros(qt.codes.shape[0] * qt.codes.shape[1] * 3 // 8 + 8, dtype=torch.uint8)
    packed[:-8] = pack(qt.codes, 3).reshape(-1)
    zero = None if qt.zero is None else qt.zero.data_ptr()
    y = torch.full((x.shape[0], qt.codes.shape[0]), float("nan"))
    native.bs_gemv(packed.data_ptr(), qt.scale.data_ptr(), zero, qt.codes.shape[0], qt.codes.shape[1], 3,
                   qt.spec.group_size or qt.codes.shape[1], x.data_ptr(), x.shape[0], y.data_ptr(), threads, 1)
    return y


def test_the_layout_is_the_documented_one_and_goes_back() -> None:
    gen = torch.Generator().manual_seed(1)
    for inp in WIDTHS:
        qt = random_qt(7, inp, QuantSpec(3, 64, False), gen)
        kernel = NativeKernel(native, pack(qt.codes, 3), qt.scale, qt.zero, qt.spec, inp)
        assert kernel.mixed3
        assert torch.equal(kernel.qweight, _mixed_bytes(qt.codes)), inp
        assert not torch.equal(kernel.qweight, pack(qt.codes, 3)), "the repack must change the bytes"
        assert torch.equal(kernel.natural_qweight(), pack(qt.codes, 3))
        assert torch.equal(kernel.quantized().codes, qt.codes)
        assert torch.equal(kernel.to_state("w")["w.qweight"], pack(qt.codes, 3))


@pytest.mark.parametrize("group", (64, 128, 256, None))
@pytest.mark.parametrize("threads", (1, 2))
def test_decode_rows_match_the_int8_oracle(group: int | None, threads: int) -> None:
    gen = torch.Generator().manual_seed(10 * threads + (group or 0))
    for symmetric in (False, True):
        spec = QuantSpec(3, group, symmetric)
        for inp in WIDTHS:
            if group and group > inp:
                continue
            out = int(torch.randint(1, 40, (1,), generator=gen))  # quads of rows and a remainder
            qt = random_qt(out, inp, spec, gen)
            kernel = NativeKernel(native, pack(qt.codes, 3), qt.scale, qt.zero, spec, inp, threads=threads)
            whole = group or inp  # per channel: one group of the row; 320 or 576 codes do not tile a superblock
            assert kernel.mixed3 == (whole % 256 == 0 or 256 % whole == 0), (spec, inp)
            for rows in (1, 2, 3, 5, 8):  # one row: vbmi.cpp's superblock loop; more: mixed3.cpp's tiles
                x = torch.randn(rows, inp, generator=gen) * torch.rand(inp, generator=gen) * 3 + 0.1
                x[:, : min(32, inp)] = 0.0  # a zero block: no division by zero
                assert rel(kernel(x), int8_oracle(x, qt)) < 1e-5, (spec, out, inp, rows)


@pytest.mark.parametrize("threads", (1, 2))
def test_one_row_decode_equals_the_natural_layout_bit_for_bit(threads: int) -> None:
    gen = torch.Generator().manual_seed(5 + threads)
    for group, inp in ((64, 1536), (128, 1088), (256, 2304), (None, 576), (128, 8960 - 128)):
        spec = QuantSpec(3, group, False)
        qt = random_qt(int(torch.randint(9, 70, (1,), generator=gen)), inp, spec, gen)
        x = torch.randn(1, inp, generator=gen) * 2
        y = NativeKernel(native, pack(qt.codes, 3), qt.scale, qt.zero, spec, inp, threads=threads)(x)
        assert torch.equal(y, _natural_gemv(qt, x, threads)), (spec, inp)


def test_prefill_dequantizes_as_the_natural_layout() -> None:
    gen = torch.Generator().manual_seed(3)
    for group, inp in ((64, 576), (128, 1536), (256, 320)):
        spec = QuantSpec(3, group, False)
        qt = random_qt(45, inp, spec, gen)
        mixed = NativeKernel(native, pack(qt.codes, 3), qt.scale, qt.zero, spec, inp, prefill="bf16")
        natural = NativeKernel(native, pack(qt.codes, 3), qt.scale, qt.zero, spec, inp, int8_decode=False,
                               prefill="bf16")
        assert mixed.mixed3 and not natural.mixed3
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(mixed.dequantize_rows(3, 41, dtype), natural.dequantize_rows(3, 41, dtype))
        x = torch.randn(12, inp, generator=gen)  # above GEMV_MAX_ROWS: the blocked bf16 prefill
        assert torch.equal(mixed(x), natural(x))
        assert rel(mixed(x), reference_linear(x, qt)) < 1e-2  # bf16 rounding of weights and x


def test_the_int8_switch_moves_the_layout() -> None:
    gen = torch.Generator().manual_seed(8)
    qt = random_qt(13, 576, QuantSpec(3, 128, False), gen)
    kernel = NativeKernel(native, pack(qt.codes, 3), qt.scale, qt.zero, qt.spec, 576)
    x = torch.randn(1, 576, generator=gen)
    kernel.int8_decode = False  # exact float decode reads natural bytes only
    assert not kernel.mixed3 and torch.equal(kernel.qweight, pack(qt.codes, 3))
    assert rel(kernel(x), reference_linear(x, qt)) < 1e-5
    kernel.int8_decode = True
    assert kernel.mixed3 and torch.equal(kernel.qweight, _mixed_bytes(qt.codes))
    assert rel(kernel(x), int8_oracle(x, qt)) < 1e-5


def test_fused_kernels_keep_the_layout() -> None:
    gen = torch.Generator().manual_seed(9)
    spec = QuantSpec(3, 64, False)
    qts = [random_qt(out, 320, spec, gen) for out in (6, 11)]
    kernels = [NativeKernel(native, pack(qt.codes, 3), qt.scale, qt.zero, spec, 320) for qt in qts]
    fused = fuse_native(kernels)
    assert fused.mixed3
    assert torch.equal(fused.qweight, torch.cat([_mixed_bytes(qt.codes) for qt in qts]))  # not repacked twice
    for rows in (1, 3):
        x = torch.randn(rows, 320, generator=gen)
        assert rel(fused(x), torch.cat([k(x) for k in kernels], -1)) < 1e-6  # rows pass in other quads
        for k, qt in zip(kernels, qts):
            assert rel(k(x), int8_oracle(x, qt)) < 1e-5
    with pytest.raises(ValueError, match="fused"):
        kernels[0].int8_decode = False


def test_repack_refuses_rows_it_cannot_hold() -> None:
    from bitsmith.kernels.cpu import repack

    with pytest.raises(ValueError, match="3-bit codes"):
        repack(native, torch.zeros(2, 100, dtype=torch.uint8), 256, True, 1)
    with pytest.raises(ValueError, match="mixed layout"):
        repack(native, torch.zeros(2, 72, dtype=torch.uint8), 192, True, 1)  # under one superblock
    qt = random_qt(3, 192, QuantSpec(3, 64, False), torch.Generator().manual_seed(2))
    assert not NativeKernel(native, pack(qt.codes, 3), qt.scale, qt.zero, qt.spec, 192).mixed3


def test_natural_gemv_helper_takes_the_layout_argument() -> None:
    """_natural_gemv passes layout 0; the same bytes with the mixed flag (bits 3 | 1 << 8) read as the mixed
    layout give other numbers, so the bit-for-bit test above can fail."""
    qt = random_qt(8, 512, QuantSpec(3, 128, False), torch.Generator().manual_seed(4))
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(4))
    packed = torch.zeros(8 * 192 + 8, dtype=torch.uint8)
    packed[:-8] = pack(qt.codes, 3).reshape(-1)
    y = torch.empty(1, 8)
    native.bs_gemv(packed.data_ptr(), qt.scale.data_ptr(), qt.zero.data_ptr(), 8, 512, 3 | 1 << 8, 128, x.data_ptr(),
                   1, y.data_ptr(), 1, 1)
    assert not torch.allclose(y, _natural_gemv(qt, x, 1), rtol=1e-2)
