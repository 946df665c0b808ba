"""The per-layer reports' output errors with bf16 products (``layer_errors_by_rows(products="bf16")``,
the pipeline's default ``QuantizePlan.report_dtype``) against a float64 oracle: the relative output
errors ``tr(E H E^T) / tr(W H W^T)`` of GPTQ's and RTN's codes on random ragged layers whose inputs
are correlated and have outlier channels (where GPTQ's error hides in H's small directions, so the
quadratic form cancels most), and the fp32 path, which must stay exact to float32 rounding."""

from __future__ import annotations

import pytest
import torch

from bitsmith.methods import LayerStats, get_method
from bitsmith.methods.gptq import layer_errors_by_rows
from bitsmith.methods.parallel import bf16_fpmath
from bitsmith.pipeline import stages
from bitsmith.spec import QuantSpec

BF16_TOLERANCE = 1e-3  # relative, per figure (measured at most 1.6e-4 on these layers)
FP32_TOLERANCE = 2e-5


def _layer(out: int, inp: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out, inp, generator=g) * 0.02).bfloat16().float()  # bf16 values, as the models' weights
    mix = torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g) / inp ** 0.5  # correlated channels
    x = (torch.randn(4 * inp, inp, generator=g) * (torch.rand(inp, generator=g) + 0.05)) @ mix
    x[:, torch.randperm(inp, generator=g)[:4]] *= 30  # outlier channels
    return w, x.T @ x


def _oracle(w: torch.Tensor, approx: list[torch.Tensor], h: torch.Tensor) -> list[float]:
    h64, w64 = h.double(), w.double()
    energy = torch.einsum("ri,ij,rj->", w64, h64, w64)
    return [(torch.einsum("ri,ij,rj->", e, h64, e) / energy).item() for e in (w64 - a.double() for a in approx)]


@pytest.mark.parametrize("out, inp", [(300, 600), (77, 1100), (520, 130)])  # panels, ragged rows and panels
def test_bf16_report_products_hold_to_float64(out: int, inp: int) -> None:
    w, h = _layer(out, inp, seed=out + inp)
    spec = QuantSpec.parse("w4g64")
    qt = get_method("gptq")(w, spec, LayerStats(hessian=h.clone(), importance=h.diagonal() / len(h), tokens=4 * inp))
    approx = [qt.weight(), stages.rtn_dequantized(w, spec)]
    oracle = _oracle(w, approx, h)
    assert oracle[0] < 0.8 * oracle[1]  # GPTQ's error is the H-shaped one
    rows = lambda sl: [a[sl] for a in approx]  # noqa: E731
    for products, tolerance in (("bf16", BF16_TOLERANCE), ("fp32", FP32_TOLERANCE)):
        got = layer_errors_by_rows(w, rows, 2, h, rows=64, chunk_rows=128, products=products)
        for g, o in zip(got, oracle):
            assert abs(g - o) <= tolerance * o, (products, g, o)
    with bf16_fpmath() as on:  # where the mode exists, the bf16 figures are not the fp32 ones
        pass
    fp32 = layer_errors_by_rows(w, rows, 2, h, rows=64, chunk_rows=128)
    assert not on or layer_errors_by_rows(w, rows, 2, h, rows=64, chunk_rows=128, products="bf16") != fp32


def test_outlier_rows_of_the_hessian_are_not_rounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where H is bf16-exact but on its largest-diagonal rows and columns, and the weights and errors
    are bf16 values, the bf16 products are exact but there; those channels' terms are taken in float32,
    so the figures equal the fp32 path's to float32 rounding (and with no such channels they do not)."""
    from bitsmith.methods import gptq as gptq_module

    g = torch.Generator().manual_seed(3)
    n, out = 700, 90
    x = torch.randn(2 * n, n, generator=g) * (torch.rand(n, generator=g) + 0.1)
    h = (x.T @ x).bfloat16().float()
    h = (h + h.T) / 2  # symmetric, still bf16 values
    top = torch.randperm(n, generator=g)[: gptq_module.OUTLIER_CHANNELS // 2]
    bump = torch.zeros(n, n)
    bump[top] = torch.rand(len(top), n, generator=g) * 7e3 + 1e5 / 3  # not bf16 values
    h = h + bump + bump.T
    h[top, top] += 1e6
    w = (torch.randn(out, n, generator=g) * 0.02).bfloat16().float()
    sign = torch.randint(0, 2, (out, n), generator=g) * 2 - 1
    e = (sign * (torch.rand(out, n, generator=g) * 4e-4 + 1e-4)).bfloat16().float()  # w - e is exact
    approx = [w - e]
    assert torch.equal(w - approx[0], e)
    rows = lambda sl: [a[sl] for a in approx]  # noqa: E731
    exact = layer_errors_by_rows(w, rows, 1, h, rows=32, chunk_rows=64)
    fast = layer_errors_by_rows(w, rows, 1, h, rows=32, chunk_rows=64, products="bf16")
    assert abs(fast[0] - exact[0]) <= 1e-6 * exact[0], (fast, exact)
    with bf16_fpmath() as on:
        pass
    monkeypatch.setattr(gptq_module, "OUTLIER_CHANNELS", 0)
    rounded = layer_errors_by_rows(w, rows, 1, h, rows=32, chunk_rows=64, products="bf16")
    assert not on or abs(rounded[0] - exact[0]) > 1e-5 * exact[0], (rounded, exact)


def test_unknown_products_refused() -> None:
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="products"):
        layer_errors_by_rows(w, lambda sl: [w[sl]], 1, torch.eye(8), products="fp16")


def test_plan_hands_its_report_dtype_to_the_report(monkeypatch: pytest.MonkeyPatch) -> None:
    from bitsmith.methods import gptq as gptq_module
    from bitsmith.pipeline.plan import QuantizePlan

    seen = []
    real = gptq_module.layer_errors_by_rows

    def spy(*args, **kwargs):
        seen.append(kwargs.get("products"))
        return real(*args, **kwargs)

    monkeypatch.setattr(gptq_module, "layer_errors_by_rows", spy)
    w, h = _layer(40, 64, seed=1)
    stats = LayerStats(hessian=h, importance=h.diagonal(), tokens=256)
    for dtype in ("bf16", "fp32"):
        plan = QuantizePlan(spec=QuantSpec.parse("w4g32"), method="gptq", report_dtype=dtype)
        stages.quantize_linear("l", w, stats, get_method("gptq"), plan)
        stages.quantize_stage(["a", "b"], [w, w.clone()], stats, get_method("gptq"), plan)
    assert seen == ["bf16"] * 3 + ["fp32"] * 3
    assert QuantizePlan(spec=QuantSpec.parse("w4"), method="gptq").report_dtype == "bf16"
    with pytest.raises(ValueError, match="report_dtype"):
        QuantizePlan(spec=QuantSpec.parse("w4"), method="gptq", report_dtype="fp16")
