"""AWQ's block-level acceptance (transforms/awq_check) and the clip search's damping."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bitsmith.methods.rtn import rtn
from bitsmith.spec import QuantSpec
from bitsmith.transforms.awq_check import BlockCheck, block_errors
from bitsmith.transforms.awq_fast import minmax_qdq
from bitsmith.transforms.awq_search import awq_transform, clip_search
from tests.transforms.test_awq import _block, _out


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _quantized_errors(block: nn.Module, hidden: torch.Tensor, kwargs: dict, spec: QuantSpec,
                      reference: torch.Tensor) -> tuple[float, float]:
    """The oracle: every linear replaced by min/max RTN, then (per-token relative, mean squared) error."""
    block = copy.deepcopy(block)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(rtn(m.weight, spec, None, {"clip_search": False}).dequantize())
    out = _out(block, hidden, kwargs)
    diff = (out - reference).pow(2)
    return float((diff.sum(-1) / reference.pow(2).sum(-1)).mean()), float(diff.mean())


@pytest.mark.parametrize("arch,seed", [("llama", 0), ("qwen2", 1), ("qwen2", 2)])
def test_checked_transform_is_never_worse_than_plain_rtn_on_the_block(arch, seed):
    """Fresh random blocks with outlier channels and a massive token: the transformed block, quantized, has
    a lower (or equal) sum of error ratios to plain RTN than plain RTN itself (2.0), by an independent oracle
    on the check tokens (all 8 sequences here), and the report says the same numbers."""
    spec = QuantSpec.parse("w3g32")
    block, hidden, kwargs = _block(arch, n=8, length=32)
    g = torch.Generator().manual_seed(seed)
    hidden[..., torch.randperm(hidden.shape[-1], generator=g)[:4]] *= 20.0
    hidden[:, 0] *= 30.0  # a massive-activation token at position 0, as in Qwen's early blocks
    reference = _out(block, hidden, kwargs)
    plain = _quantized_errors(block, hidden, kwargs, spec, reference)
    report = awq_transform(block, hidden, kwargs, spec, rtn,
                           {"clip_search": False, "awq_grid": 10, "awq_search_dtype": "fp32", "awq_check_dtype": "fp32"},
                           batch_size=8)
    after = _quantized_errors(block, hidden, kwargs, spec, reference)
    units = sum(a / p for a, p in zip(after, plain))
    assert units <= 2.0 + 1e-4, (after, plain)
    assert report.block_error_plain == pytest.approx(plain, rel=1e-3)
    assert report.block_error == pytest.approx(after, rel=1e-3)


def test_unchecked_transform_reports_no_block_error():
    block, hidden, kwargs = _block("llama", n=4, length=16)
    report = awq_transform(block, hidden, kwargs, QuantSpec.parse("w4g32"), rtn,
                           {"clip_search": False, "awq_grid": 4, "awq_check": False})
    assert report.block_error == () and report.block_error_plain == ()


def test_try_change_keeps_improvements_and_restores_the_rest_bit_for_bit():
    """A one-linear "block", the grid the integers, the reference x @ 0.1: plain (0.6 -> 1) is off by 0.9."""
    linear = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        linear.weight.fill_(0.6)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))

    def forward() -> torch.Tensor:
        return linear(x)

    check = BlockCheck({"lin": linear}, torch.round, forward, x @ torch.full((4, 8), 0.1).T)
    assert check.error == 2.0 and check.current == check.plain and check.plain[0] > 0
    assert check.try_change([linear.weight], ["lin"], lambda: linear.weight.sub_(0.2))  # 0.4 -> 0: off by 0.1
    assert check.error == pytest.approx(2 / 81) and check.current[1] == pytest.approx(check.plain[1] / 81)
    kept = linear.weight.detach().clone()
    assert not check.try_change([linear.weight], ["lin"], lambda: linear.weight.add_(0.3))  # 0.7 -> 1: worse
    assert torch.equal(linear.weight, kept) and check.error == pytest.approx(2 / 81)
    # the rejected state's quantization is not left in the cache: a tie with the kept state is kept
    assert check.try_change([linear.weight], ["lin"], lambda: linear.weight.add_(0.05))  # 0.45 -> 0 as well
    assert check.evaluations == 4


def test_block_errors_are_relative_per_token_and_plain_mean():
    ref = torch.tensor([[[3.0, 4.0], [30.0, 40.0]]])  # norms 5 and 50
    out = ref + torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    rel, mse = block_errors(out, ref)
    assert rel == pytest.approx((1 / 25 + 1 / 2500) / 2)
    assert mse == pytest.approx(0.5)


def _weight_mse_ratios(weight, spec, grid, min_ratio):
    """Oracle for an infinite damp: per (row, group) the ratio minimising the plain weight error."""
    from bitsmith.primitives import from_groups, to_groups

    w = to_groups(weight, spec)
    absmax = w.abs().amax(-1, keepdim=True)
    best, best_ratio = None, None
    for ratio in torch.linspace(1.0, min_ratio, grid).tolist():
        clipped = torch.maximum(torch.minimum(w, absmax * ratio), -absmax * ratio)
        err = (to_groups(minmax_qdq(from_groups(clipped, weight.shape[1]), spec), spec) - w).pow(2).sum(-1)
        if best is None:
            best, best_ratio = err, torch.ones_like(err)
        better = err < best
        best, best_ratio = torch.where(better, err, best), torch.where(better, ratio, best_ratio)
    return best_ratio


def test_clip_damp_moves_the_choice_to_the_weight_error():
    """damp 0 is the plain search; a very large damp picks, per (row, group), the ratio of least weight error
    (the Gram term becomes a multiple of the identity), whatever the inputs."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(24, 64, generator=g)
    weight[:, 5] *= 5.0
    inputs = torch.randn(256, 64, generator=g) + 4.0 * torch.randn(1, 64, generator=g)  # a shared component
    spec = QuantSpec.parse("w3g32")
    options = {"clip_search": False}
    _, plain_ratio, *_ = clip_search(weight, inputs, spec, rtn, options)
    _, zero_ratio, *_ = clip_search(weight, inputs, spec, rtn, options, damp=0.0)
    assert torch.equal(plain_ratio, zero_ratio)
    _, damped, *_ = clip_search(weight, inputs, spec, rtn, options, damp=1e6)
    oracle = _weight_mse_ratios(weight, spec, 20, 0.5)
    assert (damped == oracle).float().mean() > 0.97  # the rest: float ties between ratios
    assert not torch.equal(plain_ratio, damped)  # the inputs did matter without damping


