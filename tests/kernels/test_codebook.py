"""The native vector-codebook kernel (csrc/codebook.cpp) against the dequantize-then-matmul oracle."""

from __future__ import annotations

import pytest
import torch

from bitsmith.kernels import prepare, reference_linear
from bitsmith.kernels.build import native_library
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

needs_native = pytest.mark.skipif(native_library() is None, reason="no C++ compiler: the native kernels are not built")


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
    kernel = prepare(qt, RuntimeOptions())
    assert kernel.name == "native-vq"
    x = torch.randn(rows, inn, generator=torch.Generator().manual_seed(rows))
    want = reference_linear(x, qt)
    got = kernel(x)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=2e-5 * inn ** 0.5, rtol=1e-5)


@needs_native
def test_kernel_keeps_the_stored_tensors_and_batch_shape() -> None:
    qt = random_vq("w2g64vq", 64, 256, seed=1)
    kernel = prepare(qt, RuntimeOptions())
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
    kernel = prepare(qt, RuntimeOptions(threads=2))
    for rows in (1, 4, 20):
        x = torch.randn(rows, 1024, generator=torch.Generator().manual_seed(rows))
        assert torch.allclose(kernel(x), reference_linear(x, qt), atol=1e-3, rtol=1e-5)
