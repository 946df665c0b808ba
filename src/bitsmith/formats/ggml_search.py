"""Scale searches of llama.cpp's reference quantizers, vectorised over many groups at once.

These are the inner loops of ggml's `quantize_row_*_ref` / `quantize_row_*_impl` (ggml-quants.c):
given groups of weights `x` (G, n) they pick a scale (and for the asymmetric types a min) and
integer levels `L`. Each function here follows one C routine step for step, re-expressed over a
batch of groups:

- `fit_symmetric`       ~ make_qx_quants(rmse_type=1): scale = argmax of sum(w x l)^2 / sum(w l^2)
                          over 19 candidate inverse scales (nmax + 0.1 k) / max, k = -9..9.
- `fit_symmetric_q3`    ~ make_q3_quants(do_rmse=true): one rounding then up to 5 passes of
                          per-weight coordinate descent on the same objective, weights x^2.
- `fit_scale_min`       ~ make_qkx2_quants / make_qkx3_quants: for each candidate inverse scale,
                          round, then solve the weighted least-squares line x ~ scale*L + min in
                          closed form (min clamped <= 0); keep the candidate of least weighted error.
- `fit_positive_levels` ~ make_qp_quants: quantize non-negative super-scales to 0..nmax with a
                          weighted coordinate descent (the imatrix path of the k-quants).

Bit-exactness rules followed throughout (why the code looks the way it does):
- all arithmetic is float32, operations in the C evaluation order ((w*x)*l, not w*(x*l));
- sums are sequential left-to-right like the C loops (`seq_sum`), where `np.sum` would add
  pairwise and round differently;
- `nearest_int` in C is round-half-to-even (the 1.5*2^23 trick), i.e. `np.rint`;
- "first strictly greater" maxima in C are `argmax` (first occurrence) in numpy.
This reproduces the C code compiled without FMA contraction (x86-64 baseline, as ggml's own
non-native build); a build that fuses multiply-adds (-march=native with GCC's default
-ffp-contract=fast) can differ from it, and from itself across machines, in rare last-bit ties.
The two C variants qkx2/qkx3 differ only for non-finite inputs, which callers reject first.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)  # ggml's threshold below which a group counts as all zero


def seq_sum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis in float32, left to right, exactly as a C `for` loop does.

    np.sum would add pairwise (different rounding); an explicit loop over the (short) group axis
    keeps C's order and is vectorised over all groups.
    """
    total = a[..., 0].astype(F32, copy=True)
    for i in range(1, a.shape[-1]):
        total += a[..., i]
    return total


def rint_int(v: np.ndarray) -> np.ndarray:
    """C `nearest_int` (round half to even) as int32; clipped first so the cast never overflows."""
    return np.rint(np.clip(v, F32(-4194303), F32(4194303))).astype(np.int32)


