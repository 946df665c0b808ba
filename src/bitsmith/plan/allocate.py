"""Mixed precision under a budget: choose one quantization spec per layer so that the total
predicted quality cost is smallest while the stored bits stay within a budget.

This is a multiple-choice knapsack (Sinha & Zoltners 1979): layer ``l`` picks option ``k`` with
weight ``b_lk`` (exact stored bits, :meth:`QuantSpec.stored_bits`) and cost ``c_lk`` (predicted KL
increase, :mod:`bitsmith.plan.sensitivity`); minimise ``sum c`` subject to ``sum b <= B``.

Solved exactly over a discretised budget by dynamic programming, then repaired with exact integers:

1. each layer's cheapest option (fewest bits) is the baseline; only the *extra* bits above it are
   discretised: in steps of the gcd of all the extra-bit amounts when that table is small enough
   (then the DP is exact), else into ``units`` steps of ``ceil((B - baseline) / units)`` bits;
2. option weights are rounded **up** to whole units and the capacity **down**, so every selection the
   DP allows fits the real budget (sum of ceilings x unit <= capacity x unit <= B);
3. a greedy pass then spends the bits lost to rounding on the upgrades with the best cost reduction
   per extra bit that still fit exactly, so the budget is used nearly fully.

Pure arithmetic: no model, no I/O. Costs that are equal or noisy are fine; only their sums matter.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from bitsmith.spec import QuantSpec

DEFAULT_UNITS = 8192  # DP steps when the exact table would be too large
EXACT_CELLS = 1 << 24  # layers x steps of the exact DP table (int16 back-pointers: 32 MB)
DEFAULT_CANDIDATES = ("w2g64", "w3g64", "w4g64", "w4g128", "w8")
_BPW_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*bpw\s*$", re.IGNORECASE)


class AllocationError(ValueError):
    """No allocation satisfies the budget; the message names the smallest achievable size."""


@dataclass(frozen=True)
class Budget:
    """A size budget: ``bpw`` bits per quantized weight, or ``bytes`` for the whole checkpoint."""

    bits_per_weight: float | None = None
    total_bytes: int | None = None

    def __post_init__(self) -> None:
        if (self.bits_per_weight is None) == (self.total_bytes is None):
            raise ValueError("a budget is either bits per weight (e.g. 3.5bpw) or a size (e.g. 900MB), not both")
        if self.bits_per_weight is not None and self.bits_per_weight <= 0:
            raise ValueError(f"a bits-per-weight budget must be positive, got {self.bits_per_weight}")
        if self.bits_per_weight is not None and not math.isfinite(self.bits_per_weight):  # e.g. 400 digits of bpw
            raise ValueError(f"a bits-per-weight budget must be a finite number, got {self.bits_per_weight}")
        if self.total_bytes is not None and self.total_bytes <= 0:
            raise ValueError(f"a size budget must be positive, got {self.total_bytes} bytes")

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """``3.5bpw`` (bits per quantized weight) or a size such as ``900MB`` / ``1.2GiB``."""
        match = _BPW_RE.match(text)
        if match:
            return cls(bits_per_weight=float(match.group(1)))
        from bitsmith.plan.fit import parse_size

        try:
            return cls(total_bytes=parse_size(text))
        except ValueError:
            raise ValueError(f"cannot read budget {text!r}; write bits per weight (3.5bpw) or a size (900MB, 1.2GiB)") from None

    def layer_bits(self, weights: int, fixed_bits: int = 0) -> int:
        """The bits the quantized layers may use: ``bpw x weights``, or the size less ``fixed_bits``
        (everything that is not a quantized layer: unquantized tensors, headers)."""
        if self.bits_per_weight is not None:
            return math.floor(self.bits_per_weight * weights)
        return self.total_bytes * 8 - fixed_bits

    def __str__(self) -> str:
        return f"{self.bits_per_weight:g}bpw" if self.bits_per_weight is not None else f"{self.total_bytes}B"


@dataclass(frozen=True)
class Allocation:
    """One spec per layer, with its exact stored bits and predicted cost."""

    specs: dict[str, QuantSpec]
    total_bits: int  # exact, from QuantSpec.stored_bits
    weights: int  # quantized weights
    budget_bits: int
    predicted_cost: float  # sum of the chosen options' costs (predicted mean KL increase, nats)
    fixed_bits: int = 0  # bits outside the quantized layers (size budgets only)
    extra: dict = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / max(self.weights, 1)

    def counts(self) -> dict[str, int]:
        """How many layers got each spec."""
        out: dict[str, int] = {}
        for spec in self.specs.values():
            out[str(spec)] = out.get(str(spec), 0) + 1
        return dict(sorted(out.items()))

    def to_report(self) -> dict:
        return {"bits_per_weight": self.bits_per_weight, "total_bits": self.total_bits, "weights": self.weights,
                "budget_bits": self.budget_bits, "fixed_bits": self.fixed_bits,
                "predicted_kl": self.predicted_cost, "counts": self.counts(),
                "specs": {name: str(spec) for name, spec in self.specs.items()}, **self.extra}


def usable_candidates(name: str, shape: tuple[int, int], candidates: Sequence[QuantSpec]) -> list[QuantSpec]:
    """The candidates a layer of ``shape`` (out, in) can take: a group wider than its row cannot."""
    usable = [s for s in candidates if s.group_size is None or s.group_size <= shape[1]]
    if not usable:
        raise ValueError(f"no candidate spec fits {name} (rows of {shape[1]} weights); "
                         "add a smaller group or a per-channel spec (e.g. w8)")
    return usable


def reachable_bits(shapes: Mapping[str, tuple[int, int]], candidates: Sequence[QuantSpec]) -> tuple[int, int]:
    """(smallest, largest) exact stored bits of the quantized layers over every choice of one usable
    candidate per layer: the range any allocation lands in."""
    low = high = 0
    for name, shape in shapes.items():
        bits = [spec.stored_bits(*shape) for spec in usable_candidates(name, shape, candidates)]
        low, high = low + min(bits), high + max(bits)
    return low, high


def check_budget(budget: Budget, shapes: Mapping[str, tuple[int, int]], candidates: Sequence[QuantSpec],
                 fixed_bits: int = 0, sign_bits: int = 0) -> None:
    """Refuse, before any sensitivity pass, a budget that no allocation can meet: the message gives
    the reachable range in bits per weight and in bytes (``fixed_bits``: what the allocation does not
    choose, unquantized tensors and pinned outputs; ``sign_bits``: a rotating plan's sign bits, stored
    whatever the specs and taken off the top of the budget as the allocation takes them). A budget
    above the range is fine (every layer then gets its best candidate)."""
    if not shapes:
        raise ValueError("no layers to allocate; the model has no quantizable layers")
    weights = sum(o * i for o, i in shapes.values())
    low, high = reachable_bits(shapes, candidates)
    low, high = low + sign_bits, high + sign_bits
    if budget.layer_bits(weights, fixed_bits) >= low:
        return
    to_bytes = lambda bits: math.ceil((bits + fixed_bits) / 8)  # noqa: E731
    signs = f", with {sign_bits / weights:.3f} bits/weight of rotation signs" if sign_bits else ""
    raise AllocationError(
        f"the budget {budget} cannot be met: with candidates {','.join(map(str, candidates))} the "
        f"{len(shapes)} quantized layers take {low / weights:.3f} to {high / weights:.3f} bits/weight{signs}, a "
        f"checkpoint of {_size(to_bytes(low))} to {_size(to_bytes(high))} ({to_bytes(low):,} to {to_bytes(high):,} "
        f"bytes, of which {_size(math.ceil(fixed_bits / 8))} are fixed: unquantized tensors and any pinned embedding "
        "and head); raise the budget into that range or add a smaller candidate"
    )


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.2f} MB" if n_bytes >= 10**6 else f"{n_bytes / 1e3:.1f} kB"


def allocate(
    costs: Mapping[str, Mapping[QuantSpec, float]],
    shapes: Mapping[str, tuple[int, int]],
    budget_bits: int,
    *,
    units: int = DEFAULT_UNITS,
    exact_cells: int = EXACT_CELLS,
) -> Allocation:
    """The spec per layer minimising ``sum costs[layer][spec]`` with stored bits <= ``budget_bits``.

    ``costs`` maps each layer to its candidate specs and their predicted costs; ``shapes`` gives each
    layer's (out, in). Raises :class:`AllocationError` when even the smallest candidates overflow.
    The DP is exact when its table (layers x budget steps) fits ``exact_cells``, else it runs over
    ``units`` rounded steps and a greedy repair spends the rounding slack.
    """
    names = list(costs)
    if not names:
        raise ValueError("no layers to allocate; the model has no quantizable layers")
    options = [_options(name, costs[name], shapes[name]) for name in names]  # per layer: [(bits, cost, spec)]
    weights = sum(shapes[n][0] * shapes[n][1] for n in names)
    floor_bits = sum(opts[0][0] for opts in options)
    if floor_bits > budget_bits:
        raise AllocationError(
            f"the budget ({budget_bits:,} bits, {budget_bits / weights:.3f} bits/weight) is below the smallest "
            f"achievable size: {floor_bits:,} bits = {floor_bits / weights:.3f} bits/weight = {math.ceil(floor_bits / 8):,} "
            f"bytes of quantized layers with the smallest candidate everywhere; raise the budget or add a smaller candidate"
        )
    choice = _knapsack(options, budget_bits - floor_bits, units, exact_cells)
    choice = _fill(options, choice, budget_bits)
    total = sum(opts[k][0] for opts, k in zip(options, choice))
    assert total <= budget_bits, "allocation exceeds its budget"  # our invariant, by construction
    return Allocation(
        specs={n: opts[k][2] for n, opts, k in zip(names, options, choice)},
        total_bits=total, weights=weights, budget_bits=budget_bits,
        predicted_cost=float(sum(opts[k][1] for opts, k in zip(options, choice))),
    )


def _options(name: str, costs: Mapping[QuantSpec, float], shape: tuple[int, int]) -> list[tuple[int, float, QuantSpec]]:
    """(exact bits, cost, spec) sorted by bits then cost; the first is the layer's smallest option."""
    if not costs:
        raise ValueError(f"layer {name} has no candidate specs")
    out = []
    for spec, cost in costs.items():
        if not math.isfinite(cost):
            raise ValueError(f"layer {name} at {spec} has a non-finite cost ({cost}); the sensitivity estimate failed")
        out.append((spec.stored_bits(*shape), float(cost), spec))
    return sorted(out, key=lambda o: (o[0], o[1]))


