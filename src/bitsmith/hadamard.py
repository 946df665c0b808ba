"""Randomized Hadamard rotations of a linear layer's input dimension (incoherence processing).

QuIP# (Tseng et al. 2024, "QuIP#: Even Better LLM Quantization with Hadamard Incoherence and Lattice
Codebooks") quantizes ``W' = W diag(s) H^T`` instead of ``W`` (``s`` a random sign vector, ``H`` a
normalized Hadamard matrix) and feeds the layer ``x' = H diag(s) x``; since ``R = H diag(s)`` is
orthogonal, ``W' x' = W x`` exactly. The rotation spreads each row's outliers over all its input
channels, so a uniform grid with few levels fits the rotated rows better.

``H`` here is block-diagonal: Sylvester Hadamard blocks of the largest power of two dividing the
width (SmolLM2: 576 = 9 x 64, 1536 = 3 x 512; Qwen2.5-1.5B: 1536 = 3 x 512, 8960 = 35 x 256). A full rotation of a non-power-of-two width needs a Hadamard matrix of that order (Paley
constructions, e.g. 12 or 20 times a power of two); the blocks mix outliers only within ``block``
channels, so an outlier channel is spread over ``block`` channels, not all of them. The transform
costs ``width * log2(block)`` additions per token, versus ``width * log2(width)`` (plus the odd
factor's dense product) for a full one.

``x`` is rotated with a fast Walsh-Hadamard transform (two small matrix products per block, see
:func:`fwht`), never with a dense ``width x width`` matrix. Pure functions of tensors; the sign vector is stored in the
checkpoint bit-packed (one bit per input channel), so loading never depends on a random generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROTATION_PART = "rot_signs"  # the checkpoint tensor ``<layer>.rot_signs``: the packed sign bits


def hadamard_block(width: int) -> int:
    """The largest power of two dividing ``width`` (the Hadamard block size used for it)."""
    if width < 1:
        raise ValueError(f"cannot rotate a width of {width}")
    return width & -width


def random_signs(width: int, seed: int) -> torch.Tensor:
    """A float32 [width] vector of +-1, a function of (width, seed) only."""
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(width))
    return torch.randint(0, 2, (width,), generator=gen).float().mul_(2).sub_(1)


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """The normalized Walsh-Hadamard transform of each ``block`` consecutive entries of ``x``'s last
    dimension (``H_block / sqrt(block)``, Sylvester order; symmetric and its own inverse).
    float32 result of ``x``'s shape; ``block`` must be a power of two dividing the last dimension.

    Computed as two small matrix products: Sylvester's ``H_(ab) = H_a (x) H_b`` (Kronecker), so a
    block viewed as an ``a x b`` matrix ``X`` maps to ``H_a X H_b`` with ``a, b ~ sqrt(block)``:
    ``a + b`` multiply-adds per entry (48 for 512) in two BLAS calls. Measured on the shared 2-core
    machine (one thread, loaded) against :func:`fwht_butterfly` (``log2(block)`` vectorised passes,
    each paying torch's per-op cost): one token of 576 (block 64) 1310 -> 13.6 us, of 1536 (block 512)
    1962 -> 14.0 us; 64 tokens of 1536 12.6 -> 1.3 ms."""
    n = x.shape[-1]
    if block < 1 or block & (block - 1) or n % block:
        raise ValueError(f"Hadamard block {block} is not a power of two dividing the width {n}")
    k = block.bit_length() - 1
    a, b = 1 << (k // 2), 1 << (k - k // 2)
    y = x.float().reshape(-1, n // block, a, b)
    y = torch.matmul(_normalized(a, y.device), y) if a > 1 else y
    y = torch.matmul(y, _normalized(b, y.device))
    return y.reshape(x.shape)


def fwht_butterfly(x: torch.Tensor, block: int) -> torch.Tensor:
    """The same transform by ``log2(block)`` butterfly passes: the oracle :func:`fwht` is tested against."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    y = x.float().reshape(-1, n // block, block)
    h = 1
    while h < block:  # one butterfly pass: pairs (i, i + h) within each run of 2h -> (a + b, a - b)
        pairs = y.reshape(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        lo, hi = pairs[:, :, :, 0, :], pairs[:, :, :, 1, :]
        y = torch.stack((lo + hi, lo - hi), dim=3).reshape(y.shape)
        h *= 2
    return (y * (1.0 / math.sqrt(block))).reshape(*lead, n)


_MATRICES: dict[tuple[int, str], torch.Tensor] = {}


def _normalized(size: int, device: torch.device) -> torch.Tensor:
    """The normalized Hadamard matrix of ``size``, cached per device (small: at most 64 x 64 here)."""
    key = (size, str(device))
    if key not in _MATRICES:
        _MATRICES[key] = hadamard_matrix(size).to(device)
    return _MATRICES[key]


def hadamard_matrix(block: int) -> torch.Tensor:
    """The dense normalized Sylvester Hadamard matrix (the oracle :func:`fwht` is tested against)."""
    h = torch.ones(1, 1)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(block)


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """+-1 [width] -> uint8 [ceil(width / 8)], bit i of byte j set where sign 8 j + i is negative."""
    bits = (signs < 0).to(torch.uint8)
    pad = -bits.numel() % 8
    bits = torch.cat([bits, bits.new_zeros(pad)]).reshape(-1, 8)
    weights = (2 ** torch.arange(8, dtype=torch.int64)).to(torch.uint8)
    return (bits * weights).sum(dim=1, dtype=torch.int64).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: float32 +-1 [width]."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != math.ceil(width / 8):
        raise ValueError(f"packed signs must be uint8 [{math.ceil(width / 8)}] for width {width}, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    bits = (packed.long().unsqueeze(1) >> torch.arange(8)) & 1
    return 1.0 - 2.0 * bits.reshape(-1)[:width].float()


@dataclass(frozen=True, eq=False)
class Rotation:
    """``R = H diag(signs)`` over an input dimension of ``signs.numel()``, Hadamard blocks of ``block``."""

    signs: torch.Tensor  # float32 +-1 [width]
    block: int

    def __post_init__(self) -> None:
        width = self.signs.numel()
        if self.block < 2 or self.block & (self.block - 1) or width % self.block:
            raise ValueError(f"rotation block {self.block} is not a power of two >= 2 dividing the width {width}")

    @classmethod
    def seeded(cls, width: int, seed: int) -> "Rotation":
        """The rotation a run with ``seed`` uses for layers of input width ``width``."""
        return cls(random_signs(width, seed), hadamard_block(width))

    @property
    def width(self) -> int:
        return self.signs.numel()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``R x`` on ``x``'s last dimension (an activation: what the rotated layer reads); float32."""
        return fwht(x.float() * self.signs.to(x.device), self.block)

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        """``R^T y`` on the last dimension (undoes :meth:`apply`); float32."""
        return fwht(y, self.block) * self.signs.to(y.device)

    def rotate_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W R^T`` [out, in]: each row is rotated like an activation, so ``(W R^T)(R x) = W x``."""
        return self.apply(weight)

    def unrotate_weight(self, rotated: torch.Tensor) -> torch.Tensor:
        """``W' R`` [out, in]: the weight in the layer's original input basis."""
        return self.invert(rotated)

    def rotate_hessian(self, hessian: torch.Tensor) -> torch.Tensor:
        """``R H R^T`` for ``H = sum x x^T``: the statistics of the rotated inputs ``R x``."""
        return self.apply(self.apply(hessian).T.contiguous())

    def rotate_importance(self, importance: torch.Tensor) -> torch.Tensor:
        """Mean squared rotated input per channel from the unrotated one alone: exact when the input
        channels are uncorrelated (each Hadamard block averages its channels' energy)."""
        per_block = importance.float().reshape(-1, self.block).mean(dim=1, keepdim=True)
        return per_block.expand(-1, self.block).reshape(-1)

    def to_state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{ROTATION_PART}": pack_signs(self.signs)}

    @classmethod
    def from_state(cls, packed: torch.Tensor, width: int, block: int) -> "Rotation":
        return cls(unpack_signs(packed, width), block)

    def same_as(self, other: "Rotation | None") -> bool:
        return other is not None and self.block == other.block and torch.equal(self.signs, other.signs)