def test_bad_check_and_damp_options_are_refused():
    block, hidden, kwargs = _block("llama")
    for bad in ({"awq_check_tokens": 0}, {"awq_clip_damp": -1.0}, {"awq_clip_damp": float("nan")},
                {"awq_check_dtype": "fp16"}):
        with pytest.raises(ValueError, match="awq_"):
            awq_transform(block, hidden, kwargs, QuantSpec.parse("w4g32"), rtn, bad)


def test_harmful_folds_and_clips_are_kept_out(monkeypatch):
    """Searches made to propose harm (scales spread over 1e-3..1e3, every group clipped to 30% of its
    range): unchecked, the quantized block is far worse than plain RTN; checked, every harmful change is
    kept out and the block is never worse than plain RTN."""
    from bitsmith.transforms import awq_search

    def bad_scale(block, group, cal, spec, method, options, opts):
        width = dict(block.named_modules())[group.linears[0]].in_features
        scale = torch.logspace(-3, 3, width)[torch.randperm(width, generator=torch.Generator().manual_seed(0))]
        return scale, 0.5, 1.0, 0.5

    def bad_clip(weight, inputs, spec, method, options, grid=20, min_ratio=0.5, dtype=None, damp=0.0, step=1):
        bound = 0.3 * weight.abs().amax()
        ratio = torch.full((weight.shape[0], spec.groups_per_row(weight.shape[1])), 0.3)
        return weight.clamp(-bound, bound), ratio, 1.0, 0.5

    monkeypatch.setattr(awq_search, "_search_scale", bad_scale)
    monkeypatch.setattr(awq_search, "clip_search", bad_clip)
    spec = QuantSpec.parse("w4g32")
    units = {}
    for check in (False, True):
        block, hidden, kwargs = _block("qwen2", n=8, length=32)
        reference = _out(block, hidden, kwargs)
        plain = _quantized_errors(block, hidden, kwargs, spec, reference)
        report = awq_transform(block, hidden, kwargs, spec, rtn, {"clip_search": False, "awq_search_dtype": "fp32",
                                                                  "awq_check_dtype": "fp32",
                                                                  "awq_check": check}, batch_size=8)
        after = _quantized_errors(block, hidden, kwargs, spec, reference)
        units[check] = sum(a / p for a, p in zip(after, plain))
        if check:
            assert len(report.skipped) >= 3 and not report.clips[0].clipped_fraction
    assert units[False] > 4.0 and units[True] <= 2.0 + 1e-4, units


def test_defaults_check_the_block_and_damp_the_clip():
    from bitsmith.transforms.awq_options import AwqOptions

    opts = AwqOptions.from_dict({})
    assert opts.check and opts.check_tokens == 1024 and opts.clip_damp == 1.0 and opts.check_dtype == "auto"
    assert not AwqOptions.from_dict({"awq_check": "false"}).check
