"""AWQ's fast search paths, each against a slow oracle on fresh random inputs."""

from __future__ import annotations

import copy

import pytest
import torch

from bitsmith.methods.rtn import rtn
from bitsmith.primitives import to_groups
from bitsmith.spec import QuantSpec
from bitsmith.transforms.awq_fast import (
    clip_errors,
    coarse_indices,
    fine_indices,
    group_gram,
    minmax_qdq,
    output_error,
    search_indices,
    simulated_quantizer,
    token_basis,
)
from bitsmith.transforms.awq_search import awq_transform, clip_search
from tests.transforms.test_awq import _block


@pytest.mark.parametrize("spec_text,shape", [("w4g32", (24, 96)), ("w3g64", (7, 100)), ("w4g32s", (5, 70)),
                                             ("w2g32", (9, 45)), ("w8", (6, 40))])
def test_minmax_qdq_equals_rtn_min_max(spec_text, shape):
    spec = QuantSpec.parse(spec_text)
    for seed in range(3):
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05
        w[0, :3] = 0.0  # a partly zero row; ragged last groups in the 100/70/33-wide shapes
        expected = rtn(w, spec, None, {"clip_search": False}).dequantize()
        assert torch.equal(minmax_qdq(w, spec), expected)


def test_simulated_quantizer_is_the_method_elsewhere():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec.parse("w4g32")
    searched = simulated_quantizer(spec, rtn, {})(w)  # clip-searched RTN: the method itself
    assert torch.equal(searched, rtn(w, spec, None, {}).dequantize())


@pytest.mark.parametrize("tokens,width,cap", [(300, 40, 0), (30, 40, 0), (300, 40, 10), (500, 64, 64), (300, 400, 100)])
def test_token_basis_keeps_the_output_error(tokens, width, cap):
    g = torch.Generator().manual_seed(tokens + width)
    x = torch.randn(tokens, width, generator=g) * torch.rand(width, generator=g) * 3 + 0.5  # uneven, non-zero mean
    delta = torch.randn(17, width, generator=g)
    z, used = token_basis(x, cap)
    kept = x if not 0 < cap < min(tokens, width) else x[torch.linspace(0, tokens - 1, cap).round().long()]
    assert used == kept.shape[0] and z.shape[0] == min(used, width)
    exact = (kept.double() @ delta.double().T).pow(2).sum()
    assert torch.allclose((z.double() @ delta.double().T).pow(2).sum(), exact, rtol=1e-4)


def _slow_output_error(x, weights, scale, spec):
    total = 0.0
    for w in weights:
        q = rtn(w * scale, spec, None, {"clip_search": False}).dequantize() / scale
        total += float((x.double() @ (q - w).double().T).pow(2).sum())
    return total


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_output_error_equals_direct_product(dtype, rtol):
    g = torch.Generator().manual_seed(3)
    spec = QuantSpec.parse("w4g32")
    x = torch.randn(400, 96, generator=g) * (torch.rand(96, generator=g) * 4)
    weights = [torch.randn(50, 96, generator=g) * 0.05, torch.randn(21, 96, generator=g) * 0.05]
    scale = torch.rand(96, generator=g) + 0.5
    z, _ = token_basis(x)
    fast = output_error(z.to(dtype), weights, scale, lambda w: minmax_qdq(w, spec), chunk=96 * 8)  # several chunks
    assert fast == pytest.approx(_slow_output_error(x, weights, scale, spec), rel=rtol)


def test_clip_errors_equal_token_sums():
    g = torch.Generator().manual_seed(4)
    spec = QuantSpec.parse("w4g32")
    inputs, delta = torch.randn(64, 80, generator=g), torch.randn(6, 3, 32, generator=g)
    delta[:, -1, 16:] = 0.0  # the padded tail of the 80-wide row (3 groups of 32)
    x = torch.zeros(64, 96)
    x[:, :80] = inputs
    slow = torch.einsum("gtk,ogk->ogt", x.view(64, 3, 32).transpose(0, 1), delta).pow(2).mean(-1)
    torch.testing.assert_close(clip_errors(delta, group_gram(inputs, spec, 80), 64), slow, rtol=1e-4, atol=1e-6)


