"""AWQ's searches made practical on 1.5B models: the scale search on the linears' own outputs,
the clip search on per-group Gram matrices, and the simulated min/max RTN without packing.

The reference search (``awq_measure=module``, :mod:`bitsmith.transforms.awq_search`) runs the whole
measured module (the attention for q/k/v, the MLP for gate/up) over the 4,096 search tokens for every
one of the 20 candidate scales: on Qwen2.5-Coder-1.5B ~11 TFLOP of float32 per block, hours on two
cores. Here (``awq_measure=linear``; the default ``auto`` uses it for every group but q/k/v, which
stay on the attention's output: on their own outputs SmolLM2's KLD rose 0.1708 -> 0.1838) a
candidate's loss is the squared error of the linears' outputs,
``sum_l ||X (Q(W_l diag(s)) diag(s)^-1 - W_l)^T||^2``, which needs only the linears' common input X,
never the attention or the nonlinearity:

- **Exact token compression.** The loss depends on X only through ``X^T X``. When there are more
  tokens T than input channels, X [T, in] is replaced by R [in, in] with ``R^T R = X^T X`` (the
  Cholesky factor of the Gram matrix, or X's QR factor when that is only semi-definite): the same
  loss over *all* tokens at ``in`` rows instead of T (:func:`token_basis`; 4,096 -> 1,536 rows for
  Qwen's q/k/v, o and gate/up inputs). A group with more channels *and* tokens than
  ``awq_search_tokens`` (Qwen's 8,960-wide down_proj input) uses that many evenly spaced tokens.
- **bf16 products where the CPU has them** (``awq_search_dtype``, auto): the weight error is
  computed in float32, only ``R @ delta^T`` runs in bf16 with float32 accumulation (~10x the float32
  rate on AMX). Its rounding perturbs a candidate's loss by ~1e-5 relative (tested against float32).
- **Cache-sized row chunks over the cores**: quantize-dequantize, error and product per chunk of rows,
  one intra-op thread per chunk (:mod:`bitsmith.methods.parallel`), sums in chunk order.
- **Coarse to fine over alpha** (``awq_grid_step``, 4): every 4th candidate and the last, then the best's
  neighbours within 3 (:func:`search_indices`): 12 of the 20 candidates' losses. The loss summed over whole
  weights is smooth in alpha; on SmolLM2 w4g128 it chose the exhaustive search's alpha in 107 of 111 groups.

The clip search's per-(row, group) error ``mean_t (x_{t,g} . delta_{o,g})^2`` equals
``delta_{o,g} H_g delta_{o,g}^T / T`` with the group's Gram matrix ``H_g = X_g^T X_g`` [gs, gs]:
``out x in x gs`` multiply-adds per candidate instead of ``out x in x T`` (:func:`group_gram`,
:func:`clip_errors`), in float32 (with bf16 Gram products SmolLM2 w4g128's KLD was 0.1809, with float32 0.1765).

The simulated quantizer of the pipeline (min/max RTN) runs as :func:`minmax_qdq`: the values of
``rtn(w, spec, None, {"clip_search": False}).dequantize()`` (fp16-rounded scale and zero included)
without codes packed to uint8 and scales expanded per weight.
"""

from __future__ import annotations

from typing import Callable

import torch

from bitsmith.methods.base import Method
from bitsmith.methods.parallel import map_chunks, row_chunks
from bitsmith.primitives import affine_params, from_groups, to_groups
from bitsmith.spec import QuantSpec

Qdq = Callable[[torch.Tensor], torch.Tensor]  # float32 [rows, in] -> its quantize-dequantize
CHUNK_WEIGHTS = 1 << 18  # weights per row chunk of a loss evaluation (~1 MB of float32)


