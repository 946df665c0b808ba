"""QuantSpec: the one spelling of a quantization setting, used by the CLI, checkpoints, logs and reports.

Grammar (case-insensitive): ``w<bits>[g<group>][s|nf|fit]``

- ``bits`` 2-8: code width.
- ``g<group>``: weights per scale along the input dimension (32, 64, 128, 256); absent means one
  scale per output row (per-channel).
- no suffix: asymmetric uniform codes (fp16 scale and zero per group).
- ``s``: symmetric uniform codes (no stored zero point).
- ``nf``: a fixed non-uniform grid of 2**bits levels at normal quantiles (NF4-like; Dettmers et al.
  2023, QLoRA, sec. 3), scale only: ``w = scale * grid[code]``.
- ``fit``: a non-uniform grid fitted to each tensor's weights (weighted 1-D k-means), stored with it.
- ``vq``: vector codes (issue 19, :mod:`bitsmith.methods.vq`): each run of ``vq_dim`` consecutive
  weights of a row is one index into a per-tensor codebook of ``2**(bits * vq_dim)`` vectors, times the
  group's fp16 scale. ``w2g64vq``: 4-dim vectors, 256 entries (8-bit indices = 2 bits/weight);
  ``w3g128vq`` and ``w4..vq``: 2-dim vectors, 64 / 256 entries.

Examples: ``w8`` (8-bit per channel, asymmetric), ``w4g128``, ``w3g64s``, ``w4g32nf``, ``w3g64fit``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

BITS_RANGE = range(2, 9)
GROUP_SIZES = (32, 64, 128, 256)
SCALE_BITS = 16  # scales and zeros are stored as fp16

GRIDS = ("uniform", "nf", "fit", "vq")
GRID_BITS = range(2, 5)  # non-uniform grids: 4, 8 or 16 levels; vector codes: 2 to 4 bits per weight
VQ_DIMS = {2: 4, 3: 2, 4: 2}  # bits/weight -> vector length; every index fits a byte (8, 6, 8 bits)
_PATTERN = re.compile(r"^w(?P<bits>\d+)(?:g(?P<group>\d+))?(?P<suffix>s|nf|fit|vq)?$")


class SpecError(ValueError):
    """A spec string or setting the user gave cannot be used."""


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int | None = None  # None: one group per row (per-channel)
    symmetric: bool = False
    grid: str = "uniform"  # "uniform" | "nf" | "fit"

    def __post_init__(self) -> None:
        if self.bits not in BITS_RANGE:
            raise SpecError(f"{self.bits} bits is not supported; use 2 to 8 bits (e.g. w4g128)")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            sizes = ", ".join(map(str, GROUP_SIZES))
            raise SpecError(f"group size {self.group_size} is not supported; use one of {sizes} or none (per-channel)")
        if self.grid not in GRIDS:
            raise SpecError(f"grid {self.grid!r} is not supported; use one of {', '.join(GRIDS)}")
        if self.grid != "uniform" and self.bits not in GRID_BITS:
            raise SpecError(f"a non-uniform grid needs 2 to 4 bits (4 to 16 levels), not {self.bits}; e.g. w4g32{self.grid}")
        if self.grid != "uniform" and self.symmetric:
            raise SpecError("non-uniform grids are scale-only already; drop the 's'")

    @classmethod
    def parse(cls, text: str) -> "QuantSpec":
        match = _PATTERN.match(text.strip().lower())
        if match is None:
            raise SpecError(f"cannot read quantization spec {text!r}; write it like w4g128, w3g64s or w8")
        group, suffix = match["group"], match["suffix"]
        grid = suffix if suffix in ("nf", "fit", "vq") else "uniform"
        try:
            bits, group_size = int(match["bits"]), int(group) if group else None
        except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
            raise SpecError(f"cannot read quantization spec {text!r}: its number is too long; write it like w4g128") from None
        return cls(bits, group_size, suffix == "s", grid)

    def __str__(self) -> str:
        group = f"g{self.group_size}" if self.group_size else ""
        suffix = "s" if self.symmetric else ("" if self.grid == "uniform" else self.grid)
        return f"w{self.bits}{group}{suffix}"

    @property
    def has_zero(self) -> bool:
        """Whether a zero point is stored per group (asymmetric uniform codes only)."""
        return self.grid == "uniform" and not self.symmetric

    @property
    def levels(self) -> int:
        """Levels of a scalar grid; entries of a ``vq`` codebook (``2**index_bits``)."""
        return 1 << self.index_bits

    @property
    def vq_dim(self) -> int:
        """Weights per code: the vector length of a ``vq`` spec, 1 otherwise."""
        return VQ_DIMS[self.bits] if self.grid == "vq" else 1

    @property
    def index_bits(self) -> int:
        """Bits of one stored code (a ``vq`` index covers ``vq_dim`` weights)."""
        return self.bits * self.vq_dim

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
        """Every bit a weight matrix costs on disk: packed codes (rows padded to 8 codes), fp16
        scale (and zero when asymmetric) per group, and the fp16 grid of a non-uniform spec (a
        ``vq`` codebook: ``levels x vq_dim`` fp16 values)."""
        codes = out_features * math.ceil(in_features // self.vq_dim / 8) * 8 * self.index_bits
        per_group = SCALE_BITS * (2 if self.has_zero else 1)
        grid = 0 if self.grid == "uniform" else SCALE_BITS * self.levels * self.vq_dim
        return codes + out_features * self.groups_per_row(in_features) * per_group + grid

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        return self.stored_bits(out_features, in_features) / (out_features * in_features)
