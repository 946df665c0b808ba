"""QuantizedTensor: a weight matrix as integer codes plus per-group scale and zero."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitsmith.formats.packing import pack, unpack
from bitsmith.primitives import dequantize_codes, expand_groups
from bitsmith.spec import QuantSpec


@dataclass(frozen=True)
class QuantizedTensor:
    codes: torch.Tensor  # uint8 [out, in], values 0..qmax
    scale: torch.Tensor  # fp16 [out, G]
    zero: torch.Tensor | None  # fp16 [out, G] (code units, may be fractional); None when symmetric
    spec: QuantSpec

    def __post_init__(self) -> None:
        out_features, in_features = self.codes.shape
        groups = self.spec.groups_per_row(in_features)
        if tuple(self.scale.shape) != (out_features, groups):
            raise ValueError(f"scale shape {tuple(self.scale.shape)} != {(out_features, groups)} for {self.spec}")
        if (self.zero is None) != self.spec.symmetric:
            raise ValueError(f"{self.spec} {'has no' if self.spec.symmetric else 'needs a'} stored zero")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def zero_or_mid(self) -> torch.Tensor:
        """Zero in code units, [out, G]; the fixed midpoint for symmetric codes."""
        if self.zero is not None:
            return self.zero.float()
        return torch.full(self.scale.shape, (self.spec.qmax + 1) / 2)

    def dequantize(self) -> torch.Tensor:
        """The reference reconstruction, float32 [out, in]."""
        in_features = self.codes.shape[1]
        scale = expand_groups(self.scale.float(), self.spec, in_features)
        zero = expand_groups(self.zero_or_mid(), self.spec, in_features)
        return dequantize_codes(self.codes.float(), scale, zero)

    def stored_bits(self) -> int:
        return self.spec.stored_bits(*self.shape)

    def to_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """Packed tensors as stored in a checkpoint."""
        state = {f"{prefix}.qweight": pack(self.codes, self.spec.bits), f"{prefix}.scale": self.scale}
        if self.zero is not None:
            state[f"{prefix}.zero"] = self.zero
        return state

    @classmethod
    def from_state(
        cls, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec, in_features: int
    ) -> "QuantizedTensor":
        return cls(unpack(qweight, spec.bits, in_features), scale, zero, spec)