def _slow_clip_ratios(weight, inputs, spec, grid, min_ratio):
    """The per-(row, group) choice by explicit token sums, as the search did before Gram matrices."""
    w = to_groups(weight, spec)
    absmax = w.abs().amax(-1, keepdim=True)
    n, width = w.shape[1], w.shape[2]
    x = torch.zeros(inputs.shape[0], n * width)
    x[:, : weight.shape[1]] = inputs
    x = x.view(-1, n, width).transpose(0, 1)
    best_err, best_ratio = torch.full(w.shape[:2], float("inf")), torch.ones(w.shape[:2])
    for ratio in torch.linspace(1.0, min_ratio, grid).tolist():
        clipped = torch.maximum(torch.minimum(w, absmax * ratio), -absmax * ratio)
        q = rtn(clipped.reshape(w.shape[0], -1)[:, : weight.shape[1]], spec, None, {"clip_search": False})
        delta = to_groups(q.dequantize(), spec) - w
        err = torch.einsum("gtk,ogk->ogt", x, delta).pow(2).mean(-1)
        better = err < best_err
        best_err, best_ratio = torch.where(better, err, best_err), torch.where(better, ratio, best_ratio)
    return best_ratio


@pytest.mark.parametrize("dtype,agree", [(torch.float32, 0.98), (torch.bfloat16, 0.9)])
def test_clip_search_equals_token_sum_oracle(dtype, agree):
    g = torch.Generator().manual_seed(5)
    spec = QuantSpec.parse("w3g32")
    weight = torch.randn(40, 80, generator=g)  # 80 = 2.5 groups: a ragged last group
    weight[:, 5] *= 6.0
    inputs = torch.randn(200, 80, generator=g)
    _, ratio, before, after = clip_search(weight, inputs, spec, rtn, {"clip_search": False}, grid=12, dtype=dtype)
    slow = _slow_clip_ratios(weight, inputs, spec, 12, 0.5)
    # near-ties within rounding (bf16 products: ~3 digits) may pick a neighbour; nearly every (row, group) agrees
    assert (ratio == slow).float().mean() > agree and after < before


def test_linear_measure_matches_module_measure_where_the_module_is_the_linear():
    """o_proj and down_proj are measured on their own output either way: the same alpha (fp32 products);
    q/k/v and gate/up, measured on their outputs instead of the attention/MLP output, may differ."""
    spec = QuantSpec.parse("w3g32")
    block, hidden, kwargs = _block("llama", n=8, length=32)
    hidden[..., :4] *= 20.0
    other = copy.deepcopy(block)
    fast = awq_transform(block, hidden, kwargs, spec, rtn, {"clip_search": False, "awq_grid": 10, "awq_clip": False,
                                                            "awq_search_dtype": "fp32", "awq_measure": "linear",
                                                            "awq_check": False})
    slow = awq_transform(other, hidden, kwargs, spec, rtn, {"clip_search": False, "awq_grid": 10, "awq_clip": False,
                                                            "awq_search_dtype": "fp32", "awq_measure": "module",
                                                            "awq_check": False})
    by_prev = {r.prev: r for r in slow.scales}
    assert len(fast.scales) == len(slow.scales) == 4
    for r in fast.scales:
        if len(r.linears) == 1:  # o_proj, down_proj: the same objective
            assert r.alpha == by_prev[r.prev].alpha
            assert r.loss_before == pytest.approx(by_prev[r.prev].loss_before, rel=1e-3)
        assert r.loss_after <= r.loss_before


def test_bad_awq_options_are_refused():
    block, hidden, kwargs = _block("llama")
    bad_options = ({"awq_measure": "block"}, {"awq_search_dtype": "fp8"}, {"awq_clip_dtype": "f16"},
                   {"awq_search_tokens": -1}, {"awq_grid_step": 0}, {"awq_clip_step": 0})
    for bad in bad_options:
        with pytest.raises(ValueError, match="awq_"):
            awq_transform(block, hidden, kwargs, QuantSpec.parse("w4g32"), rtn, bad)


def test_token_basis_of_collinear_channels_falls_back_to_qr():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(200, 8, generator=g)
    x = torch.cat([x, x[:, :4] * 2.0], dim=1)  # 12 channels of rank 8: a singular Gram matrix
    delta = torch.randn(5, 12, generator=g)
    z, used = token_basis(x)
    assert used == 200 and z.shape == (12, 12) and torch.isfinite(z).all()
    exact = (x.double() @ delta.double().T).pow(2).sum()
    assert torch.allclose((z.double() @ delta.double().T).pow(2).sum(), exact, rtol=1e-4)


