"""The native vector-codebook kernel (csrc/codebook.cpp) against the dequantize-then-matmul oracle."""

from __future__ import annotations

import pytest
import torch

from bitsmith.kernels import prepare, reference_linear
from bitsmith.kernels.build import native_library
from bitsmith.kernels.codebook import int8_activations, int8_codebook, int8_oracle
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

needs_native = pytest.mark.skipif(native_library() is None, reason="no C++ compiler: the native kernels are not built")
needs_vq8 = pytest.mark.skipif(native_library() is None or not native_library().bs_vq8_available(),
                               reason="no AVX-512 VBMI + VNNI build: the int8 vq decode is not compiled in")
EXACT = RuntimeOptions(int8_decode=False, prefill="exact")  # float activations and codebook: the exact oracle


def random_vq(text: str, out: int, inn: int, seed: int) -> QuantizedTensor:
    spec = QuantSpec.parse(text)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, spec.levels, (out, inn // spec.vq_dim), dtype=torch.uint8, generator=g)
    scale = (torch.rand(out, spec.groups_per_row(inn), generator=g) + 0.05).half()
    return QuantizedTensor(codes, scale, None, spec, torch.randn(spec.levels, spec.vq_dim, generator=g).half())


# whole runs and groups (the AVX2 path), short last groups (576 = 4.5 x 128), per-channel rows,
# rows whose indices do not fill a run of 8 (the portable path), the 6-bit packing
SHAPES = [("w2g64vq", 96, 576), ("w2g128vq", 33, 576), ("w2vq", 17, 200), ("w3g128vq", 40, 576), ("w3g32vq", 7, 96),
          ("w3vq", 9, 90), ("w4g64vq", 20, 256), ("w2g32vq", 300, 1000)]


@needs_native
@pytest.mark.parametrize("text, out, inn", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 13])
def test_kernel_equals_oracle(text: str, out: int, inn: int, rows: int) -> None:
    qt = random_vq(text, out, inn, seed=out + inn + rows)
    kernel = prepare(qt, EXACT)
    assert kernel.name == "native-vq"
    x = torch.randn(rows, inn, generator=torch.Generator().manual_seed(rows))
    want = reference_linear(x, qt)
    got = kernel(x)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=2e-5 * inn ** 0.5, rtol=1e-5)


@needs_native
def test_kernel_keeps_the_stored_tensors_and_batch_shape() -> None:
    qt = random_vq("w2g64vq", 64, 256, seed=1)
    kernel = prepare(qt, EXACT)
    assert torch.equal(kernel.quantized().codes, qt.codes)
    state, want = kernel.to_state("w"), qt.to_state("w")
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
    x = torch.randn(2, 3, 256)
    assert torch.allclose(kernel(x), reference_linear(x, qt), atol=1e-4)
    assert torch.equal(kernel.dequantize_rows(3, 9), qt.dequantize()[3:9])  # the prefill blocks: same arithmetic


def test_torch_choice_uses_the_oracle_arithmetic() -> None:
    qt = random_vq("w3g128vq", 16, 256, seed=2)
    kernel = prepare(qt, RuntimeOptions(kernel="torch"))
    x = torch.randn(4, 256)
    assert kernel.name == "torch-chunked" and torch.allclose(kernel(x), reference_linear(x, qt), atol=1e-5)


@needs_native
@pytest.mark.parametrize("text", ["w2g64vq", "w3g128vq", "w2vq"])
def test_threaded_kernel_equals_oracle(text: str) -> None:
    """Large enough for the parallel paths (several table slabs shared by two threads)."""
    qt = random_vq(text, 260, 1024, seed=9)
    kernel = prepare(qt, RuntimeOptions(threads=2, int8_decode=False, prefill="exact"))
    for rows in (1, 4, 20):
        x = torch.randn(rows, 1024, generator=torch.Generator().manual_seed(rows))
        assert torch.allclose(kernel(x), reference_linear(x, qt), atol=1e-3, rtol=1e-5)


