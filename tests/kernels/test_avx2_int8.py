"""The AVX2 int8-activation decode of 2- and 3-bit codes (csrc/avx2_int8.cpp), built where the CPU has
AVX2 + FMA + F16C and no AVX-512: held to the int8 oracle (x rounded to int8 per 32-block, then the exact
dequantize-then-matmul) on random shapes with partial last groups, groups narrower than, equal to and
wider than a chunk (32, 64, 128, 256, per channel), symmetric and with zero points, 1..5 activation
rows, 1 and 2 threads; and against the float path of a build without it (``-DBS_NO_AVX2_INT8``).
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
FLAGS = set(cpu_flags().split())
AVX2_ONLY = {"avx2", "fma", "f16c"} <= FLAGS and "avx512f" not in FLAGS
TAKES = native is not None and int8_widths(native) >= {2, 3} and AVX2_ONLY
needs_avx2 = pytest.mark.skipif(not TAKES, reason="the AVX2 2/3-bit int8 decode needs AVX2 + FMA + F16C, no AVX-512")

CHUNK = {2: 128, 3: 64}  # codes per unpacked chunk: `in` must be whole chunks
# whole chunks; 576 = 4.5 groups of 128 and 2.25 of 256 (partial last groups); 1536 and 8960 Qwen2.5-1.5B's
WIDTHS = (128, 256, 384, 576, 640, 1536, 8960)


def test_the_avx2_decode_is_built_where_the_cpu_has_it() -> None:
    """On an AVX2-only CPU the library builds and runs 2- and 3-bit codes with int8 activations: a guard
    that leaves the path out would otherwise only skip the tests below."""
    if not AVX2_ONLY:
        pytest.skip("not an AVX2 + FMA + F16C CPU without AVX-512")
    assert native is not None, "the kernel library did not build"
    assert int8_widths(native) >= {2, 3, 4}


def _check(bits: int, group: int | None, threads: int, gen: torch.Generator) -> None:
    plain = native_library(("-DBS_NO_AVX2_INT8",))  # the float dot_runs path of the same sources
    assert plain is not None and not int8_widths(plain) & {2, 3}
    for symmetric in (False, True):
        spec = QuantSpec(bits, group, symmetric)
        for inp in WIDTHS:
            if inp % CHUNK[bits] or (group and group > inp):
                continue
            out = int(torch.randint(1, 40, (1,), generator=gen))
            rows = int(torch.randint(1, 6, (1,), generator=gen))
            qt = random_qt(out, inp, spec, gen)
            x = torch.randn(rows, inp, generator=gen) * torch.rand(inp, generator=gen) * 3 + 0.1  # uneven channels
            x[0, :32] = 0.0  # a zero block: no division by zero
            packed = pack(qt.codes, bits)
            y = NativeKernel(native, packed, qt.scale, qt.zero, spec, inp, threads=threads)(x)
            assert rel(y, int8_oracle(x, qt)) < 1e-5, (spec, out, inp, rows)
            exact = NativeKernel(plain, packed, qt.scale, qt.zero, spec, inp, threads=threads)(x)
            # the int8 rounding, bounded (loosely: a few symmetric rows can nearly cancel)
            assert 1e-5 < rel(y, exact) < 5e-2, (spec, out, inp, rows)


@needs_avx2
@pytest.mark.parametrize("bits", (2, 3))
@pytest.mark.parametrize("group", (32, 64, 128, 256, None))
def test_avx2_decode_matches_the_int8_oracle(bits: int, group: int | None) -> None:
    _check(bits, group, 1, torch.Generator().manual_seed(10 * bits + (group or 0)))


@needs_avx2
@pytest.mark.parametrize("bits", (2, 3))
def test_avx2_decode_two_threads(bits: int) -> None:
    torch.set_num_threads(2)
    try:
        for group in (32, 64, 128, None):
            _check(bits, group, 2, torch.Generator().manual_seed(99 + bits + (group or 0)))
    finally:
        torch.set_num_threads(1)


@needs_avx2
def test_shapes_the_path_cannot_take_stay_exact() -> None:
    """Rows that are not whole chunks, or groups that split a chunk unevenly, run the exact float path."""
    from bitsmith.kernels import reference_linear

    gen = torch.Generator().manual_seed(5)
    for bits, group, inp in ((2, 64, 192), (2, 32, 96), (3, 32, 96), (3, 128, 200), (2, None, 200)):
        spec = QuantSpec(bits, group, False)
        qt = random_qt(9, inp, spec, gen)
        x = torch.randn(2, inp, generator=gen)
        y = NativeKernel(native, pack(qt.codes, bits), qt.scale, qt.zero, spec, inp)(x)
        assert rel(y, reference_linear(x, qt)) < 1e-5, (bits, group, inp)
