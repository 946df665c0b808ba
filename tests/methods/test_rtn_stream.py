"""The streaming RTN path (row slices, in-place codes, min/max ranges without a float32 copy of the
weight) against the whole-tensor implementation it replaced, kept here as the oracle: the same
codes, scales and zeros, bit for bit, for every width, group size (ragged last groups included),
symmetric and grid formats, and bf16 or float32 weights."""

from __future__ import annotations

import pytest
import torch

from bitsmith.methods import rtn as rtn_module
from bitsmith.methods.rtn import rtn
from bitsmith.primitives import affine_params, from_groups, nearest_grid_codes, quantize_codes, to_groups
from bitsmith.spec import QuantSpec


def oracle_params(weight: torch.Tensor, spec: QuantSpec):
    """The former whole-tensor min/max ranges: amin and amax over float32 groups."""
    groups = to_groups(weight.float(), spec)
    return affine_params(groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True), spec)


def oracle_codes(weight, scale, zero, spec, grid=None):
    """The former quantize_with_params, whole tensor at once (out-of-place steps)."""
    weight = weight.float()
    scale16 = scale.half()
    zero16 = zero.half() if spec.has_zero else None
    groups = to_groups(weight, spec)
    if grid is not None:
        codes = nearest_grid_codes(groups / scale16.float(), grid)
    else:
        zero_used = zero if zero16 is None else zero16.float()
        codes = quantize_codes(groups, scale16.float(), zero_used, spec.qmax)
    return from_groups(codes, weight.shape[1]).to(torch.uint8), scale16.squeeze(-1), zero16


SPECS = [f"w{b}{g}{s}" for b in range(2, 9) for g in ("", "g32", "g128") for s in ("", "s")]


@pytest.mark.parametrize("spec_text", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_rtn_matches_whole_tensor_oracle(spec_text, dtype, monkeypatch):
    monkeypatch.setattr(rtn_module, "CODE_CHUNK", 700)  # several slices, one of them short
    spec = QuantSpec.parse(spec_text)
    gen = torch.Generator().manual_seed(hash(spec_text) % 1000)
    for shape in [(37, 300), (5, 128), (1, 33)]:  # 300 and 33: ragged last groups
        weight = (torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen) * 3).to(dtype)
        weight[0, :7] = 0  # an all-zero span (scale 1 rule) where a group is that small
        qt = rtn(weight, spec, None, {"clip_search": False})
        codes, scale, zero = oracle_codes(weight, *oracle_params(weight, spec), spec)
        assert torch.equal(qt.codes, codes)
        assert torch.equal(qt.scale, scale)
        assert (qt.zero is None) == (zero is None)
        if zero is not None:
            assert torch.equal(qt.zero, zero.squeeze(-1))


@pytest.mark.parametrize("spec_text", ["w4g32nf", "w3g128nf", "w4g128"])
def test_searched_and_grid_paths_keep_their_codes(spec_text, monkeypatch):
    """The clip search and the grid formats still reach the codes through quantize_with_params."""
    monkeypatch.setattr(rtn_module, "CODE_CHUNK", 500)
    spec = QuantSpec.parse(spec_text)
    weight = torch.randn(19, 200, generator=torch.Generator().manual_seed(3))
    qt = rtn(weight, spec, None, {"clip_grid": 4})
    grid = rtn_module.grid_for(weight, spec, None)
    groups = to_groups(weight, spec)
    if grid is not None:
        scale, zero = rtn_module.fit_grid_scales(groups, grid, rtn_module.group_mask(spec, 200), None, 4), None
    else:
        scale, zero = rtn_module.fit_group_ranges(groups, spec, rtn_module.group_mask(spec, 200), None, 4)
    codes, scale16, _ = oracle_codes(weight, scale, zero, spec, grid)
    assert torch.equal(qt.codes, codes) and torch.equal(qt.scale, scale16)
