"""The superblock decode of 2-, 3- and 4-bit rows (csrc/vbmi.cpp ``rows_strided``): one activation row,
x's int8 codes permuted per call, several 64-code chunks gathered into one int32 accumulator.

Held to the same oracle as every int8-activation decode (x rounded to int8 per 32-block, then the
exact dequantize-then-matmul) on random shapes whose rows end in a ragged tail of natural-order chunks
and whose groups are smaller than, equal to or larger than a superblock; and against the chunk path
of a build without it (``-DBS_NO_STRIDED``): the integer products are the same, only the float
summation order differs.
"""

from __future__ import annotations

import pytest
import torch

from bitsmith.formats.packing import pack
from bitsmith.kernels.build import cpu_flags, int8_widths, native_library
from bitsmith.kernels.cpu import NativeKernel
from bitsmith.spec import QuantSpec
from tests.kernels.int8_oracle import int8_oracle, random_qt, rel

native = native_library()
VBMI = native is not None and int8_widths(native) >= set(range(2, 9))
needs_vbmi = pytest.mark.skipif(not VBMI, reason="the superblock decode needs AVX-512 VBMI + VNNI")

# in: whole superblocks only, superblocks plus 1-3 tail chunks, fewer codes than one superblock
WIDTHS = (64, 128, 192, 256, 320, 448, 512, 576, 704, 1536)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread per test




# what csrc/vbmi.cpp is compiled with (/proc/cpuinfo spellings)
VBMI_FLAGS = {"avx512vbmi", "avx512_vnni", "avx512bw", "avx512vl", "f16c", "gfni"}


def test_the_superblock_decode_is_built_where_the_cpu_has_it() -> None:
    """On a CPU with every instruction vbmi.cpp needs, the library builds and takes every width with int8
    activations: a build that fails, or a guard that leaves the path out, would otherwise only skip the
    tests below."""
    if not VBMI_FLAGS <= set(cpu_flags().split()):
        pytest.skip("this CPU lacks one of " + ", ".join(sorted(VBMI_FLAGS)))
    assert native is not None, "the kernel library did not build"
    assert int8_widths(native) >= set(range(2, 9)), "the VBMI int8 decode is not compiled in"


@needs_vbmi
@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("group", (64, 128, 256, None))
def test_superblock_decode_matches_the_int8_oracle(bits: int, group: int | None) -> None:
    chunked = native_library(("-DBS_NO_STRIDED",))
    gen = torch.Generator().manual_seed(100 * bits + (group or 0))
    for symmetric in (False, True):
        spec = QuantSpec(bits, group, symmetric)
        for inp in WIDTHS:
            if group and group > inp:
                continue
            out = int(torch.randint(1, 40, (1,), generator=gen))  # quads of rows and a remainder
            qt = random_qt(out, inp, spec, gen)
            x = torch.randn(1, inp, generator=gen) * torch.rand(inp, generator=gen) * 3 + 0.1
            x[0, : min(32, inp)] = 0.0  # a zero block: no division by zero
            packed = pack(qt.codes, bits)
            y = NativeKernel(native, packed, qt.scale, qt.zero, spec, inp)(x)
            assert rel(y, int8_oracle(x, qt)) < 1e-5, (spec, out, inp)
            if chunked is not None:
                y_chunks = NativeKernel(chunked, packed, qt.scale, qt.zero, spec, inp)(x)
                assert rel(y, y_chunks) < 1e-5, (spec, out, inp)


@needs_vbmi
def test_superblock_decode_inside_the_fused_rows_agrees_with_several_rows() -> None:
    """A decode row (T = 1, permuted x) and the same row inside a 3-row call (natural order) agree:
    the permutation is per call and never leaks into the layout another call reads."""
    gen = torch.Generator().manual_seed(7)
    for bits in (2, 3, 4):
        spec = QuantSpec(bits, 128, False)
        qt = random_qt(21, 576, spec, gen)
        kernel = NativeKernel(native, pack(qt.codes, bits), qt.scale, qt.zero, spec, 576)
        x = torch.randn(3, 576, generator=gen)
        many = kernel(x)
        for t in range(3):
            assert rel(kernel(x[t : t + 1]), many[t : t + 1]) < 1e-5
        assert rel(many, int8_oracle(x, qt)) < 1e-5


@needs_vbmi
@pytest.mark.parametrize("bits", (2, 3, 4))
def test_superblock_decode_on_two_threads_matches_the_oracle(bits: int) -> None:
    """Two threads share out the rows (quads and the remainder) of superblock rows whose lanes span several
    groups (g64: the 2-bit superblock is 512 codes, 8 groups) and rows with a ragged natural-order tail."""
    gen = torch.Generator().manual_seed(31 + bits)
    for group, inp in ((64, 1536), (128, 1088), (256, 2304), (64, 576)):
        spec = QuantSpec(bits, group, False)
        qt = random_qt(int(torch.randint(9, 70, (1,), generator=gen)), inp, spec, gen)
        x = torch.randn(1, inp, generator=gen) * 2
        kernel = NativeKernel(native, pack(qt.codes, bits), qt.scale, qt.zero, spec, inp, threads=2)
        y = kernel(x)
        assert rel(y, int8_oracle(x, qt)) < 1e-5, (spec, inp)
        assert torch.equal(y, kernel(x)), "the same call twice must give the same bits"


@needs_vbmi
@pytest.mark.parametrize("threads", (1, 2))
def test_far_prefetch_build_gives_the_same_bits(threads: int) -> None:
    """The far L2 prefetch (``-DBS_PF_FAR``, a tuning knob of rows_strided, 4 passes by default) only adds
    prefetch instructions: every width, group and ragged shape decodes to the same bits with it (the
    default build) as without it (``-DBS_PF_FAR=0``) and with a farther one, rows near the matrix's end
    included (the prefetch runs past it)."""
    near, far8 = native_library(("-DBS_PF_FAR=0",)), native_library(("-DBS_PF_FAR=8",))
    assert near is not None and far8 is not None, "the builds with and without the far prefetch must compile"
    gen = torch.Generator().manual_seed(90 + threads)
    for bits in (2, 3, 4):
        for group, inp in ((64, 1536), (128, 1088), (None, 576), (256, 8960 - 128)):
            spec = QuantSpec(bits, group, False)
            qt = random_qt(int(torch.randint(9, 70, (1,), generator=gen)), inp, spec, gen)
            x = torch.randn(1, inp, generator=gen) * 2
            packed = pack(qt.codes, bits)
            y = NativeKernel(native, packed, qt.scale, qt.zero, spec, inp, threads=threads)(x)
            assert rel(y, int8_oracle(x, qt)) < 1e-5, (spec, inp)
            for other in (near, far8):
                y_other = NativeKernel(other, packed, qt.scale, qt.zero, spec, inp, threads=threads)(x)
                assert torch.equal(y, y_other), (spec, inp)