def round_clip(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """`MAX(lo, MIN(hi, nearest_int(v)))` as int32 (NaN, possible only on rejected input, -> lo)."""
    return np.clip(np.rint(np.clip(v, F32(lo - 1), F32(hi + 1))), lo, hi).astype(np.int32)


def _first(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """x[g, idx[g]] for each group g: x (G, n), idx (G,)."""
    return np.take_along_axis(x, idx[:, None], axis=-1)[:, 0]


def _first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(|x| max, the signed value that attains it first) per row of x (G, n)."""
    idx = np.abs(x).argmax(axis=-1)[:, None]  # (G, 1)
    value = np.take_along_axis(x, idx, axis=-1)[:, 0]  # (G,)
    return np.abs(value), value


def fit_symmetric(x: np.ndarray, nmax: int, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, weights): returns (scale (G,), levels (G, n) in 0..2*nmax-1).

    weights None means w = x^2 (the reference path); levels are stored offset by +nmax.
    """
    amax, vmax = _first_absmax(x)
    zero = amax < GROUP_MAX_EPS  # (G,) groups that quantize to all-zero
    vmax = np.where(zero, F32(1), vmax)
    w = x * x if weights is None else weights  # (G, n)
    wx = w * x  # (G, n): C computes w*x[i]*l as (w*x[i])*l

    def candidate(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lev = round_clip(iscale[:, None] * x, -nmax, nmax - 1)  # (G, n)
        lf = lev.astype(F32)
        return lev, seq_sum(wx * lf), seq_sum(w * lf * lf)

    levels, sumlx, suml2 = candidate(F32(-nmax) / vmax)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, F32(1)), F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(step)) / vmax
        lev, slx, sl2 = candidate(iscale)
        better = (sl2 > 0) & (slx * slx > best * sl2)  # same ratio test as C, no division
        levels = np.where(better[:, None], lev, levels)
        scale = np.where(better, slx / np.where(better, sl2, F32(1)), scale)
        best = np.where(better, scale * slx, best)
    levels = np.where(zero[:, None], 0, levels + nmax)
    return np.where(zero, F32(0), scale).astype(F32), levels


def fit_symmetric_q3(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true): (scale (G,), levels (G, n) in 0..2*nmax-1).

    A group whose pass changes nothing is at a fixed point, so running every group for all 5
    passes gives the same result as C's per-group early exit.
    """
    amax, vmax = _first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    vmax = np.where(zero, F32(1), vmax)
    lev = round_clip((F32(-nmax) / vmax)[:, None] * x, -nmax, nmax - 1)  # (G, n)
    w = x * x
    wx = w * x
    lf = lev.astype(F32)
    sumlx, suml2 = seq_sum(wx * lf), seq_sum(w * lf * lf)
    for _ in range(5):
        changed = False
        for i in range(x.shape[1]):  # sequential on purpose: each update feeds the next
            li = lev[:, i].astype(F32)
            slx = sumlx - wx[:, i] * li
            sl2 = suml2 - w[:, i] * li * li
            pos = slx > 0
            new = round_clip(x[:, i] * sl2 / np.where(pos, slx, F32(1)), -nmax, nmax - 1)
            nf = new.astype(F32)
            slx = slx + wx[:, i] * nf
            sl2 = sl2 + w[:, i] * nf * nf
            take = pos & (new != lev[:, i]) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            if take.any():
                changed = True
                lev[:, i] = np.where(take, new, lev[:, i])
                sumlx = np.where(take, slx, sumlx)
                suml2 = np.where(take, sl2, suml2)
        if not changed:
            break
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0))
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero[:, None], 0, lev + nmax)


def _weighted_error(w: np.ndarray, x: np.ndarray, lev: np.ndarray, scale: np.ndarray,
                    vmin: np.ndarray, use_mad: bool) -> np.ndarray:
    """sum_i w_i * |scale*L_i + min - x_i| (or squared), sequential like C. Shapes (G, n) -> (G,)."""
    diff = scale[:, None] * lev.astype(F32) + vmin[:, None] - x
    diff = np.abs(diff) if use_mad else diff * diff
    return seq_sum(w * diff)


def fit_scale_min(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float,
                  nstep: int, use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants / make_qkx3_quants: returns (scale (G,), -min (G,) >= 0, levels (G, n) in 0..nmax).

    Decoded value is scale*L - (-min). Candidate inverse scales are (rmin + rdelta*k + nmax)/(max-min)
    for k = 0..nstep; note `min` itself moves when a candidate wins, as in C.
    """
    vmin = _first(x, x.argmin(axis=-1))  # (G,) C keeps the first of tied minima (-0.0 vs 0.0)
    vmin = np.where(vmin > 0, F32(0), vmin)
    vmax = x.max(axis=-1)
    flat = vmax <= vmin  # all equal to 0, or constant >= 0 clipped to a zero range
    sum_w = seq_sum(weights)
    sum_x = seq_sum(weights * x)
    span = np.where(flat, F32(1), vmax - vmin)
    iscale = F32(nmax) / span
    scale = F32(1) / iscale
    lev = round_clip(iscale[:, None] * (x - vmin[:, None]), 0, nmax)  # (G, n)
    best = _weighted_error(weights, x, lev, scale, vmin, use_mad)
    for step in range(nstep + 1):
        span = np.where(flat, F32(1), vmax - vmin)
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / span
        aux = round_clip(iscale[:, None] * (x - vmin[:, None]), 0, nmax)
        af = aux.astype(F32)
        wl = weights * af
        sum_l, sum_l2, sum_xl = seq_sum(wl), seq_sum(wl * af), seq_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = np.where(ok, det, F32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clamp = this_min > 0  # a positive min is not representable: refit the scale alone
        this_min = np.where(clamp, F32(0), this_min)
        this_scale = np.where(clamp, sum_xl / np.where(clamp, sum_l2, F32(1)), this_scale)
        err = _weighted_error(weights, x, aux, this_scale, this_min, use_mad)
        better = ok & (err < best) & ~flat
        lev = np.where(better[:, None], aux, lev)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        vmin = np.where(better, this_min, vmin)
    lev = np.where(flat[:, None], 0, lev)
    return np.where(flat, F32(0), scale).astype(F32), (-vmin).astype(F32), lev


def fit_positive_levels(x: np.ndarray, nmax: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants(n, nmax, x, L, weights): (scale (G,), levels (G, n)) for x >= 0.

    Levels are returned as the bytes C stores (uint8 semantics, so a negative level wraps).
    """
    vmax = np.maximum(x.max(axis=-1), F32(0))
    zero = vmax < GROUP_MAX_EPS
    vmax = np.where(zero, F32(1), vmax)
    iscale = F32(nmax) / vmax
    scale = F32(1) / iscale
    lev0 = (rint_int(iscale[:, None] * x) & 0xFF).astype(F32)  # C stores into uint8_t
    diff = x - scale[:, None] * lev0
    best = seq_sum(weights * diff * diff)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_k = (F32(0.1) * F32(step) + F32(nmax)) / vmax
        scale_k = F32(1) / iscale_k
        lk = np.minimum(nmax, rint_int(iscale_k[:, None] * x)).astype(F32)
        diff = x - scale_k[:, None] * lk
        mse = seq_sum(weights * diff * diff)
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, iscale_k, iscale)
    lint = np.minimum(nmax, rint_int(iscale[:, None] * x))  # (G, n) as C's int l
    lf = lint.astype(F32)
    wx = weights * x
    sumlx, suml2 = seq_sum(wx * lf), seq_sum(weights * lf * lf)
    lev = lint & 0xFF  # what L[i] holds
    for _ in range(5):
        changed = False
        for i in range(x.shape[1]):
            li = lev[:, i].astype(F32)
            slx = sumlx - wx[:, i] * li
            sl2 = suml2 - weights[:, i] * li * li
            ok = (slx > 0) & (sl2 > 0)
            new = np.minimum(nmax, rint_int(x[:, i] * sl2 / np.where(ok, slx, F32(1))))
            nf = new.astype(F32)
            slx = slx + wx[:, i] * nf
            sl2 = sl2 + weights[:, i] * nf * nf
            take = ok & (new != lev[:, i]) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            if take.any():
                changed = True
                lev[:, i] = np.where(take, new & 0xFF, lev[:, i])
                sumlx = np.where(take, slx, sumlx)
                suml2 = np.where(take, sl2, suml2)
        if not changed:
            break
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0))
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero[:, None], 0, lev)