# the int8 decode (csrc/codebook_int8.cpp): whole chunks of 64 indices, a short last chunk (576 / 4 =
# 144 = 2.25 chunks), short last groups, per-channel rows with 45 indices (no whole lane group), rows
# whose indices do not fill a run of 8, 6-bit runs cut by the row's end, 256-entry 2-dim codes
INT8_SHAPES = SHAPES + [("w2g64vq", 70, 1536), ("w3g128vq", 33, 8960 // 5), ("w4g128vq", 9, 384), ("w2g32vq", 5, 200),
               ("w3g256vq", 70, 1536), ("w3g256vq", 9, 8960 // 5)]  # a scale group spans two chunks


@needs_vq8
@pytest.mark.parametrize("text, out, inn", INT8_SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 3, 8])  # decode; a batched decode or a verify shares each weight row
def test_int8_decode_equals_its_oracle(text: str, out: int, inn: int, threads: int, rows: int) -> None:
    qt = random_vq(text, out, inn, seed=out * 7 + inn)
    kernel = prepare(qt, RuntimeOptions(threads=threads))
    assert kernel.int8
    g = torch.Generator().manual_seed(inn + rows)
    x = torch.randn(rows, inn, generator=g) * torch.rand(rows, 1, generator=g) * 6  # rows of unlike scales
    want = int8_oracle(x, qt)
    got = kernel(x)
    assert torch.allclose(got, want, atol=2e-5 * inn ** 0.5, rtol=1e-5)
    # and it is the int8 arithmetic, not the float one: the two differ by more than float rounding
    assert not torch.allclose(got, reference_linear(x, qt), atol=2e-5 * inn ** 0.5, rtol=1e-5)
    # a row in a batch gets exactly what it gets alone (same integer sums, same float steps): a batched
    # greedy decode picks the tokens the one-row decode picks
    for m in range(1, rows):
        assert torch.equal(got[m], kernel(x[m:m + 1])[0])


@needs_vq8
def test_int8_decode_stays_close_to_the_exact_product() -> None:
    """The accuracy cost of the int8 codebook and activations, bounded on a realistic layer."""
    qt = random_vq("w2g64vq", 256, 1536, seed=5)
    x = torch.randn(1, 1536, generator=torch.Generator().manual_seed(5))
    exact = reference_linear(x, qt)
    got = prepare(qt, RuntimeOptions())(x)
    assert (got - exact).norm() / exact.norm() < 0.02


def test_int8_codebook_and_activations_round_as_documented() -> None:
    grid = torch.tensor([[0.5, -1.0], [0.25, 0.0]]).half()
    q, scale = int8_codebook(grid)
    assert scale == pytest.approx(1.0 / 127) and q.tolist() == [[64, -127], [32, 0]]
    x = torch.cat([torch.zeros(32), torch.full((31,), 2.0), torch.tensor([-254.0]), torch.tensor([1.0, 0.0])])
    got = int8_activations(x)
    assert torch.equal(got[:32], torch.zeros(32))  # an all-zero block stays zero (no division by 0)
    assert torch.equal(got[32:64], x[32:64])  # 2 = 1 step of 2: exact; -254 = -127 steps
    assert torch.equal(got[64:], torch.tensor([1.0, 0.0]))  # the short last block has its own scale


@needs_vq8
def test_int8_decode_declines_lanes_across_groups() -> None:
    """Groups of fewer than 4 indices (no spec has them today): the C entry computes nothing and says
    so, and the caller runs the exact kernel."""
    from bitsmith.kernels.codebook import declare

    lib = declare(native_library())
    x, y = torch.randn(64), torch.full((3,), 7.0)
    packed, scale = torch.zeros(3 * 16 + 64, dtype=torch.uint8), torch.ones(3, 8).half()
    tables = torch.zeros(4, 256, dtype=torch.uint8)
    took = lib.bs_vq_gemm_int8(x.data_ptr(), 1, packed.data_ptr(), scale.data_ptr(), tables.data_ptr(), 1.0, 3, 64,
                               4, 8, 8, y.data_ptr(), 1)
    assert took == 0 and torch.equal(y, torch.full((3,), 7.0))


# the int8 prefill (bs_vq_gemm_prefill): 8-bit indices of 4 weights (w2), 6-bit of 2 (w3), 8-bit of 2 (w4),
# a short last chunk of indices (576 / 4 = 144), short last groups (576 = 4.5 x 128), rows past the last
# whole tile of 32 and activation rows past the last whole 4
PREFILL_SHAPES = [("w2g64vq", 96, 576), ("w3g128vq", 40, 576), ("w4g64vq", 20, 256), ("w3g256vq", 70, 1536),
                  ("w2g64vq", 33, 8960 // 5 // 64 * 64), ("w3g32vq", 7, 96)]


@needs_vq8
@pytest.mark.parametrize("text, out, inn", PREFILL_SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [9, 14, 70])
def test_int8_prefill_equals_its_oracle(text: str, out: int, inn: int, threads: int, rows: int) -> None:
    qt = random_vq(text, out, inn, seed=out * 5 + inn + rows)
    kernel = prepare(qt, RuntimeOptions(threads=threads, prefill="int8"))
    assert kernel.prefill == "int8"
    g = torch.Generator().manual_seed(inn * 3 + rows)
    x = torch.randn(rows, inn, generator=g) * torch.rand(rows, 1, generator=g) * 6  # rows of unlike scales
    got = kernel(x)
    assert torch.allclose(got, int8_oracle(x, qt), atol=2e-5 * inn ** 0.5, rtol=1e-5)
    assert not torch.allclose(got, reference_linear(x, qt), atol=2e-5 * inn ** 0.5, rtol=1e-5)  # not the float path
    # the decode's arithmetic: a row of the batch gets what the int8 decode gives it alone, to float
    # rounding (the same integer sums; the float steps are summed in another order)
    assert torch.allclose(got[rows - 1], kernel(x[rows - 1:])[0], atol=2e-5 * inn ** 0.5, rtol=1e-5)


@needs_vq8
def test_int8_prefill_choices() -> None:
    """auto means int8 for vq on every CPU (there is no bf16 vq prefill); exact and bf16 keep the float
    blocks; a width the tiles do not take (1000: not whole 32-blocks) falls back to them by itself."""
    qt = random_vq("w2g64vq", 40, 256, seed=3)
    x = torch.randn(12, 256, generator=torch.Generator().manual_seed(3))
    assert prepare(qt, RuntimeOptions(prefill="auto")).prefill == "int8"
    for choice in ("exact", "bf16"):
        kernel = prepare(qt, RuntimeOptions(prefill=choice))
        assert kernel.prefill == "exact"
        assert torch.allclose(kernel(x), reference_linear(x, qt), atol=1e-4, rtol=1e-5)
    ragged = random_vq("w2g32vq", 30, 1000, seed=4)
    xr = torch.randn(12, 1000, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(prepare(ragged, RuntimeOptions(prefill="int8"))(xr), reference_linear(xr, ragged),
                          atol=2e-5 * 1000 ** 0.5, rtol=1e-5)


@needs_vq8
@pytest.mark.parametrize("permi2b", [0, 1])
@pytest.mark.parametrize("text, out, inn", [("w2g64vq", 70, 1536), ("w4g128vq", 9, 384), ("w2g32vq", 33, 576)])
def test_both_256_entry_lookups_equal_the_oracle(permi2b: int, text: str, out: int, inn: int) -> None:
    """8-bit indices are looked up as four vpermb or as two vpermi2b, whichever the CPU runs faster
    (codebook_int8.cpp use_permi2b); each, built on purpose, is held to the int8 oracle in the decode
    (1 and 3 rows) and the prefill, so the path this CPU does not take is tested here too."""
    from bitsmith.kernels.codebook import CodebookKernel

    lib = native_library((f"-DBS_VQ8_PERMI2B={permi2b}",))
    qt = random_vq(text, out, inn, seed=out + inn + permi2b)
    kernel = CodebookKernel.of(lib, qt, threads=2, int8=True, prefill="int8")
    g = torch.Generator().manual_seed(inn + permi2b)
    for rows in (1, 3, 14):
        x = torch.randn(rows, inn, generator=g) * torch.rand(rows, 1, generator=g) * 6
        assert torch.allclose(kernel(x), int8_oracle(x, qt), atol=2e-5 * inn ** 0.5, rtol=1e-5), rows
