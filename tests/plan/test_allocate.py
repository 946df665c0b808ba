"""Mixed precision under a budget: the knapsack allocator, the sensitivity estimators, the planner."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch

from bitsmith.plan.allocate import Allocation, AllocationError, Budget, allocate
from bitsmith.spec import QuantSpec
from tests.tiny import make_tiny_model, sample_text, tiny_tokenizer

SPECS = [QuantSpec.parse(s) for s in ("w2g64", "w3g64", "w4g64", "w4g128", "w8")]
TINY_CANDIDATES = [QuantSpec.parse(s) for s in ("w2g64", "w3g64", "w4g64", "w8")]


def _problem(n_layers: int, seed: int) -> tuple[dict, dict]:
    rng = random.Random(seed)
    shapes, costs = {}, {}
    for i in range(n_layers):
        shape = (rng.choice([64, 128, 192]), rng.choice([128, 256, 384]))
        scale = rng.uniform(0.1, 10.0)
        shapes[f"l{i}"] = shape
        costs[f"l{i}"] = {s: scale * 4.0 ** -s.bits * rng.uniform(0.8, 1.2) for s in SPECS}
    return costs, shapes


def _brute_force(costs: dict, shapes: dict, budget: int) -> float:
    names = list(costs)
    best = float("inf")
    for combo in itertools.product(SPECS, repeat=len(names)):
        bits = sum(s.stored_bits(*shapes[n]) for n, s in zip(names, combo))
        if bits <= budget:
            best = min(best, sum(costs[n][s] for n, s in zip(names, combo)))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_allocation_is_optimal_on_small_problems(seed: int) -> None:
    costs, shapes = _problem(4, seed)
    weights = sum(o * i for o, i in shapes.values())
    for bpw in (2.6, 3.5, 4.3, 6.0):
        budget = int(bpw * weights)
        alloc = allocate(costs, shapes, budget)
        exact = sum(s.stored_bits(*shapes[n]) for n, s in alloc.specs.items())
        assert exact == alloc.total_bits <= budget
        assert alloc.predicted_cost == pytest.approx(_brute_force(costs, shapes, budget), rel=1e-9)


@pytest.mark.parametrize("exact_cells", [0, 1 << 24])  # rounded DP + repair, exact DP
def test_never_exceeds_and_uses_the_budget_nearly_fully(exact_cells: int) -> None:
    costs, shapes = _problem(200, seed=7)
    weights = sum(o * i for o, i in shapes.values())
    for bpw in (2.55, 3.0, 3.5, 4.25, 5.1):
        budget = int(bpw * weights)
        alloc = allocate(costs, shapes, budget, units=512, exact_cells=exact_cells)  # coarse: the repair must fill the gap
        assert alloc.total_bits <= budget
        assert alloc.total_bits >= 0.995 * budget, f"{bpw}: only {alloc.bits_per_weight:.3f} bits/weight used"
        assert alloc.bits_per_weight <= bpw


def test_infeasible_budget_names_the_minimum() -> None:
    costs, shapes = _problem(3, seed=1)
    weights = sum(o * i for o, i in shapes.values())
    minimum = sum(QuantSpec.parse("w2g64").stored_bits(*s) for s in shapes.values())
    with pytest.raises(AllocationError, match=f"{minimum / weights:.3f} bits/weight"):
        allocate(costs, shapes, minimum - 1)
    assert allocate(costs, shapes, minimum).total_bits == minimum  # exactly the minimum is feasible


def test_generous_budget_takes_the_cheapest_everywhere() -> None:
    costs, shapes = _problem(5, seed=2)
    alloc = allocate(costs, shapes, 10**9)
    assert set(alloc.specs.values()) == {QuantSpec.parse("w8")}


def test_budget_parsing() -> None:
    assert Budget.parse("3.5bpw").bits_per_weight == 3.5
    assert Budget.parse("900MB").total_bytes == 900_000_000
    assert Budget.parse("1GiB").total_bytes == 2**30
    assert Budget.parse("3.5bpw").layer_bits(1000) == 3500
    assert Budget.parse("1KB").layer_bits(10, fixed_bits=800) == 8000 - 800
    with pytest.raises(ValueError, match="3.5bpw"):
        Budget.parse("lots")


def test_allocation_report_is_plain_json() -> None:
    import json

    costs, shapes = _problem(3, seed=3)
    alloc = allocate(costs, shapes, 4 * sum(o * i for o, i in shapes.values()))
    assert isinstance(alloc, Allocation)
    report = json.loads(json.dumps(alloc.to_report()))
    assert sum(report["counts"].values()) == 3 and report["bits_per_weight"] <= 4


# --- sensitivity on a tiny model --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("alloc") / "tiny")


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    from bitsmith.calib.data import calibration_batches

    return calibration_batches(tiny_tokenizer(), sample_text(3000, seed=1), samples=6, seq_len=128)


def _spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().float()
    rb = torch.tensor(b).argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _uniform_kl(net, layers, spec: QuantSpec, tokens: torch.Tensor) -> float:
    from bitsmith.plan.sensitivity import layer_weight, make_quantizer, summed_kl

    _, quantize = make_quantizer("rtn")
    originals = {n: layer_weight(net, n).data for n in layers}
    with torch.inference_mode():
        refs = [torch.log_softmax(net(input_ids=w[None]).logits[0, :-1], -1) for w in tokens]
        try:
            for n in layers:
                layer_weight(net, n).data = quantize(originals[n], spec)
            kl = sum(float(summed_kl(r, net(input_ids=w[None]).logits[0, :-1])) for r, w in zip(refs, tokens))
        finally:
            for n in layers:
                layer_weight(net, n).data = originals[n]
    return kl / sum(r.shape[0] for r in refs)


def test_fisher_ranks_layers_like_the_measured_oracle(tiny: Path, calib: torch.Tensor) -> None:
    from bitsmith.models import open_source
    from bitsmith.pipeline.common import quantizable_layers
    from bitsmith.plan.sensitivity import estimate_sensitivity, float_model

    source = open_source(tiny)
    layers = quantizable_layers(source.config)
    net = float_model(source, layers)
    fisher = estimate_sensitivity(net, layers, TINY_CANDIDATES, calib, estimator="fisher")
    measured = estimate_sensitivity(net, layers, TINY_CANDIDATES, calib[:3], estimator="measured")
    assert all(not p.requires_grad and p.grad is None for p in net.parameters())  # the model is left as found
    for spec in TINY_CANDIDATES[:3]:
        rho = _spearman([fisher.costs[n][spec] for n in layers], [measured.costs[n][spec] for n in layers])
        assert rho > 0.7, f"{spec}: rank correlation {rho:.2f}"
        actual = _uniform_kl(net, layers, spec, calib[:3])
        predicted = fisher.total(spec)
        assert actual / 2 < predicted < actual * 2, f"{spec}: predicted {predicted:.4g} vs measured {actual:.4g}"


def test_chunked_fisher_equals_one_pass(tiny: Path, calib: torch.Tensor) -> None:
    """Capping the Fisher accumulators splits the layers into passes without changing any cost."""
    from bitsmith.models import open_source
    from bitsmith.pipeline.common import quantizable_layers
    from bitsmith.plan.sensitivity import estimate_sensitivity, fisher_chunks, float_model

    source = open_source(tiny)
    layers = quantizable_layers(source.config)
    net = float_model(source, layers)
    cap = 4 * max(o * i for o, i in layers.values()) * 3  # about three layers per pass
    chunks = fisher_chunks(layers, cap)
    assert len(chunks) > 2 and sorted(sum(chunks, [])) == sorted(layers)  # every layer, once
    assert all(sum(4 * layers[n][0] * layers[n][1] for n in c) <= cap for c in chunks)
    assert chunks[0][-1] == list(layers)[-1]  # the top layers first: their passes stop early
    one = estimate_sensitivity(net, layers, TINY_CANDIDATES, calib[:3], estimator="fisher")
    split = estimate_sensitivity(net, layers, TINY_CANDIDATES, calib[:3], estimator="fisher", fisher_bytes=cap)
    for n in layers:
        for spec in one.costs[n]:
            assert split.costs[n][spec] == pytest.approx(one.costs[n][spec], rel=1e-5, abs=1e-12)
    assert fisher_chunks(layers, 1) == [[n] for n in reversed(layers)]  # below one layer: one layer per pass


def test_plan_and_quantize_under_a_size_budget(tiny: Path, calib: torch.Tensor, tmp_path: Path) -> None:
    """End to end: a byte budget between uniform w2g64 and w8 -> mixed specs, the checkpoint's
    shards fit the budget, the metadata and report carry the per-layer specs."""
    from bitsmith.io.checkpoint import read_info, shard_files
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize
    from bitsmith.plan.sensitivity import plan_allocation, record_allocation

    uniform = {}
    for spec in ("w2g64", "w8"):
        path = quantize(tiny, tmp_path / spec, QuantizePlan(QuantSpec.parse(spec)))
        uniform[spec] = sum(p.stat().st_size for p in shard_files(path))
    budget = Budget(total_bytes=(uniform["w2g64"] + uniform["w8"]) // 2)
    config, alloc = plan_allocation(tiny, QuantizePlan(QuantSpec.parse("w4g64")), budget, TINY_CANDIDATES, calib[:3])
    assert len(set(alloc.specs.values())) > 1
    out = quantize(tiny, tmp_path / "mixed", config)
    record_allocation(out, alloc)
    size = sum(p.stat().st_size for p in shard_files(out))
    assert size <= budget.total_bytes
    assert size >= 0.9 * budget.total_bytes
    info = read_info(out)
    assert info.specs == alloc.specs
    assert info.report["allocation"]["predicted_kl"] == pytest.approx(alloc.predicted_cost)


def test_cli_quantize_with_a_bpw_budget(tiny: Path, tmp_path: Path) -> None:
    from bitsmith.cli import main
    from bitsmith.io.checkpoint import read_info

    out = tmp_path / "cli"
    calib_file = tmp_path / "calib.txt"
    calib_file.write_text(sample_text(2000, seed=3))
    rc = main(["quantize", str(tiny), "--budget", "3.5bpw", "--candidates", "w2g64,w3g64,w4g64,w8", "--out", str(out),
               "--calib", str(calib_file), "--calib-samples", "2", "--calib-len", "64", "--output-spec", "keep"])
    assert rc == 0  # outputs kept: the checkpoint's quantized tensors are exactly the allocated ones
    info = read_info(out)
    alloc = info.report["allocation"]
    assert alloc["bits_per_weight"] <= 3.5 and alloc["budget"] == "3.5bpw"
    assert info.report["bits_per_weight"] == pytest.approx(alloc["bits_per_weight"])
    assert {str(s) for s in info.specs.values()} <= {"w2g64", "w3g64", "w4g64", "w8"}


def test_rounded_dp_is_close_to_the_exact_optimum() -> None:
    costs, shapes = _problem(60, seed=11)
    budget = int(3.3 * sum(o * i for o, i in shapes.values()))
    exact = allocate(costs, shapes, budget)
    rounded = allocate(costs, shapes, budget, units=1024, exact_cells=0)
    assert exact.predicted_cost <= rounded.predicted_cost <= exact.predicted_cost * 1.02
