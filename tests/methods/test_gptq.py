import logging
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bitsmith.methods import LayerStats, get_method
from bitsmith.methods.gptq import gptq, inverse_cholesky, layer_error
from bitsmith.methods.triangular import lower_inverse
from bitsmith.spec import QuantSpec


def _calib(out: int = 64, inp: int = 256, tokens: int = 1024, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [out, in] and inputs X [tokens, in] with correlated channels (Z @ A), uneven channel
    scales and a few outlier channels, as LLM activations have."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=gen) / inp**0.5
    x = (torch.randn(tokens, inp, generator=gen) @ mix) * torch.exp(0.7 * torch.randn(inp, generator=gen))
    x[:, torch.randperm(inp, generator=gen)[:4]] *= 15
    return torch.randn(out, inp, generator=gen) * 0.02, x


def _stats(x: torch.Tensor) -> LayerStats:
    return LayerStats(hessian=x.T @ x, importance=x.pow(2).mean(0), tokens=x.shape[0])


@pytest.mark.parametrize("text", ["w4g32", "w3g64", "w4g128", "w4g32nf"])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_output_error_below_rtn(text: str, act_order: bool) -> None:
    w, x = _calib(seed=1)
    stats, spec = _stats(x), QuantSpec.parse(text)
    rtn = get_method("rtn")(w, spec, stats, {}).dequantize()  # clip search weighted by importance
    qt = get_method("gptq")(w, spec, stats, {"act_order": act_order})
    assert qt.scale.shape == (64, spec.groups_per_row(256))
    err_rtn, err_gptq = layer_error(w, rtn, stats.hessian), layer_error(w, qt.dequantize(), stats.hessian)
    assert err_gptq < 0.7 * err_rtn, (err_gptq, err_rtn)


def test_act_order_keeps_stored_order_groups() -> None:
    """With a diagonal Hessian there is nothing to compensate, so GPTQ with act-order must give RTN's
    codes and parameters exactly: any leftover permutation or misplaced group would show."""
    w, _ = _calib(out=32, inp=200, seed=2)  # 200 inputs: a short last group at g128
    diag = torch.rand(200, generator=torch.Generator().manual_seed(3)) * 10 + 0.1
    for text in ["w4g128", "w3g32", "w4g64s", "w3g64nf"]:
        spec = QuantSpec.parse(text)
        qt = get_method("gptq")(w, spec, LayerStats(hessian=torch.diag(diag)), {"act_order": True})
        ref = get_method("rtn")(w, spec, LayerStats(importance=diag), {})
        assert torch.equal(qt.codes, ref.codes), text
        assert torch.equal(qt.scale, ref.scale), text
        assert (qt.zero is None) == (ref.zero is None) and (qt.zero is None or torch.equal(qt.zero, ref.zero))


def test_act_order_helps_with_uneven_channels() -> None:
    w, x = _calib(seed=4)
    stats, spec = _stats(x), QuantSpec.parse("w3g64")
    gptq = get_method("gptq")
    errs = [layer_error(w, gptq(w, spec, stats, {"act_order": a}).dequantize(), stats.hessian) for a in (True, False)]
    assert errs[0] < errs[1], errs


def test_dead_inputs_and_short_groups() -> None:
    w, x = _calib(inp=200, seed=5)
    x[:, [0, 7, 150, 199]] = 0.0  # channels never active in calibration
    stats = _stats(x)
    for text in ["w4g128", "w2g64", "w4g32fit"]:
        spec = QuantSpec.parse(text)
        for act_order in (True, False):
            out = get_method("gptq")(w, spec, stats, {"act_order": act_order}).dequantize()
            assert torch.isfinite(out).all()
            rtn = get_method("rtn")(w, spec, stats, {}).dequantize()
            assert layer_error(w, out, stats.hessian) < layer_error(w, rtn, stats.hessian)


def test_hessian_scale_does_not_matter() -> None:
    w, x = _calib(out=32, inp=128, seed=6)
    spec = QuantSpec.parse("w4g32")
    total = get_method("gptq")(w, spec, LayerStats(hessian=x.T @ x), {})
    mean = get_method("gptq")(w, spec, LayerStats(hessian=x.T @ x / x.shape[0]), {})
    assert (total.codes == mean.codes).float().mean() > 0.99


def test_gptq_needs_a_hessian() -> None:
    w = torch.randn(8, 64)
    for stats in (None, LayerStats(importance=torch.ones(64))):
        with pytest.raises(ValueError, match="gptq needs calibration data; pass --calib or use rtn/hqq"):
            get_method("gptq")(w, QuantSpec.parse("w4g32"), stats, {})
    with pytest.raises(ValueError, match="does not match"):
        get_method("gptq")(w, QuantSpec.parse("w4g32"), LayerStats(hessian=torch.eye(32)), {})
    with pytest.raises(ValueError, match="does not know option"):
        get_method("gptq")(w, QuantSpec.parse("w4g32"), LayerStats(hessian=torch.eye(64)), {"actorder": True})


def test_indefinite_hessian_retries_with_more_damping(caplog: pytest.LogCaptureFixture) -> None:
    h = torch.eye(64)
    h[0, 1] = h[1, 0] = 2.0  # eigenvalue -1: needs damping of more than 1x the mean diagonal
    with caplog.at_level(logging.WARNING, logger="bitsmith.methods.gptq"):
        upper = inverse_cholesky(h, 0.01)
    assert "retrying" in caplog.text
    assert torch.isfinite(upper).all() and torch.equal(upper, upper.triu())
    h[0, 1] = h[1, 0] = 1e4  # beyond every retry (damping up to 100x the mean diagonal)
    with pytest.raises(ValueError, match="not positive definite"):
        inverse_cholesky(h, 0.01)


def test_a_failed_attempt_frees_its_working_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    # each retry makes a new n x n working copy; the failed one must be gone by then (else three n x n
    # matrices at once: the Hessian and two copies, 321 MB each on an 8960-wide layer)
    from bitsmith.methods import gptq as gptq_module

    copies, real = [], gptq_module._permuted

    def tracked(h: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        assert all(ref() is None for ref in copies), "a failed attempt's working copy is still referenced"
        out = real(h, order)
        copies.append(weakref.ref(out))
        return out

    monkeypatch.setattr(gptq_module, "_permuted", tracked)
    for n in (64, 2100):  # both forms of _permuted (up to SINGLE_THREAD_WIDTH rows, and wider)
        copies.clear()
        h = torch.eye(n)
        h[0, 1] = h[1, 0] = 2.0  # indefinite: the first attempts fail
        upper = inverse_cholesky(h, 0.01)
        assert len(copies) >= 2 and torch.isfinite(upper).all()
        h[0, 1] = h[1, 0] = 1e4  # every attempt fails
        copies.clear()
        with pytest.raises(ValueError, match="not positive definite"):
            inverse_cholesky(h, 0.01)
        assert len(copies) == gptq_module.DAMP_RETRIES + 1


def test_inverse_cholesky_factor() -> None:
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(7)) @ torch.diag(torch.linspace(0.5, 2, 64))
    h = x.T @ x
    upper = inverse_cholesky(h, 0.01)  # upper triangular, (H + λI)^-1 = U^T U
    damped = h + torch.eye(64) * 0.01 * h.diagonal().mean()
    assert torch.equal(upper, upper.triu()) and (upper.diagonal() > 0).all()
    assert torch.allclose(upper.T @ upper @ damped, torch.eye(64), atol=1e-4)
    lower = torch.linalg.cholesky(damped[:61, :61].double())  # odd sizes through the recursion
    assert torch.allclose(lower_inverse(lower, leaf=8) @ lower, torch.eye(61, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("n, leaf", [(61, 8), (300, 16), (777, 64)])  # ragged halves at every level
def test_lower_inverse_reads_only_the_lower_triangle(n: int, leaf: int) -> None:
    """The blocks' products skip the triangles' zero halves: whatever lies above the diagonal on input
    changes nothing (the leaves are solved from the lower triangle alone and the products read no
    other entry above it), and the inverse matches a float64 triangular solve on ragged sizes."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2 * n, n, generator=g, dtype=torch.float64)
    lower = torch.linalg.cholesky(x.T @ x / n + torch.eye(n, dtype=torch.float64))
    dirty = lower + torch.randn(n, n, generator=g, dtype=torch.float64).triu(1) * 1e3
    oracle = torch.linalg.solve_triangular(lower, torch.eye(n, dtype=torch.float64), upper=False)
    assert torch.allclose(lower_inverse(dirty, leaf=leaf).tril(), oracle, atol=1e-12, rtol=1e-10)
    single = lower.float()
    inverse = lower_inverse(single, leaf=leaf).tril().double()
    assert ((inverse - oracle).abs().max() / oracle.abs().max()).item() < 1e-5


def test_layer_error_is_output_error() -> None:
    w, x = _calib(out=16, inp=64, tokens=128, seed=8)
    approx = w + 0.001 * torch.randn(16, 64)
    direct = (x @ (w - approx).T).double().pow(2).sum() / (x @ w.T).double().pow(2).sum()
    assert layer_error(w, approx, x.T @ x) == pytest.approx(direct.item(), rel=1e-3)
    assert layer_error(w, w, x.T @ x) == 0.0


@pytest.mark.parametrize("text", ["w4g32", "w3g64", "w4g32nf"])
def test_gptq_many_equals_one_by_one(text: str) -> None:
    """q/k/v in one walk over stacked rows == each layer alone (rows are independent)."""
    from bitsmith.methods.gptq import gptq_many

    _, x = _calib(64, 256, 1024, seed=3)
    stats = _stats(x)
    g = torch.Generator().manual_seed(4)
    weights = [torch.randn(n, 256, generator=g) * 0.02 for n in (64, 16, 16)]
    spec = QuantSpec.parse(text)
    many = gptq_many(weights, spec, stats)
    for w, qt in zip(weights, many):
        one = gptq(w, spec, stats)
        torch.testing.assert_close(qt.dequantize(), one.dequantize(), rtol=0, atol=1e-6)
        assert (qt.codes != one.codes).float().mean() < 1e-3  # float ties aside, the same codes


def test_inverse_cholesky_in_visit_order_and_in_place_helpers() -> None:
    """Passing the visit order equals permuting the Hessian first (bit for bit); the in-place
    block inverse and flip equal their out-of-place forms, odd sizes included."""
    from bitsmith.methods.triangular import flip_both_, lower_inverse_

    g = torch.Generator().manual_seed(7)
    for n in (301, 300):
        x = torch.randn(4 * n, n, generator=g)
        h = x.T @ x
        perm = torch.randperm(n, generator=g)
        assert torch.equal(inverse_cholesky(h, 0.01, perm), inverse_cholesky(h[perm][:, perm], 0.01))
        m = torch.randn(n, n, generator=g)
        assert torch.equal(flip_both_(m.clone()), m.flip(0, 1))
        lower = torch.linalg.cholesky(h.double() / n + torch.eye(n, dtype=torch.float64))
        inv = lower_inverse_(lower.clone(), leaf=16)
        assert torch.allclose(inv @ lower, torch.eye(n, dtype=torch.float64), atol=1e-10)
        assert torch.equal(inv, lower_inverse(lower, leaf=16))


@pytest.mark.parametrize("width", [0, 1 << 20])  # the row-by-row forms of wide layers, the whole-matrix ones
def test_flip_and_permutation_forms_are_the_same_bits(monkeypatch, width) -> None:
    """flip_both_ and the visit-order copy take whole-matrix forms up to FLIP_COPY_ROWS / SINGLE_THREAD_WIDTH rows and
    memory-saving ones beyond: both give the same factor, bit for bit, odd sizes included."""
    from bitsmith.methods import gptq as gptq_module
    from bitsmith.methods import triangular

    g = torch.Generator().manual_seed(11)
    for n in (97, 96):
        x = torch.randn(3 * n, n, generator=g)
        h, perm, m = x.T @ x, torch.randperm(n, generator=g), torch.randn(n, n, generator=g)
        monkeypatch.setattr(gptq_module, "SINGLE_THREAD_WIDTH", width)
        monkeypatch.setattr(gptq_module, "PERMUTE_ROWS", 10)  # the wide form's column slices: 10 rows, a ragged last one
        monkeypatch.setattr(triangular, "FLIP_COPY_ROWS", width)
        assert torch.equal(triangular.flip_both_(m.clone()), m.flip(0, 1))
        assert torch.equal(gptq_module._permuted(h, perm), h[perm][:, perm])
        assert torch.equal(inverse_cholesky(h, 0.01, perm), inverse_cholesky(h[perm][:, perm], 0.01))


def _gptq_oracle(w: torch.Tensor, hessian: torch.Tensor, qt, perm: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Slow GPTQ straight from the OBS equations (paper eq. 2-3), float64: an explicit inverse
    Hessian, one column at a time in the visit order ``perm``, the inverse shrunk by Gaussian
    elimination after each column (no Cholesky factor, no lazy batches). Group parameters are
    taken from ``qt`` (static groups), so this checks the walk. Returns dequantized weights."""
    spec = qt.spec
    h = hessian.double()[perm][:, perm].clone()
    diag = h.diagonal()
    diag[diag <= 0] = 1.0
    diag.add_(damp * diag.mean())
    hinv = torch.linalg.inv(h)
    width = spec.group_width(w.shape[1])
    scale = qt.scale.double()
    zero = None if qt.zero is None else qt.zero.double()
    grid = None if qt.grid is None else qt.grid.double()
    work = w.double()[:, perm].clone()
    out = torch.empty_like(work)
    for j in range(work.shape[1]):
        g = int(perm[j]) // width
        s = scale[:, g]
        if grid is not None:
            q = grid[(work[:, j:j + 1] / s[:, None] - grid).abs().argmin(dim=1)] * s
        else:
            z = zero[:, g] if zero is not None else torch.full_like(s, (2 ** spec.bits - 1) / 2)
            q = (torch.clamp(torch.round(work[:, j] / s + z), 0, 2 ** spec.bits - 1) - z) * s
        out[:, j] = q
        err = (work[:, j] - q) / hinv[j, j]
        work[:, j + 1:] -= err[:, None] * hinv[j, j + 1:][None, :]
        hinv[j + 1:, j + 1:] -= torch.outer(hinv[j + 1:, j], hinv[j, j + 1:]) / hinv[j, j]
    result = torch.empty_like(out)
    result[:, perm] = out
    return result


@pytest.mark.parametrize("text,act_order", [("w4g32", True), ("w3g64", True), ("w4g32nf", True), ("w4g64", False)])
def test_gptq_matches_slow_oracle(text: str, act_order: bool) -> None:
    """The fast walk (Cholesky rows, lazy batch updates, per-group lookups, uint8 codes) against
    the textbook OBS loop on fresh random problems (static groups, so both use the same grids)."""
    for seed in (11, 12):
        w, x = _calib(out=24, inp=192, tokens=768, seed=seed)
        stats, spec = _stats(x), QuantSpec.parse(text)
        qt = gptq(w, spec, stats, {"act_order": act_order, "static_groups": True, "block_size": 32})
        imp = stats.hessian.diagonal()
        perm = torch.argsort(imp, descending=True, stable=True) if act_order else torch.arange(192)
        slow = _gptq_oracle(w, stats.hessian, qt, perm)
        fast = qt.dequantize().double()
        assert (fast == slow.float().double()).float().mean() > 0.99  # float ties aside, the same values
        assert layer_error(w, fast.float(), stats.hessian) == pytest.approx(layer_error(w, slow.float(), stats.hessian), rel=0.02)


@pytest.mark.parametrize("text", ["w8", "w4g32", "w3g64s", "w4g32nf"])
@pytest.mark.parametrize("act_order", [True, False])
def test_walk_in_row_slices_equals_the_whole_walk(text: str, act_order: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer larger than WALK_WEIGHTS walks a slice of rows at a time (the head of a 152k vocabulary:
    no second whole copy of the weight). Oracle: the same layer walked whole."""
    from bitsmith.methods import gptq as gptq_module

    _, x = _calib(64, 256, 1024, seed=8)
    stats = _stats(x)
    w = torch.randn(1500, 256, generator=torch.Generator().manual_seed(9)) * 0.02  # ragged last slice
    spec, options = QuantSpec.parse(text), {"act_order": act_order}
    whole = gptq(w, spec, stats, options)
    monkeypatch.setattr(gptq_module, "WALK_WEIGHTS", 512 * 256)  # slices of 512 rows
    walked: list[int] = []
    real_walk = gptq_module.gptq_walk
    monkeypatch.setattr(gptq_module, "gptq_walk", lambda w_t, *a: walked.append(w_t.shape[1]) or real_walk(w_t, *a))
    sliced = gptq(w, spec, stats, options)
    sliced_walk = act_order or spec.group_size is None  # dynamic groups (no act-order) walk whole
    assert walked == ([512, 512, 476] if sliced_walk else [1500])
    assert torch.equal(sliced.codes, whole.codes) and torch.equal(sliced.scale, whole.scale)
    assert (sliced.zero is None) == (whole.zero is None) and (sliced.zero is None or torch.equal(sliced.zero, whole.zero))


@pytest.mark.parametrize("text", ["w8", "w4g32", "w3g64s", "w4g32nf", "w4g32fit"])
@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_weight_gives_what_its_float32_copy_gives(text: str, act_order: bool, dtype: torch.dtype,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16/fp16 weight (the head, kept in its source dtype) is made float32 a slice at a time: the same
    codes, scales and zeros as GPTQ on its float32 copy, through sliced walks and chunked range searches;
    and where the walk goes by slices of rows, no float32 tensor of the weight's size is ever made."""
    from bitsmith.methods import gptq as gptq_module

    _, x = _calib(64, 256, 1024, seed=10)
    stats = _stats(x)
    w = (torch.randn(1500, 256, generator=torch.Generator().manual_seed(11)) * 0.02).to(dtype)
    spec, options = QuantSpec.parse(text), {"act_order": act_order}
    want = gptq(w.float(), spec, stats, options)
    monkeypatch.setattr(gptq_module, "WALK_WEIGHTS", 512 * 256)  # slices of 512 rows
    monkeypatch.setattr(gptq_module, "HALF_SEARCH_ROWS", 700)  # three range-search calls, the last ragged
    with WholeFloatCopies(w.numel()) as copies:
        got = gptq(w, spec, stats, options)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scale, want.scale)
    assert (got.zero is None) == (want.zero is None) and (got.zero is None or torch.equal(got.zero, want.zero))
    assert (got.grid is None) == (want.grid is None) and (got.grid is None or torch.equal(got.grid, want.grid))
    sliced = (act_order or spec.group_size is None) and spec.grid != "fit"  # dynamic groups walk whole; a fit grid is fitted whole
    assert (copies.seen == []) == sliced, copies.seen


class WholeFloatCopies(TorchDispatchMode):
    """Notes every operation whose output is a float32 tensor of at least ``numel`` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= self.numel:
                self.seen.append(str(func))
        return out


def test_only_gptq_takes_half_weights() -> None:
    """The head goes to a method in bf16 only when it says it reads such weights slice by slice."""
    from bitsmith.methods import METHODS

    assert METHODS["gptq"].half_weights
    assert not any(info.half_weights for name, info in METHODS.items() if name != "gptq")
