"""QuantizedTensor: a weight matrix as integer codes plus per-group scale and zero.

A ``vq`` spec (vector codes, :mod:`bitsmith.methods.vq`) stores one code per ``spec.vq_dim`` weights:
``codes`` is uint8 [out, in / vq_dim] of indices into ``grid``, the codebook fp16 [entries, vq_dim];
``shape`` is still the weight's [out, in]."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitsmith.formats.packing import pack, unpack
from bitsmith.hadamard import Rotation
from bitsmith.primitives import dequantize_by_groups, expand_groups, nf_grid
from bitsmith.spec import QuantSpec


@dataclass(frozen=True)
class QuantizedTensor:
    codes: torch.Tensor  # uint8 [out, in], values 0..qmax ([out, in / vq_dim] codebook indices for vq)
    scale: torch.Tensor  # fp16 [out, G]
    zero: torch.Tensor | None  # fp16 [out, G] (code units, may be fractional); None unless spec.has_zero
    spec: QuantSpec
    grid: torch.Tensor | None = None  # fp16 [2**bits] sorted levels of a non-uniform spec
    rotation: Rotation | None = None  # the codes are of W R^T: the layer reads R x (bitsmith.hadamard)

    def __post_init__(self) -> None:
        out_features, in_features = self.shape
        if self.spec.grid == "vq" and (self.grid is None or tuple(self.grid.shape) != (self.spec.levels, self.spec.vq_dim)):
            got = None if self.grid is None else tuple(self.grid.shape)
            raise ValueError(f"{self.spec} needs a codebook of shape {(self.spec.levels, self.spec.vq_dim)}, got {got}")
        groups = self.spec.groups_per_row(in_features)
        if tuple(self.scale.shape) != (out_features, groups):
            raise ValueError(f"scale shape {tuple(self.scale.shape)} != {(out_features, groups)} for {self.spec}")
        if (self.zero is not None) != self.spec.has_zero:
            raise ValueError(f"{self.spec} {'needs a' if self.spec.has_zero else 'has no'} stored zero")
        if (self.grid is not None) != (self.spec.grid != "uniform"):
            raise ValueError(f"{self.spec} {'has no' if self.spec.grid == 'uniform' else 'needs a'} grid")
        if self.rotation is not None and self.rotation.width != in_features:
            raise ValueError(f"rotation of width {self.rotation.width} on a weight with {in_features} inputs")

    @property
    def shape(self) -> tuple[int, int]:
        """[out, in] of the weight (a vq tensor's codes are ``vq_dim`` times narrower)."""
        rows, cols = self.codes.shape
        return rows, cols * self.spec.vq_dim

    def zero_or_mid(self) -> torch.Tensor:  # uniform specs only
        """Zero in code units, [out, G]; the fixed midpoint for symmetric codes."""
        if self.zero is not None:
            return self.zero.float()
        return torch.full(self.scale.shape, (self.spec.qmax + 1) / 2, device=self.scale.device)

    def dequantize(self) -> torch.Tensor:
        """The reference reconstruction, float32 [out, in]."""
        in_features = self.shape[1]
        if self.grid is None and self.spec.grid != "vq":  # affine codes: per group, no expanded copies
            return dequantize_by_groups(self.codes, self.scale.float(), self.zero_or_mid(), self.spec.group_width(in_features))
        scale = expand_groups(self.scale.float(), self.spec, in_features)
        if self.spec.grid == "vq":  # gather whole vectors: [out, in/d, d] -> [out, in]
            return self.grid.float()[self.codes.long()].reshape(self.codes.shape[0], in_features) * scale
        return self.grid.float()[self.codes.long()] * scale

    def weight(self) -> torch.Tensor:
        """The reconstruction in the layer's own input basis, float32 [out, in]: :meth:`dequantize`
        (the codes' basis) with a rotation undone. What replaces the float weight (``x W^T``)."""
        w = self.dequantize()
        return w if self.rotation is None else self.rotation.unrotate_weight(w)

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        """The same tensor with its codes, scales, zeros and grid on ``device`` (dtypes kept)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedTensor(move(self.codes), move(self.scale), move(self.zero), self.spec, move(self.grid), self.rotation)

    def rows(self, index: slice | torch.Tensor) -> "QuantizedTensor":
        """The same quantization restricted to some output rows (a slice or an index tensor)."""
        zero = None if self.zero is None else self.zero[index]
        return QuantizedTensor(self.codes[index], self.scale[index], zero, self.spec, self.grid, self.rotation)

    def entry(self) -> dict:
        """This layer's entry in a checkpoint's metadata: spec, [out, in] shape and, when rotated,
        ``{"rotate": {"block": b}}`` (the signs are the stored tensor ``<layer>.rot_signs``)."""
        entry: dict = {"spec": str(self.spec), "shape": list(self.shape)}
        if self.rotation is not None:
            entry["rotate"] = {"block": self.rotation.block}
        return entry

    def stored_bits(self) -> int:
        return self.spec.stored_bits(*self.shape)

    def to_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """Packed tensors as stored in a checkpoint."""
        state = {f"{prefix}.qweight": pack(self.codes, self.spec.index_bits), f"{prefix}.scale": self.scale}
        if self.zero is not None:
            state[f"{prefix}.zero"] = self.zero
        if self.grid is not None:
            state[f"{prefix}.grid"] = self.grid.half()
        if self.rotation is not None:
            state.update(self.rotation.to_state(prefix))
        return state

    @classmethod
    def from_state(
        cls, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec, in_features: int,
        grid: torch.Tensor | None = None, rotation: Rotation | None = None,
    ) -> "QuantizedTensor":
        return cls(unpack(qweight, spec.index_bits, in_features // spec.vq_dim), scale, zero, spec, grid, rotation)


def default_grid(spec: QuantSpec) -> torch.Tensor | None:
    """The fixed grid of an ``nf`` spec (None for uniform; ``fit`` grids come from the weights)."""
    return nf_grid(spec.bits).half().float() if spec.grid == "nf" else None
