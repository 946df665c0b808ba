"""Reuse the allocation an earlier ``--budget`` run recorded, instead of estimating it again.

The sensitivity pass is the expensive part of a budget on a real model (Qwen2.5-Coder-1.5B: ~35 min
for 8 Fisher windows on 2 cores, before any layer is quantized), and its result, one spec per layer,
is recorded in the checkpoint's report. ``bitsmith quantize --allocation-from CKPT`` quantizes the
same model again with exactly those specs: another output spec, calibration or method at the same
allocation, or a run lost to a crash, without paying for the pass twice. The recorded specs are
checked against the model before any work: every allocated layer must exist, no layer the plan
leaves free may be missing, and every spec must fit its layer's rows.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from bitsmith.plan.allocate import Allocation, usable_candidates
from bitsmith.spec import QuantSpec

_FIELDS = ("bits_per_weight", "total_bits", "weights", "budget_bits", "fixed_bits", "predicted_kl", "counts", "specs")


def recorded_allocation(checkpoint: str | Path) -> Allocation:
    """The allocation recorded in ``checkpoint``'s report, with ``replayed_from`` added to its extras.
    A folder that is no bitsmith checkpoint, or one made without ``--budget``, is a ValueError that
    says so."""
    from bitsmith.io.checkpoint import read_info

    path = Path(checkpoint)
    info = read_info(path) if path.is_dir() else None
    if info is None:
        raise ValueError(f"--allocation-from {path}: not a bitsmith checkpoint folder; give one made with --budget")
    recorded = (info.report or {}).get("allocation")
    if not recorded or not recorded.get("specs"):
        raise ValueError(f"--allocation-from {path}: this checkpoint records no allocation (it was made without "
                         "--budget); give a checkpoint made with --budget, or use --budget here")
    extra = {k: v for k, v in recorded.items() if k not in _FIELDS}
    return Allocation(
        specs={name: QuantSpec.parse(s) for name, s in recorded["specs"].items()},
        total_bits=int(recorded["total_bits"]), weights=int(recorded["weights"]),
        budget_bits=int(recorded.get("budget_bits", recorded["total_bits"])),
        predicted_cost=float(recorded.get("predicted_kl", float("nan"))), fixed_bits=int(recorded.get("fixed_bits", 0)),
        extra={**extra, "replayed_from": str(path)},
    )


def replay_allocation(model, plan, allocation: Allocation):
    """``plan`` with ``allocation``'s per-layer specs, after checking they fit ``model`` (a path or
    alias) and the plan's method: the same checks a fresh allocation passes."""
    from bitsmith.methods.vq import check_method
    from bitsmith.models import open_source
    from bitsmith.plan.sensitivity import budget_layers

    free, _, _ = budget_layers(open_source(model), plan)
    unknown = sorted(set(allocation.specs) - set(free))
    if unknown:
        raise ValueError(f"the recorded allocation gives a spec to {unknown[0]}, which this model does not have among "
                         f"its allocated layers ({len(unknown)} such); was it made for another model?")
    missing = sorted(set(free) - set(allocation.specs))
    if missing:
        raise ValueError(f"the recorded allocation has no spec for {missing[0]} ({len(missing)} layers missing); "
                         "was it made for another model, or with other --output-spec settings?")
    for name, spec in allocation.specs.items():
        usable_candidates(name, free[name], [spec])  # a group wider than the layer's rows is refused here
    check_method(plan.quantizer, plan.spec, list(set(allocation.specs.values())))
    return replace(plan, layer_specs={**plan.layer_specs, **allocation.specs})