def _knapsack(options: list[list[tuple[int, float, QuantSpec]]], spare_bits: int, units: int, exact_cells: int) -> list[int]:
    """Exact DP over the spare bits above the all-smallest baseline, in ``units`` rounded-up steps."""
    extra_max = sum(opts[-1][0] - opts[0][0] for opts in options)
    if extra_max <= spare_bits:  # everything fits: take each layer's cheapest option
        return [min(range(len(opts)), key=lambda k: (opts[k][1], opts[k][0])) for opts in options]
    unit = _unit(options, spare_bits, units, exact_cells)
    capacity = spare_bits // unit
    dp = np.zeros(capacity + 1)  # dp[u]: least cost of the layers so far with at most u extra units
    back = np.zeros((len(options), capacity + 1), dtype=np.int16)
    for i, opts in enumerate(options):
        new = np.full(capacity + 1, np.inf)
        for k, (bits, cost, _) in enumerate(opts):
            w = math.ceil((bits - opts[0][0]) / unit)  # rounded up: the DP never overspends
            if w > capacity:
                continue
            cand = dp[: capacity + 1 - w] + cost  # [capacity + 1 - w]
            better = cand < new[w:]
            new[w:][better] = cand[better]
            back[i, w:][better] = k
        dp = new
    choice, u = [0] * len(options), capacity
    for i in range(len(options) - 1, -1, -1):
        k = int(back[i, u])
        choice[i] = k
        u -= math.ceil((options[i][k][0] - options[i][0][0]) / unit)
    return choice


