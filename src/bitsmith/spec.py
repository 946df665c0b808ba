"""QuantSpec: the one spelling of a quantization setting, used by the CLI, checkpoints, logs and reports.

Grammar (case-insensitive): ``w<bits>[g<group>][s]``

- ``bits`` 2-8: code width.
- ``g<group>``: weights per scale along the input dimension (32, 64, 128, 256); absent means one
  scale per output row (per-channel).
- ``s``: symmetric codes (no stored zero point); absent means asymmetric (fp16 scale and zero).

Examples: ``w8`` (8-bit per channel, asymmetric), ``w4g128``, ``w3g64s``, ``w2g32``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

BITS_RANGE = range(2, 9)
GROUP_SIZES = (32, 64, 128, 256)
SCALE_BITS = 16  # scales and zeros are stored as fp16

_PATTERN = re.compile(r"^w(?P<bits>\d+)(?:g(?P<group>\d+))?(?P<sym>s)?$")


class SpecError(ValueError):
    """A spec string or setting the user gave cannot be used."""


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int | None = None  # None: one group per row (per-channel)
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in BITS_RANGE:
            raise SpecError(f"{self.bits} bits is not supported; use 2 to 8 bits (e.g. w4g128)")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            sizes = ", ".join(map(str, GROUP_SIZES))
            raise SpecError(f"group size {self.group_size} is not supported; use one of {sizes} or none (per-channel)")

    @classmethod
    def parse(cls, text: str) -> "QuantSpec":
        match = _PATTERN.match(text.strip().lower())
        if match is None:
            raise SpecError(f"cannot read quantization spec {text!r}; write it like w4g128, w3g64s or w8")
        group = match["group"]
        return cls(int(match["bits"]), int(group) if group else None, match["sym"] is not None)

    def __str__(self) -> str:
        group = f"g{self.group_size}" if self.group_size else ""
        return f"w{self.bits}{group}{'s' if self.symmetric else ''}"

    @property
    def qmax(self) -> int:
        """Largest code; codes run 0..qmax."""
        return (1 << self.bits) - 1

    def groups_per_row(self, in_features: int) -> int:
        """Groups in one row; the last group is shorter when group_size does not divide the row."""
        if self.group_size is None:
            return 1
        return math.ceil(in_features / self.group_size)

    def group_width(self, in_features: int) -> int:
        """Nominal width of a group in a row of in_features weights."""
        return in_features if self.group_size is None else self.group_size

    def stored_bits(self, out_features: int, in_features: int) -> int:
        """Every bit a weight matrix costs on disk: packed codes (rows padded to 8 codes) plus fp16
        scale (and zero when asymmetric) per group."""
        codes = out_features * math.ceil(in_features / 8) * 8 * self.bits
        per_group = SCALE_BITS * (1 if self.symmetric else 2)
        return codes + out_features * self.groups_per_row(in_features) * per_group

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        return self.stored_bits(out_features, in_features) / (out_features * in_features)