def test_auto_measure_is_the_attention_for_qkv_and_the_linears_elsewhere():
    """Default (auto): q/k/v get exactly the module measure's alpha (the same code path); o and down the
    linear measure's, which equals the module's there; gate/up the linear measure's."""
    spec = QuantSpec.parse("w3g32")
    block, hidden, kwargs = _block("qwen2", n=8, length=32)
    hidden[..., :4] *= 20.0
    base = {"clip_search": False, "awq_grid": 10, "awq_clip": False, "awq_search_dtype": "fp32", "awq_check": False}
    runs = {m: awq_transform(copy.deepcopy(block), hidden, kwargs, spec, rtn, {**base, "awq_measure": m})
            for m in ("auto", "linear", "module")}
    auto, linear, module = ({r.prev: r for r in runs[m].scales} for m in ("auto", "linear", "module"))
    assert set(auto) == set(linear) == set(module) and len(auto) == 4
    for prev, r in auto.items():
        if any(n.endswith("q_proj") for n in r.linears):
            assert (r.alpha, r.loss_before) == (module[prev].alpha, module[prev].loss_before)
        else:
            assert (r.alpha, r.loss_before) == (linear[prev].alpha, linear[prev].loss_before)


def test_module_measure_in_bf16_picks_the_fp32_alphas():
    """The module measure's forwards under bf16 autocast (awq_search_dtype=bf16): every group's alpha is the
    float32 forwards' or a near-tie of it (its float32 loss within 2% of the float32 optimum)."""
    spec = QuantSpec.parse("w3g32")
    block, hidden, kwargs = _block("qwen2", n=8, length=32)
    hidden[..., :4] *= 20.0
    base = {"clip_search": False, "awq_grid": 10, "awq_clip": False, "awq_measure": "module", "awq_check": False}
    runs = {d: awq_transform(copy.deepcopy(block), hidden, kwargs, spec, rtn, {**base, "awq_search_dtype": d})
            for d in ("bf16", "fp32")}
    fp32 = {r.prev: r for r in runs["fp32"].scales}
    assert len(runs["bf16"].scales) == len(fp32) == 4
    assert any(r.loss_before != fp32[r.prev].loss_before for r in runs["bf16"].scales)  # bf16 did run
    for r in runs["bf16"].scales:
        ref = fp32[r.prev]
        assert r.loss_before == pytest.approx(ref.loss_before, rel=0.05)  # the same measure, bf16 products
        if r.alpha != ref.alpha:
            assert abs(r.alpha - ref.alpha) <= 0.1 and r.loss_after == pytest.approx(ref.loss_after, rel=0.02)


def test_clip_products_in_fp32_keep_the_oracle_choice_where_inputs_share_a_large_offset():
    """Inputs with a large common component make ``delta H_g delta^T`` cancel: bf16 rounding of H_g then
    picks other ratios (and a higher loss), float32 keeps the token-sum oracle's; the default is float32."""
    g = torch.Generator().manual_seed(7)
    spec = QuantSpec.parse("w4g32")
    weight, inputs = torch.randn(40, 64, generator=g), torch.randn(256, 64, generator=g) + 20.0
    slow = _slow_clip_ratios(weight, inputs, spec, 12, 0.5)
    runs = {dt: clip_search(weight, inputs, spec, rtn, {"clip_search": False}, grid=12, dtype=dt)
            for dt in (torch.float32, torch.bfloat16)}
    assert torch.equal(runs[torch.float32][1], slow)
    assert not torch.equal(runs[torch.bfloat16][1], slow) and runs[torch.bfloat16][3] > runs[torch.float32][3]


def test_default_clip_search_runs_in_fp32():
    block, hidden, kwargs = _block("llama", n=4, length=32)
    hidden += 8.0  # a common offset: bf16 and fp32 clip products choose differently
    spec, base = QuantSpec.parse("w3g32"), {"clip_search": False, "awq_grid": 1}  # alpha 0 only: clipping alone
    weights = {}
    for key, extra in (("default", {}), ("fp32", {"awq_clip_dtype": "fp32"}), ("bf16", {"awq_clip_dtype": "bf16"})):
        other = copy.deepcopy(block)
        awq_transform(other, hidden, kwargs, spec, rtn, {**base, **extra})
        weights[key] = torch.cat([m.weight.flatten() for m in other.modules() if isinstance(m, torch.nn.Linear)])
    assert torch.equal(weights["default"], weights["fp32"]) and not torch.equal(weights["default"], weights["bf16"])


