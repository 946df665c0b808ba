"""Session 14's exact fast paths against the plain formulas they replaced, bit for bit: the clip
search's in-place candidate loop (methods.rtn.fit_group_ranges) and the grouped dequantization
(primitives.dequantize_by_groups, behind QuantizedTensor.dequantize)."""

import pytest
import torch

from bitsmith.methods import rtn as rtn_module
from bitsmith.methods.rtn import MIN_SHRINK, fit_group_ranges, rtn
from bitsmith.primitives import (affine_params, dequantize_by_groups, dequantize_codes, expand_groups, group_mask,
                                 quantize_codes, to_groups)
from bitsmith.spec import QuantSpec


def _oracle(groups, spec, mask, weights, grid):
    """The search as written before session 14: whole tensor, one temporary per operation."""
    lo = groups.amin(dim=-1, keepdim=True)
    hi = groups.amax(dim=-1, keepdim=True)
    best_scale, best_zero = affine_params(lo, hi, spec)
    best_err = torch.full_like(lo, float("inf"))
    err_weight = torch.ones_like(groups[:1]) if weights is None else weights
    if mask is not None:
        err_weight = err_weight * mask
    for step in range(grid + 1):
        shrink = 1.0 - (1.0 - MIN_SHRINK) * step / grid
        scale, zero = affine_params(lo * shrink, hi * shrink, spec)
        recon = dequantize_codes(quantize_codes(groups, scale, zero, spec.qmax), scale, zero)
        err = ((recon - groups).pow(2) * err_weight).sum(dim=-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


@pytest.mark.parametrize("text,shape", [("w4g128", (97, 576)), ("w8", (301, 200)), ("w3g64s", (130, 300)),
                                        ("w2g32", (33, 96)), ("w8g64s", (64, 1000))])
@pytest.mark.parametrize("importance", [False, True])
def test_clip_search_matches_the_out_of_place_formula(text, shape, importance, monkeypatch) -> None:
    # a tile of ~3 rows' weights: several slices, and a ragged last one
    monkeypatch.setattr(rtn_module, "SEARCH_TILE", 3 * shape[1] + 7)
    gen = torch.Generator().manual_seed(hash((text, shape, importance)) % 2**31)
    spec = QuantSpec.parse(text)
    w = torch.randn(*shape, generator=gen) * torch.rand(shape[0], 1, generator=gen)
    w[0] = 0.0  # an all-zero row: scale 1
    w[1, :40] = 0.37  # a constant stretch
    groups, mask = to_groups(w, spec), group_mask(spec, shape[1])
    weights = None
    if importance:
        imp = torch.rand(shape[1], generator=gen) * 3
        weights = to_groups((imp / imp.mean()).unsqueeze(0), spec)
    for grid in (1, 7, 20):
        scale, zero = fit_group_ranges(groups, spec, mask, weights, grid)
        want_scale, want_zero = _oracle(groups, spec, mask, weights, grid)
        assert torch.equal(scale, want_scale) and torch.equal(zero, want_zero), (text, grid)


@pytest.mark.parametrize("text,shape", [("w4g128", (37, 576)), ("w4g128", (5, 1536)), ("w8", (19, 200)),
                                        ("w3g64s", (23, 300)), ("w2g32", (3, 96)), ("w6g256", (11, 100))])
def test_grouped_dequantize_matches_the_expanded_formula(text, shape) -> None:
    gen = torch.Generator().manual_seed(len(text) * 1000 + shape[0] * shape[1])
    spec = QuantSpec.parse(text)
    w = torch.randn(*shape, generator=gen) * torch.rand(shape[0], 1, generator=gen)
    qt = rtn(w, spec, None, {})
    zero = qt.zero_or_mid()
    want = dequantize_codes(qt.codes.float(), expand_groups(qt.scale.float(), spec, shape[1]),
                            expand_groups(zero, spec, shape[1]))
    assert torch.equal(qt.dequantize(), want)
    got = dequantize_by_groups(qt.codes, qt.scale.float(), zero, spec.group_width(shape[1]))
    assert torch.equal(got, want) and got.is_contiguous()
    rows = torch.tensor([shape[0] - 1, 0])  # a row subset (QuantizedTensor.rows with an index)
    assert torch.equal(qt.rows(rows).dequantize(), want[rows])
