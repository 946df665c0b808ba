"""Placing a measured divergence on the reference's ladder, and telling a different model from a
quantized one. Pure functions of numbers.

Each rung has a bit width: its effective bits per weight when the ladder gives them (w4g128 -> 4.25 with
its scales and zeros), else its nominal bits (w8 -> 8, w4g128 -> 4, ...). A mean KL between two rungs is
placed by interpolating the bits linearly in log KL (KL falls roughly geometrically per bit removed); above the
best rung it is "at or above" that rung, below the worst "at or below" it. A mean KL more than
``FAR_FACTOR`` times the lowest rung's is not a quantization of this reference: it is reported as a
different model (or a different tokenizer, which the token strings decide separately).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["FAR_FACTOR", "Placement", "nominal_bits", "place"]

FAR_FACTOR = 3.0  # mean KL beyond 3x the 2-bit rung's: not this model quantized


def nominal_bits(rung: str) -> float:
    from bitsmith.spec import QuantSpec

    return float(QuantSpec.parse(rung).bits)


@dataclass(frozen=True)
class Placement:
    bits: float  # the interpolated bit width (clamped to the ladder's ends)
    above: str | None  # the rung with less divergence next to it (None: better than every rung)
    below: str | None  # the rung with more divergence next to it (None: worse than every rung)
    nearest: str  # the rung closest in log KL
    far: bool  # more than FAR_FACTOR x the worst rung's KL

    def describe(self) -> str:
        if self.far:
            return f"far beyond the lowest rung ({self.above}): not this reference quantized"
        if self.above is None:
            return f"at or above {self.below} (as close to the reference as the best rung or closer)"
        if self.below is None:
            return f"at or below {self.above} (as far as the lowest rung)"
        return f"between {self.below} and {self.above}"


def place(kl: float, rungs: Mapping[str, float], bits: Mapping[str, float] | None = None) -> Placement:
    """Where mean KL ``kl`` falls among ``rungs`` (rung -> its mean KL on the same positions); ``bits``: each
    rung's bit width to interpolate on (default its nominal bits)."""
    if not rungs:
        raise ValueError("the ladder has no rungs")
    width = (lambda r: float(bits[r])) if bits is not None else nominal_bits
    order = sorted(rungs, key=lambda r: rungs[r])  # least divergent first
    floor = 1e-12
    logs = {r: math.log(max(rungs[r], floor)) for r in order}
    x = math.log(max(kl, floor))
    nearest = min(order, key=lambda r: abs(logs[r] - x))
    best, worst = order[0], order[-1]
    if x <= logs[best]:
        return Placement(width(best), None, best, nearest, False)
    if x >= logs[worst]:
        return Placement(width(worst), worst, None, nearest, kl > FAR_FACTOR * rungs[worst])
    for hi, lo in zip(order, order[1:]):  # hi: less divergent (more bits)
        if logs[hi] <= x <= logs[lo]:
            span = logs[lo] - logs[hi]
            t = (x - logs[hi]) / span if span > 0 else 0.0
            bits = width(hi) + t * (width(lo) - width(hi))
            return Placement(bits, hi, lo, nearest, False)
    raise AssertionError("unreachable: x lies within the ladder")