@pytest.mark.parametrize("n,step", [(20, 4), (20, 3), (10, 4), (7, 2), (5, 8)])
def test_coarse_to_fine_search_finds_the_minimum_of_unimodal_losses(n, step):
    """search_indices against the exhaustive minimum on fresh random unimodal losses (a random convex
    bowl plus a monotone tilt), with the lowest index on ties; it evaluates each candidate at most once and
    at most ceil(n / step) + 1 + 2 (step - 1) of them; step 1 evaluates all, in order."""
    g = torch.Generator().manual_seed(n * 10 + step)
    for _ in range(50):
        centre = float(torch.rand(1, generator=g)) * (n - 1)
        curv, tilt = float(torch.rand(1, generator=g)) + 0.01, float(torch.randn(1, generator=g)) * 0.1
        table = [curv * (i - centre) ** 2 + tilt * i for i in range(n)]
        calls = []
        losses = search_indices(n, step, lambda i: calls.append(i) or table[i])
        assert len(calls) == len(set(calls)) <= -(-n // step) + 1 + 2 * (step - 1)
        assert all(losses[i] == table[i] for i in calls)
        best = min(losses, key=lambda i: (losses[i], i))
        assert best == min(range(n), key=lambda i: (table[i], i))
    calls = []
    search_indices(n, 1, lambda i: calls.append(i) or 0.0)
    assert calls == list(range(n))


def test_coarse_and_fine_indices_cover_the_neighbourhood_once():
    assert coarse_indices(20, 4) == [0, 4, 8, 12, 16, 19]
    assert fine_indices(8, 20, 4) == [5, 6, 7, 9, 10, 11]
    assert fine_indices(19, 20, 4) == [17, 18]  # 16 and 19 were coarse
    assert fine_indices(0, 20, 4) == [1, 2, 3]
    ties = search_indices(12, 4, lambda i: 1.0)  # all equal: index 0 wins
    assert min(ties, key=lambda i: (ties[i], i)) == 0


def test_clip_search_coarse_to_fine_per_group():
    """clip_search with step > 1: at step >= grid the fine pass reaches every ratio of every group from its
    own coarse best, so the result is the exhaustive search's exactly (the per-group index machinery); at
    step 4 the jagged per-group errors let a few groups settle elsewhere (measured: 99% agree at w4g32)."""
    g = torch.Generator().manual_seed(11)
    spec = QuantSpec.parse("w4g32")
    weight = torch.randn(48, 96, generator=g) * torch.rand(96, generator=g)
    inputs = torch.randn(200, 96, generator=g) * (torch.rand(96, generator=g) * 3)
    runs = {st: clip_search(weight, inputs, spec, rtn, {"clip_search": False}, grid=20, damp=1.0, step=st)
            for st in (1, 4, 20)}
    assert torch.equal(runs[20][0], runs[1][0]) and torch.equal(runs[20][1], runs[1][1])
    assert runs[20][3] == runs[1][3]
    agree = (runs[4][1] == runs[1][1]).float().mean()
    assert agree > 0.9 and runs[4][3] == pytest.approx(runs[1][3], rel=0.02)
    coarse_only = clip_search(weight, inputs, spec, rtn, {"clip_search": False}, grid=6, damp=1.0)  # 1.0, 0.9, ...
    assert (runs[4][1] == runs[1][1]).sum() > (coarse_only[1] == runs[1][1]).sum()  # the fine pass ran


def test_scale_search_step_visits_a_subset_of_the_exhaustive_search():
    """awq_grid_step against 1 on a tiny block: a step of the whole grid reaches every alpha (the exhaustive
    result exactly); step 4 (the default) keeps the plain loss (alpha 0 is always visited) and ends between
    the exhaustive optimum and the plain loss. On this tiny block its loss is jagged in alpha, so step 4 may
    stop at another alpha; on real models it chose the exhaustive alpha in 107 of 111 SmolLM2 groups and in
    every Qwen2.5-Coder-1.5B group (the same checkpoint, bench/results/calibrated-methods)."""
    spec = QuantSpec.parse("w3g32")
    block, hidden, kwargs = _block("qwen2", n=8, length=32)
    hidden[..., :4] *= 20.0
    base = {"clip_search": False, "awq_clip": False, "awq_search_dtype": "fp32", "awq_check": False}
    runs = {st: {r.prev: r for r in awq_transform(copy.deepcopy(block), hidden, kwargs, spec, rtn,
                                                   {**base, "awq_grid_step": st}).scales} for st in (1, 4, 20)}
    assert len(runs[1]) == len(runs[4]) == len(runs[20]) == 4
    for prev, r in runs[1].items():
        whole, coarse = runs[20][prev], runs[4][prev]
        assert (whole.alpha, whole.loss_before, whole.loss_after) == (r.alpha, r.loss_before, r.loss_after)
        assert coarse.loss_before == r.loss_before and r.loss_after <= coarse.loss_after <= coarse.loss_before