def _unit(options: list[list[tuple[int, float, QuantSpec]]], spare_bits: int, units: int, exact_cells: int) -> int:
    """Bits per DP step: the gcd of all extra-bit amounts (exact: nothing is rounded) when the table
    stays small enough (<= exact_cells), else ``spare_bits / units`` (rounded up, then repaired)."""
    step = 0
    for opts in options:
        for bits, _, _ in opts:
            step = math.gcd(step, bits - opts[0][0])
    step = max(step, 1)
    if (spare_bits // step + 1) * len(options) <= exact_cells:
        return step
    return max(step, math.ceil(spare_bits / units))


def _fill(options: list[list[tuple[int, float, QuantSpec]]], choice: list[int], budget_bits: int) -> list[int]:
    """Spend the bits the DP's rounding left over: repeatedly take the upgrade with the largest cost
    reduction per extra bit that still fits exactly."""
    choice = list(choice)
    used = sum(opts[k][0] for opts, k in zip(options, choice))
    while True:
        best, best_gain = None, 0.0
        for i, opts in enumerate(options):
            bits0, cost0, _ = opts[choice[i]]
            for k, (bits, cost, _) in enumerate(opts):
                if cost < cost0 and used - bits0 + bits <= budget_bits:
                    gain = (cost0 - cost) / max(bits - bits0, 1)
                    if gain > best_gain:
                        best, best_gain = (i, k), gain
        if best is None:
            return choice
        i, k = best
        used += options[i][k][0] - options[i][choice[i]][0]
        choice[i] = k
