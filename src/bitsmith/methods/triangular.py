"""Triangular matrices for GPTQ's inverse Cholesky factor (:func:`bitsmith.methods.gptq.inverse_cholesky`):
the in-place inverse of a lower-triangular matrix by 2x2 blocks, whose off-diagonal block is made by
products that skip the triangles' zero halves, and the in-place flip of both axes."""

from __future__ import annotations

import torch

# up to this many rows, flip_both_ goes through one flipped copy (methods.gptq's single-thread width)
FLIP_COPY_ROWS = 2048


def lower_inverse(lower: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """Inverse of a lower-triangular matrix (a new tensor); see :func:`lower_inverse_`."""
    return lower_inverse_(lower.clone(), leaf)


def lower_inverse_(lower: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """Invert a lower-triangular matrix in place by 2x2 blocks, ``[[A, 0], [C, D]]^-1 =
    [[A^-1, 0], [-D^-1 C A^-1, D^-1]]``: A and D are inverted in place first, then C is replaced
    using only the inverses, by products that skip the triangles' zero halves (:func:`_times_lower`,
    :func:`_lower_times`): n^3/6 multiply-adds in GEMMs, half of what full products of the blocks
    spent (a triangular solve against the identity spends n^3/2 and runs 2-3x slower; torch exposes
    no trtri), and one (n/2)^2 temporary."""
    n = lower.shape[0]
    if n <= leaf:
        lower.copy_(torch.linalg.solve_triangular(lower, torch.eye(n, dtype=lower.dtype, device=lower.device), upper=False))
        return lower
    half = n // 2
    lower_inverse_(lower[:half, :half], leaf)
    lower_inverse_(lower[half:, half:], leaf)
    right = torch.empty(n - half, half, dtype=lower.dtype, device=lower.device)
    _times_lower(lower[half:, :half], lower[:half, :half], right, leaf)  # C A^-1
    corner = lower[half:, :half]
    _lower_times(lower[half:, half:], right, corner, leaf)  # D^-1 (C A^-1), over C (read above)
    corner.neg_()
    return lower


def _times_lower(x: torch.Tensor, low: torch.Tensor, out: torch.Tensor, leaf: int) -> None:
    """``out = x @ low`` for lower-triangular ``low``: ``[X1, X2] [[L11, 0], [L21, L22]] = [X1 L11 + X2 L21,
    X2 L22]``, halving as :func:`lower_inverse_` does, so only its leaf blocks are read whole (they hold
    zeros above their diagonals) and nothing else above the diagonal. ``out`` must not overlap ``x``."""
    k = low.shape[0]
    if k <= leaf:
        out.copy_(x @ low)
        return
    h = k // 2
    _times_lower(x[:, :h], low[:h, :h], out[:, :h], leaf)
    out[:, :h].addmm_(x[:, h:], low[h:, :h])
    _times_lower(x[:, h:], low[h:, h:], out[:, h:], leaf)


def _lower_times(low: torch.Tensor, y: torch.Tensor, out: torch.Tensor, leaf: int) -> None:
    """``out = low @ y`` for lower-triangular ``low``: ``[[L11, 0], [L21, L22]] [Y1; Y2] = [L11 Y1;
    L21 Y1 + L22 Y2]``, read as in :func:`_times_lower`. ``out`` must not overlap ``y``."""
    k = low.shape[0]
    if k <= leaf:
        out.copy_(low @ y)
        return
    h = k // 2
    _lower_times(low[:h, :h], y[:h], out[:h], leaf)
    _lower_times(low[h:, h:], y[h:], out[h:], leaf)
    out[h:].addmm_(low[h:, :h], y[:h])


def flip_both_(m: torch.Tensor) -> torch.Tensor:
    """``m.flip(0, 1)`` in place, a pair of rows at a time (no second n x n matrix); up to
    ``FLIP_COPY_ROWS`` rows through one flipped copy (at most 16 MB; 5x faster on 576 rows)."""
    n = m.shape[0]
    if n <= FLIP_COPY_ROWS:
        return m.copy_(m.flip(0, 1))
    for i in range(n // 2):
        j = n - 1 - i
        top = m[i].flip(0)  # a copy
        m[i] = m[j].flip(0)
        m[j] = top
    if n % 2:
        m[n // 2] = m[n // 2].flip(0)
    return m