def minmax_qdq(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``rtn(weight, spec, None, {"clip_search": False}).dequantize()``, the same values, float32."""
    groups = to_groups(weight.float(), spec)  # [out, G, gs]
    lo, hi = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)  # 2x faster than aminmax
    scale, zero = affine_params(lo, hi, spec)
    scale, zero = scale.half().float(), zero.half().float()  # what the checkpoint stores
    q = groups / scale
    q.add_(zero).round_().clamp_(0, spec.qmax).sub_(zero).mul_(scale)
    return from_groups(q, weight.shape[1])


def simulated_quantizer(spec: QuantSpec, method: Method, options: dict) -> Qdq:
    """The quantize-dequantize the searches simulate: :func:`minmax_qdq` for min/max RTN on a uniform
    grid, else the method itself (``stats=None``)."""
    from bitsmith.methods.rtn import rtn

    if method is rtn and options.get("clip_search", True) is False and spec.grid == "uniform":
        return lambda w: minmax_qdq(w, spec)
    return lambda w: method(w.float(), spec, None, options).dequantize()


def search_dtype(choice: str) -> torch.dtype:
    """``awq_search_dtype`` as a torch dtype: bf16, fp32, or auto (bf16 where bf16 matmuls pay on this
    CPU: ``kernels.cpu.fast_bf16_matmul``)."""
    if choice == "auto":
        from bitsmith.kernels.cpu import fast_bf16_matmul

        return torch.bfloat16 if fast_bf16_matmul() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[choice]


def token_basis(x: torch.Tensor, max_rows: int = 0) -> tuple[torch.Tensor, int]:
    """(Z, T): rows Z [r, in] with ``Z^T Z = X^T X`` for the tokens used, and their count T.

    With more tokens than channels, Z [in, in] is upper triangular: exact (up to float rounding) for
    every token. ``max_rows`` > 0 bounds r where that cannot help (more than ``max_rows`` tokens *and*
    channels, e.g. the 8,960-wide input of Qwen's down_proj): ``max_rows`` evenly spaced tokens."""
    x = x.reshape(-1, x.shape[-1]).float()
    if 0 < max_rows < min(x.shape):
        x = x.index_select(0, torch.linspace(0, x.shape[0] - 1, max_rows).round().long())
    tokens = x.shape[0]
    if tokens <= x.shape[1]:
        return x, tokens
    # R with R^T R = X^T X: the Cholesky factor of the Gram matrix (one float32 GEMM, then a float64
    # factorisation of [in, in]; ~2x faster than Householder QR of X here). A Gram matrix that is only
    # semi-definite (collinear channels) gets the QR factor instead, which needs no definiteness.
    gram = (x.T @ x).double()
    factor, info = torch.linalg.cholesky_ex(gram, upper=True)
    if int(info) != 0 or not torch.isfinite(factor).all():
        return torch.linalg.qr(x, mode="r").R, tokens
    return factor.float(), tokens


def output_error(
    basis: torch.Tensor, weights: list[torch.Tensor], scale: torch.Tensor, qdq: Qdq, chunk: int = CHUNK_WEIGHTS,
) -> float:
    """``sum_l ||Z (Q(W_l diag(s)) diag(s)^-1 - W_l)^T||^2`` with Z = ``basis`` (its dtype for the
    product), over row chunks of every weight on the cores; summed in chunk order."""
    items = [(i, rows) for i, w in enumerate(weights) for rows in row_chunks(w.shape[0], w.shape[1], chunk)]

    def one(item: tuple[int, slice]) -> float:
        i, rows = item
        w = weights[i][rows].float()
        delta = qdq(w * scale).div_(scale).sub_(w)  # [rows, in], float32
        out = basis @ delta.to(basis.dtype).T  # [r, rows]
        return float(torch.linalg.vector_norm(out, dtype=torch.float32)) ** 2  # one pass, float32 sums

    return sum(map_chunks(one, items))


def coarse_indices(n: int, step: int) -> list[int]:
    """The first pass of a coarse-to-fine search over candidates 0..n-1: every ``step``-th, and the last."""
    return sorted(set(range(0, n, max(1, step))) | {n - 1})


def fine_indices(best: int, n: int, step: int) -> list[int]:
    """The second pass: every candidate within ``step - 1`` of the first pass's best, not seen in it."""
    seen = set(coarse_indices(n, step))
    return [i for i in range(max(0, best - step + 1), min(n, best + step)) if i not in seen]


def search_indices(n: int, step: int, loss: Callable[[int], float]) -> dict[int, float]:
    """Losses of candidates 0..n-1, coarse to fine: every ``step``-th and the last, then every one within
    ``step - 1`` of the best of those (``step`` 1: all of them, in order). The minimum of a loss that is
    unimodal over the grid is found with at most ~n / step + 2 (step - 1) evaluations instead of n (20 -> 12
    at step 4). AWQ's alpha loss, summed over whole weights, is smooth enough for it; a clip ratio's
    per-group error is not (bench/results/calibrated-methods, session 25). Ties go to the lower index, as an
    exhaustive pass in order keeps the first minimum."""
    losses = {i: loss(i) for i in coarse_indices(n, step)}
    best = min(losses, key=lambda i: (losses[i], i))
    losses.update({i: loss(i) for i in fine_indices(best, n, step)})
    return losses


def scale_candidates(x_mean: torch.Tensor, w_mean: torch.Tensor | None, grid: int) -> list[tuple[float, torch.Tensor]]:
    """AWQ eq. 5's candidates (alpha, s [in]): ``s = s_x^alpha`` (``/ s_w^(1-alpha)`` with duo), normalised
    by ``sqrt(max s * min s)``; alpha = i / grid for i < grid (alpha 0 is the plain method)."""
    out = []
    for i in range(grid):
        alpha = i / grid
        s = x_mean.pow(alpha).clamp_min(1e-4)
        if w_mean is not None:
            s = s / w_mean.pow(1 - alpha).clamp_min(1e-4)
        out.append((alpha, s / (s.max() * s.min()).sqrt()))
    return out


def group_gram(inputs: torch.Tensor, spec: QuantSpec, in_features: int) -> torch.Tensor:
    """Per-group Gram matrices ``X_g^T X_g`` [G, gs, gs] of inputs [T, in] (zero rows/columns on padding)."""
    n_groups, width = spec.groups_per_row(in_features), spec.group_width(in_features)
    x = torch.zeros(inputs.shape[0], n_groups * width, dtype=torch.float32, device=inputs.device)
    x[:, :in_features] = inputs.float()
    x = x.view(-1, n_groups, width).transpose(0, 1)  # [G, T, gs]
    return x.transpose(1, 2) @ x


def clip_errors(delta: torch.Tensor, gram: torch.Tensor, tokens: int) -> torch.Tensor:
    """Per (row, group) mean over tokens of the group's output error squared, [out, G]:
    ``delta_{o,g} H_g delta_{o,g}^T / T`` for delta [out, G, gs] and gram [G, gs, gs]; the product
    in gram's dtype, sums in float32. The transform passes float32 (``awq_clip_dtype``): where the inputs
    share a large component the quadratic form cancels and bf16's rounding of H_g picks other ratios."""
    d = delta.transpose(0, 1)  # [G, out, gs], float32
    return (torch.bmm(d.to(gram.dtype), gram).float() * d).sum(-1).transpose(0, 1) / max(tokens, 1)
