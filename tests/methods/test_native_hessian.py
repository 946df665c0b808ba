"""The bf16 Hessian update (kernels/csrc/hessian.cpp via methods.native: AMX tiles, or AVX512-BF16
without AMX): held to a float64 oracle on random ragged shapes, its untouched lower blocks,
thread-count independence, and StatsAccumulator's results with and without it."""

import pytest
import torch

from bitsmith.calib import StatsAccumulator
from bitsmith.calib.stats import mirror_upper
from bitsmith.methods import native

LIB = native.hessian_library()
needs_amx = pytest.mark.skipif(LIB is None, reason="no AMX or AVX512-BF16 on this CPU (or no compiler): the GEMM path is used")


def _bf16(g: torch.Generator, *shape: int) -> torch.Tensor:
    # per-column scales spread the magnitudes, as real activations have outlier channels
    return (torch.randn(*shape, generator=g) * torch.rand(shape[-1], generator=g) * 4).bfloat16()


@needs_amx
@pytest.mark.parametrize("tokens,n", [(1, 5), (31, 33), (100, 64), (257, 95), (600, 130), (1030, 300)])
def test_kernel_matches_a_float64_oracle_on_and_above_the_diagonal(tokens: int, n: int) -> None:
    """Ragged tokens (a partial 32-token step, several 256-token chunks) and widths (edge blocks):
    entries with column >= row gain x^T x to float32 accuracy; blocks below the diagonal are untouched."""
    g = torch.Generator().manual_seed(tokens * 1000 + n)
    x = _bf16(g, tokens, n)
    start = torch.randn(n, n, generator=g)
    h = start.clone()
    assert native.hessian_update(LIB, x, h)
    oracle = start.double() + x.double().T @ x.double()
    upper = torch.ones(n, n, dtype=torch.bool).triu()
    err = ((h.double() - oracle).abs() / (oracle.diagonal().abs().mean() + 1))[upper].max()
    assert err < 2e-6, err
    below = torch.ones(n, n, dtype=torch.bool)
    for i in range(0, n, 32):  # the diagonal 32 x 32 blocks and everything right of them may change
        below[i: i + 32, i:] = False
    assert torch.equal(h[below], start[below])


@needs_amx
def test_kernel_reads_strided_rows_and_writes_into_a_wider_matrix() -> None:
    g = torch.Generator().manual_seed(7)
    wide = _bf16(g, 70, 100)
    x = wide[:, 10:77]  # row stride 100, 67 columns
    big = torch.zeros(67, 90)
    h = big[:, 5:72]  # row stride 90
    assert native.hessian_update(LIB, x, h)
    oracle = x.double().T @ x.double()
    upper = torch.ones(67, 67, dtype=torch.bool).triu()
    assert ((h.double() - oracle)[upper].abs().max() / oracle.diagonal().mean()) < 2e-6
    assert torch.equal(big[:, :5], torch.zeros(67, 5)) and torch.equal(big[:, 72:], torch.zeros(67, 18))


@needs_amx
@pytest.mark.parametrize("n", [300, 600, 1100])  # row blocks per task at 1/2/3 threads: 8/1/1, 8/2/1, 8/4/2
def test_kernel_result_does_not_depend_on_the_thread_count(n: int) -> None:
    g = torch.Generator().manual_seed(8)
    x = _bf16(g, 700, n)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            h = torch.zeros(n, n)
            native.hessian_update(LIB, x, h)
            results.append(h)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(r, results[0]) for r in results)


def test_mirror_upper_copies_the_upper_triangle_down() -> None:
    g = torch.Generator().manual_seed(9)
    for n in (1, 7, 600, 1100):  # one slice, and several (MIRROR_ROWS = 512)
        h = torch.randn(n, n, generator=g)
        want = h.triu() + h.triu(1).T
        mirror_upper(h)
        assert torch.equal(h, want)


@pytest.mark.parametrize("n", [40, 600])
def test_accumulator_with_and_without_the_kernel(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 batches through the kernel (where it runs) and through the fpmath GEMMs give the same
    Hessian to float32 summation order, both exactly symmetric and both at float32 accuracy against
    a float64 oracle; a float32 batch in between (GEMM panels) mixes with kernel batches correctly."""
    g = torch.Generator().manual_seed(10 + n)
    xs = [_bf16(g, 3, 100, n) for _ in range(3)]
    mixed = torch.randn(2, 50, n, generator=g)  # float32: always the GEMM path
    results = []
    for use_kernel in (True, False):
        if not use_kernel:
            monkeypatch.setattr(native, "hessian_library", lambda: None)
        acc = StatsAccumulator(n)
        for x in (xs[0], mixed, *xs[1:]):
            acc.add(x)
        results.append(acc.stats())
    flat = torch.cat([x.double().reshape(-1, n) for x in (xs[0], mixed, *xs[1:])])
    oracle = flat.T @ flat
    for stats in results:
        assert torch.equal(stats.hessian, stats.hessian.T) and stats.tokens == 1000
        assert ((stats.hessian.double() - oracle).abs().max() / oracle.diagonal().mean()) < 2e-6
        torch.testing.assert_close(stats.importance.double(), flat.pow(2).mean(0), rtol=1e-5, atol=1e-7)


@needs_amx
@pytest.mark.parametrize("tokens,n", [(1, 5), (31, 33), (33, 64), (257, 95), (1030, 300), (700, 576)])
def test_vector_packing_equals_the_scalar_reference_bit_for_bit(tokens: int, n: int) -> None:
    """The 512-bit tile packing writes the bytes the element-by-element packing writes (ragged token
    counts and widths: partial 32-token groups and 32-feature panels, strided rows), so H is identical."""
    g = torch.Generator().manual_seed(tokens + 7 * n)
    x = _bf16(g, tokens, n + 9)[:, 4 : 4 + n]  # a row stride wider than the row
    start = torch.randn(n, n, generator=g)
    fast, slow = start.clone(), start.clone()
    assert native.hessian_update(LIB, x, fast) and native.hessian_update(LIB, x, slow, scalar_pack=True)
    assert torch.equal(fast, slow)
