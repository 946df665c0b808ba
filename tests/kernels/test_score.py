"""csrc/score.cpp: per-row log-sum-exp and first argmax of logits, against torch in float64 on fresh
random rows (ragged widths, ties, -inf and +inf entries, strided rows, 1 and 2 threads)."""

import math

import pytest
import torch

from bitsmith.kernels import score


def _native_or_skip(x: torch.Tensor, threads: int | None = None):
    got = score.row_lse_argmax(x, threads=threads)
    if got is None:
        pytest.skip("no native library with AVX-512 on this machine: eval takes torch's path")
    return got


@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 300, 4099, 49157])
def test_equals_float64_oracle_on_random_rows(vocab: int) -> None:
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(9, vocab, generator=g) * torch.tensor([0.1, 1, 3, 10, 30, 1, 1, 1, 1])[:, None]
    x[5] += 80.0  # large logits: the shift by the row's max keeps exp in range
    x[6] -= 80.0
    lse, best = _native_or_skip(x)
    want_lse, want_best = score.torch_lse_argmax(x)
    assert lse.dtype == torch.float64 and best.dtype == torch.int64
    assert torch.allclose(lse, want_lse, rtol=0, atol=2e-6 * max(1.0, math.log(vocab)))
    assert torch.equal(best, want_best)


def test_ties_take_the_first_index_and_infinities() -> None:
    x = torch.randn(6, 100, generator=torch.Generator().manual_seed(0))
    x[0, [7, 40, 99]] = 50.0  # three-way tie in different lanes and chunks
    x[1, [33, 17]] = 50.0  # same lane (17 and 33 differ by 16): the earlier wins
    x[2, :] = -math.inf
    x[3, 11] = math.inf
    x[4, ::2] = -math.inf  # half the vocabulary masked out
    x[5, :] = 2.5  # a flat row: argmax 0, lse = 2.5 + log(100)
    lse, best = _native_or_skip(x)
    want_lse, want_best = score.torch_lse_argmax(x)
    assert best.tolist() == [7, 17, 0, 11, want_best[4].item(), 0] and torch.equal(best, want_best)
    assert lse[2] == -math.inf and lse[3] == math.inf
    assert torch.allclose(lse[[0, 1, 4, 5]], want_lse[[0, 1, 4, 5]], atol=1e-6)
    assert lse[5] == pytest.approx(2.5 + math.log(100), abs=1e-6)


def test_strided_rows_and_thread_counts_agree() -> None:
    g = torch.Generator().manual_seed(3)
    big = torch.randn(37, 1200, generator=g) * 4
    x = big[:, 100:1100]  # rows a longer stride apart
    one = _native_or_skip(x, threads=1)
    two = score.row_lse_argmax(x, threads=2)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])  # rows are independent
    want_lse, want_best = score.torch_lse_argmax(x)
    assert torch.allclose(one[0], want_lse, atol=1e-5) and torch.equal(one[1], want_best)


def test_declines_what_it_does_not_cover() -> None:
    x = torch.randn(4, 64)
    _native_or_skip(x)
    x[2, 5] = math.nan  # torch's path propagates NaN as torch does
    assert score.row_lse_argmax(x) is None
    assert score.row_lse_argmax(torch.randn(4, 64, dtype=torch.float64)) is None
    assert score.row_lse_argmax(torch.randn(64, 4).t()) is None  # column stride != 1
    lse, best = score.lse_argmax(x)  # the fallback: torch's answer
    assert math.isnan(lse[2].item()) and torch.equal(best, x.max(-1).indices)
