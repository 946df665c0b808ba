"""Calibration token batches: docs/PROTOCOL.md's default windows, seeded random offsets, clear errors."""

import pytest
import torch
from tests.tiny import sample_text, tiny_tokenizer

from bitsmith.calib import CalibrationConfig, StatsAccumulator, calibration_batches, read_calibration_text
from bitsmith.eval.perplexity import tokenize_text


def test_default_windows_are_consecutive_from_the_start() -> None:
    tok, text = tiny_tokenizer(), sample_text(1000)
    ids = torch.tensor(tokenize_text(tok, text))
    batches = calibration_batches(tok, text, samples=5, seq_len=64)
    assert batches.shape == (5, 64) and batches.dtype == torch.long
    assert torch.equal(batches.flatten(), ids[: 5 * 64])


def test_random_offsets_are_seeded() -> None:
    tok, text = tiny_tokenizer(), sample_text(1000)
    a = calibration_batches(tok, text, samples=6, seq_len=32, seed=1, random_offsets=True)
    b = calibration_batches(tok, text, samples=6, seq_len=32, seed=1, random_offsets=True)
    c = calibration_batches(tok, text, samples=6, seq_len=32, seed=2, random_offsets=True)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_too_short_text_says_how_to_fix_it() -> None:
    tok = tiny_tokenizer()
    text = sample_text(300)
    n = len(tokenize_text(tok, text))
    with pytest.raises(ValueError) as err:
        calibration_batches(tok, text, samples=128, seq_len=512)
    assert str(err.value) == (
        f"calibration text has {n:,} tokens; 128 x 512 needs 65,536: "
        "give a longer --calib file or fewer --calib-samples"
    )


def test_shipped_text_and_config(tmp_path) -> None:
    assert len(read_calibration_text()) > 100_000  # the shipped State of the Union slice
    path = tmp_path / "calib.txt"
    path.write_text(sample_text(2000))
    batches = CalibrationConfig(text=path, samples=3, seq_len=16).batches(tiny_tokenizer())
    assert batches.shape == (3, 16)
    with pytest.raises(FileNotFoundError, match="--calib"):
        read_calibration_text(tmp_path / "missing.txt")


def test_stats_accumulator_is_the_sum_of_outer_products() -> None:
    torch.manual_seed(0)
    xs = [torch.randn(2, 5, 8), torch.randn(3, 5, 8)]
    acc = StatsAccumulator(8)
    for x in xs:
        acc.add(x)
    flat = torch.cat([x.reshape(-1, 8) for x in xs])  # [25, 8]
    stats = acc.stats()
    assert stats.tokens == 25
    torch.testing.assert_close(stats.hessian, flat.T @ flat)
    torch.testing.assert_close(stats.importance, flat.pow(2).mean(0))


