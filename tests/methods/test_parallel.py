import threading

import pytest
import torch

from bitsmith.methods import LayerStats, get_method
from bitsmith.methods import gptq as gptq_module
from bitsmith.methods import hqq as hqq_module
from bitsmith.methods.gptq import layer_error, layer_errors
from bitsmith.methods.parallel import intra_op_threads, map_chunks, row_chunks
from bitsmith.methods.rtn import fit_group_ranges, fit_grid_scales, grid_for
from bitsmith.primitives import group_mask, to_groups
from bitsmith.methods.rtn import channel_weights
from bitsmith.spec import QuantSpec


def _weight(out: int, inp: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    w[:, torch.randperm(inp, generator=g)[:3]] *= 10  # outlier channels, as LLM weights have
    return w


def test_map_chunks_keeps_order_and_restores_threads() -> None:
    before = torch.get_num_threads()
    seen = []

    def fn(i: int) -> int:
        seen.append((torch.get_num_threads(), threading.get_ident()))
        return i * i

    assert map_chunks(fn, list(range(7)), workers=2) == [i * i for i in range(7)]
    assert all(n == 1 for n, _ in seen)  # one intra-op thread inside
    assert torch.get_num_threads() == before
    with intra_op_threads(1) as was:
        assert was == before and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="boom"):  # an error in a chunk reaches the caller, threads restored
        map_chunks(lambda i: (_ for _ in ()).throw(RuntimeError("boom")), [1, 2])
    assert torch.get_num_threads() == before
    assert row_chunks(10, 4, 12) == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10)]
    assert row_chunks(3, 100, 10) == [slice(0, 1), slice(1, 2), slice(2, 3)]


@pytest.mark.parametrize("text", ["w4g64", "w3g32", "w4g64s", "w3g64nf", "w4g128"])
def test_hqq_chunked_equals_one_pass(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle: the same chunks in a plain loop on the caller's thread, with torch's intra-op
    threads (HQQ's early stop is decided per chunk, so the chunking is part of the method and
    stays the same); the fast path (chunks over threads, one intra-op thread each) must give the
    same codes, scales and zeros."""
    w, spec = _weight(96, 320, seed=sum(map(ord, text))), QuantSpec.parse(text)
    importance = torch.rand(320, generator=torch.Generator().manual_seed(1)) + 0.1
    stats = LayerStats(importance=importance)
    monkeypatch.setattr(hqq_module, "ROW_CHUNK_WEIGHTS", 2000)  # many chunks
    fast = hqq_module.hqq(w, spec, stats, {})
    monkeypatch.setattr(hqq_module, "map_chunks", lambda fn, items, workers=None: [fn(i) for i in items])
    slow = hqq_module.hqq(w, spec, stats, {})
    assert torch.equal(fast.codes, slow.codes) and torch.equal(fast.scale, slow.scale)
    assert (fast.zero is None) == (slow.zero is None)
    assert fast.zero is None or torch.equal(fast.zero, slow.zero)


@pytest.mark.parametrize("text", ["w4g64", "w3g32s", "w4g128", "w3g64nf"])
def test_gptq_group_params_equal_the_whole_tensor_search(text: str) -> None:
    """GPTQ's chunked, threaded group-parameter search against RTN's search on the whole tensor."""
    w, spec = _weight(200, 352, seed=7), QuantSpec.parse(text)
    importance = torch.rand(352, generator=torch.Generator().manual_seed(2))
    grid = grid_for(w, spec, None)
    scale, zero = gptq_module._group_params(w, spec, importance, grid, 20)  # noqa: SLF001 (the unit under test)
    groups, mask = to_groups(w, spec), group_mask(spec, 352)
    weights = channel_weights(LayerStats(importance=importance), spec, 352)
    if grid is not None:
        assert torch.equal(scale, fit_grid_scales(groups, grid, mask, weights, 20).half().float()) and zero is None
        return
    s, z = fit_group_ranges(groups, spec, mask, weights, 20)
    assert torch.equal(scale, s.half().float())
    assert torch.equal(zero, z.half().float() if spec.has_zero else z)


@pytest.mark.parametrize("width", [48, 600])  # one block, and the upper-triangle panels
def test_layer_errors_match_the_trace_formula(width: int) -> None:
    """Oracle: tr((W - Ŵ) H (W - Ŵ)^T) / tr(W H W^T) in float64, one approximation at a time."""
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(70, width, generator=g), torch.randn(300, width, generator=g) * torch.rand(width, generator=g)
    h = x.T @ x
    approx = [w + 0.01 * torch.randn(70, width, generator=g), w.round(), torch.zeros_like(w)]

    def trace(d: torch.Tensor) -> float:
        return float(torch.trace(d.double() @ h.double() @ d.double().T))

    fast = layer_errors(w, approx, h, rows=16)
    for a, e in zip(approx, fast):
        assert e == pytest.approx(trace(w - a) / trace(w), rel=1e-5)
        assert e == pytest.approx(layer_error(w, a, h), rel=1e-6)
    absolute = layer_errors(w, approx[:1], h, relative=False, rows=32)
    assert absolute[0] == pytest.approx(trace(w - approx[0]), rel=1e-5)


@pytest.mark.parametrize("text", ["w4g64", "w3g128", "w4g32nf", "w3g32fit"])
def test_report_rtn_equals_rtn(text: str) -> None:
    from bitsmith.pipeline import stages

    w, spec = _weight(150, 256, seed=3), QuantSpec.parse(text)
    expected = get_method("rtn")(w, spec, None, {}).dequantize()
    old = stages.RTN_CHUNK_WEIGHTS
    try:
        stages.RTN_CHUNK_WEIGHTS = 1000  # several chunks
        assert torch.equal(stages.rtn_dequantized(w, spec), expected)
    finally:
        stages.RTN_CHUNK_WEIGHTS = old
