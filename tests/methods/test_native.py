"""The native inner loops of the calibrated methods (methods.native, kernels/csrc/gptq.cpp) against
their torch oracles on fresh random inputs: the range search against rtn.fit_group_ranges, the GPTQ
block walk against the torch column loop and against the slow OBS oracle of test_gptq."""

from types import SimpleNamespace

import pytest
import torch

from bitsmith.methods import LayerStats, native
from bitsmith.methods.gptq import gptq, layer_error
from bitsmith.methods.rtn import channel_weights, fit_group_ranges
from bitsmith.primitives import dequantize_codes, group_mask, quantize_codes, to_groups
from bitsmith.spec import QuantSpec
from tests.methods.test_gptq import _calib, _gptq_oracle, _stats

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C++ compiler: the torch paths run instead")


def _group_errors(groups, scale, zero, spec, mask, weights) -> torch.Tensor:
    """The search's objective in float64 for given parameters: [out, G]."""
    recon = dequantize_codes(quantize_codes(groups, scale, zero, spec.qmax), scale, zero)
    w = torch.ones_like(groups[:1]) if weights is None else weights
    if mask is not None:
        w = w * mask
    return ((recon.double() - groups.double()).pow(2) * w.double()).sum(-1)


@pytest.mark.parametrize("text,inp", [("w4g128", 576), ("w3g64s", 200), ("w2g32", 96), ("w8", 300), ("w4g128", 1000)])
@pytest.mark.parametrize("weighted", [False, True])
def test_range_search_matches_torch(text: str, inp: int, weighted: bool) -> None:
    """Same (scale, zero) as the torch search; where float summation order breaks a near-tie the
    other way, the native choice's error is within 1e-5 of the best (so never a worse range)."""
    g = torch.Generator().manual_seed(inp + weighted)
    spec = QuantSpec.parse(text)
    w = torch.randn(97, inp, generator=g) * torch.exp(torch.randn(inp, generator=g))
    w[3] = 0.0  # an all-zero row: scale 1
    stats = LayerStats(importance=torch.rand(inp, generator=g) ** 2) if weighted else None
    groups, mask, weights = to_groups(w, spec), group_mask(spec, inp), channel_weights(stats, spec, inp)
    s0, z0 = fit_group_ranges(groups, spec, mask, weights, 20)
    s1, z1 = native.range_search(groups, spec, mask, weights, 20, inp)
    same = (s0 == s1) & (z0 == z1)
    assert same.float().mean() > 0.99
    e0 = _group_errors(groups, s0, z0, spec, mask, weights)
    e1 = _group_errors(groups, s1, z1, spec, mask, weights)
    assert torch.all(e1 <= e0 * (1 + 1e-5) + 1e-12)
    assert native.range_search(groups, QuantSpec.parse("w4g32nf"), mask, weights, 20, inp) is None
    assert native.range_search(groups, spec, mask, weights, 0, inp) is None  # min/max needs no search


def _without_native(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setattr(native, "library", lambda: None)
        return fn()


@pytest.mark.parametrize("text,act_order", [("w4g32", True), ("w3g64s", True), ("w4g128", True), ("w4g64", False)])
def test_native_walk_matches_the_torch_walk_and_the_oracle(monkeypatch, text: str, act_order: bool) -> None:
    """GPTQ with the native block walk and range search against the torch path (codes and scales
    equal up to float ties) and against the slow OBS oracle; blocks of 32 so several lazy updates run."""
    for seed in (21, 22):
        w, x = _calib(out=300, inp=256, tokens=1024, seed=seed)  # 300 rows: two row chunks
        stats, spec = _stats(x), QuantSpec.parse(text)
        opts = {"act_order": act_order, "static_groups": True, "block_size": 32}
        fast = gptq(w, spec, stats, opts)
        slow = _without_native(monkeypatch, lambda: gptq(w, spec, stats, opts))
        assert (fast.codes == slow.codes).float().mean() > 0.995
        assert (fast.scale == slow.scale).float().mean() > 0.99
        perm = torch.argsort(stats.hessian.diagonal(), descending=True, stable=True) if act_order else torch.arange(256)
        # the oracle reads qt.zero; symmetric codes store none, their zero is the fixed midpoint
        params = SimpleNamespace(spec=spec, scale=fast.scale, zero=fast.zero_or_mid(), grid=None)
        oracle = _gptq_oracle(w, stats.hessian, params, perm)
        assert (fast.dequantize().double() == oracle.float().double()).float().mean() > 0.99
        err_fast, err_slow = layer_error(w, fast.dequantize(), stats.hessian), layer_error(w, slow.dequantize(), stats.hessian)
        assert err_fast == pytest.approx(err_slow, rel=0.01)


def test_native_block_is_the_column_loop() -> None:
    """One block call on random data against a direct float64 column loop (right-looking updates)."""
    g = torch.Generator().manual_seed(5)
    b, out, groups = 24, 70, 3
    w = torch.randn(b, out, generator=g)
    u = torch.triu(torch.randn(b, b, generator=g) * 0.1) + torch.eye(b) * 2
    scale = torch.rand(groups, out, generator=g) * 0.3 + 0.05
    zero = torch.randint(0, 16, (groups, out), generator=g).float()
    grp = torch.randint(0, groups, (b,), generator=g)
    codes = torch.empty(b, out, dtype=torch.uint8)
    work = w.clone()
    errs = native.gptq_block(native.library(), work, u, scale, zero, grp, 15, codes)
    ref, ref_codes, ref_errs = w.double().clone(), torch.empty(b, out), torch.empty(b, out, dtype=torch.float64)
    for j in range(b):
        s, z = scale[grp[j]].double(), zero[grp[j]].double()
        c = torch.clamp(torch.round(ref[j] / s + z), 0, 15)
        ref_codes[j], ref_errs[j] = c, (ref[j] - (c - z) * s) / u[j, j].double()
        ref[j + 1:] -= ref_errs[j][None, :] * u[j, j + 1:].double()[:, None]
    assert (codes.float() == ref_codes).float().mean() > 0.99
    close = codes.float() == ref_codes
    torch.testing.assert_close(errs.double()[close.all(0).expand(b, -1)].float(),
                               ref_errs[close.all(0).expand(b, -1)].float(), rtol=1e-4, atol=1e-5)