@pytest.mark.parametrize("width", [512, 700, 1100])  # 2 panels, and 4 from 1024
def test_wide_stats_accumulate_the_upper_triangle_exactly(width: int) -> None:
    """Wide inputs accumulate only H's upper block triangle and mirror it: the same H as the full
    product (to float32 rounding), exactly symmetric."""
    torch.manual_seed(1)
    xs = [torch.randn(3, 40, width) * torch.rand(width) * 3, torch.randn(2, 40, width)]
    acc = StatsAccumulator(width)
    for x in xs:
        acc.add(x.bfloat16())
    flat = torch.cat([x.bfloat16().float().reshape(-1, width) for x in xs])
    stats = acc.stats()
    torch.testing.assert_close(stats.hessian, stats.hessian.T, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(stats.hessian, flat.T @ flat, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(stats.importance, flat.pow(2).mean(0), rtol=1e-5, atol=1e-6)
    assert stats.tokens == 200


@pytest.mark.parametrize("n", [40, 600])  # one block, and the upper-triangle panels
def test_bf16_products_stay_close_to_fp32(n) -> None:
    """--hessian-dtype bf16: each batch's product rounded once to bf16, summed in fp32; within bf16
    rounding of the fp32 Hessian (entries relative to the diagonal's scale)."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(3, 50, n, generator=g) for _ in range(4)]
    exact, fast = StatsAccumulator(n), StatsAccumulator(n, "bf16")
    for x in xs:
        exact.add(x)
        fast.add(x)
    h, hb = exact.stats().hessian, fast.stats().hessian
    assert torch.equal(hb, hb.T) and fast.tokens == exact.tokens
    assert (hb - h).abs().max() < 2e-2 * h.diagonal().mean()
    with pytest.raises(ValueError, match="products"):
        StatsAccumulator(n, "fp16")


@pytest.mark.parametrize("n", [24, 600])  # one block, and the upper-triangle panels
def test_capped_hessian_takes_the_first_tokens_and_importance_all(n) -> None:
    """hessian_tokens: the Hessian is the sum over the first N tokens only (cut inside a batch),
    the importance the mean x^2 over every token, and tokens counts every token."""
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(2, 30, n, generator=g) * torch.rand(n, generator=g) for _ in range(4)]
    acc = StatsAccumulator(n, hessian_tokens=75)  # two batches and 15 tokens of the third
    for x in xs:
        acc.add(x)
    flat = torch.cat([x.reshape(-1, n) for x in xs])  # [240, n]
    stats = acc.stats()
    assert stats.tokens == 240
    torch.testing.assert_close(stats.hessian, flat[:75].T @ flat[:75], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.importance, flat.pow(2).mean(0), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="hessian_tokens"):
        StatsAccumulator(n, hessian_tokens=0)


@pytest.mark.parametrize("n", [40, 600])  # one block, and the upper-triangle panels
def test_bf16_inputs_give_an_fp32_accurate_hessian(n) -> None:
    """bf16 inputs in the default fp32 mode take the bf16-fpmath GEMMs (exact products, fp32 sums
    and output): held to a float64 oracle as tightly as a plain float32 GEMM is, i.e. far inside
    the bf16-rounded products' error, which the same test shows is measurable."""
    from bitsmith.methods.parallel import bf16_fpmath

    g = torch.Generator().manual_seed(5)
    xs = [(torch.randn(4, 256, n, generator=g) * torch.rand(n, generator=g) * 3).bfloat16() for _ in range(3)]
    fast, rounded = StatsAccumulator(n), StatsAccumulator(n, "bf16")
    for x in xs:
        fast.add(x)
        rounded.add(x)
    flat = torch.cat([x.double().reshape(-1, n) for x in xs])
    oracle = flat.T @ flat
    scale = oracle.diagonal().mean()
    err = (fast.stats().hessian.double() - oracle).abs().max() / scale
    # a float32 GEMM summing K = 3072 products: about sqrt(K) x 2^-24 ~ 3e-6 of the scale (measured 2.15e-6
    # where oneDNN ignores the bf16 mode and MKL sums in float32); bf16-rounded products are ~1e-3
    assert err < 4e-6, err
    assert (rounded.stats().hessian.double() - oracle).abs().max() / scale > 10 * err
    torch.testing.assert_close(fast.stats().importance.double(), flat.pow(2).mean(0), rtol=1e-5, atol=1e-7)
    before = torch.backends.mkldnn.matmul.fp32_precision
    with bf16_fpmath() as on:  # the process-wide setting is restored, and off when not asked for
        assert not on or torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    with bf16_fpmath(False) as on:
        assert not on
    assert torch.backends.mkldnn.matmul.fp32_precision == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 255, 256, 700])
def test_square_sums_equal_the_float64_sums_and_leave_the_input(dtype, tokens) -> None:
    """The importance's per-channel sum of squares (float32 partial sums over token slices, float64
    across them) against a float64 oracle, on ragged token counts and both input dtypes; the caller's
    tensor is not squared in place."""
    from bitsmith.calib.stats import square_sums

    x = (torch.randn(tokens, 37, generator=torch.Generator().manual_seed(tokens)) * 3).to(dtype)
    before = x.clone()
    got = square_sums(x)
    want = x.double().pow(2).sum(0)
    assert got.dtype == torch.float64 and got.shape == (37,)
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    assert torch.equal(x, before)
