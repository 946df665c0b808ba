"""GGUF k-quant super-blocks (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): encoders and decoders in numpy.

A super-block holds QK_K = 256 weights in 16 groups of 16 (Q2_K, Q3_K, Q6_K) or 8 groups of 32
(Q4_K, Q5_K). Each group has a small integer scale (and for Q2_K/Q4_K/Q5_K a min), and the
super-block has one or two fp16 factors those small integers multiply:

    w = d * sc_g * q              (Q3_K: q in -4..3, sc 6-bit signed; Q6_K: q in -32..31, sc int8)
    w = d * sc_g * q - dmin * m_g (Q2_K: q 2-bit, sc/m 4-bit; Q4_K: q 4-bit, Q5_K: q 5-bit, sc/m 6-bit)

Encoding follows llama.cpp's ggml-quants.c: without importance the `quantize_row_*_ref` path, with
importance (per-input-column weights, llama.cpp's "imatrix") the `quantize_row_*_impl` path, whose
per-weight weights are importance * sqrt(sigma2 + x^2). Both search the group scales
(ggml_search.py), quantize the group scales to the super-block grid, then re-round every weight
against the stored (fp16-rounded) scales.

Bit-exact with ggml's C code (checked against ggml commit d99724f built without FMA contraction,
ref and imatrix paths); the tests repeat that only when BITSMITH_GGML_LIB names such a library,
and otherwise check the round trip through gguf-py's dequantizer (gguf-py has no k-quant quantizer).
"""

from __future__ import annotations

import numpy as np

from .ggml_search import (
    F32,
    GROUP_MAX_EPS,
    fit_positive_levels,
    fit_scale_min,
    fit_symmetric,
    fit_symmetric_q3,
    rint_int,
    round_clip,
    seq_sum,
)

QK_K = 256


def half_bytes(v: np.ndarray) -> np.ndarray:
    """(B,) float32 -> (B, 2) uint8: the fp16 (round to nearest even) bytes, little-endian."""
    return v.astype("<f2").reshape(-1, 1).view(np.uint8)


def half_read(b: np.ndarray) -> np.ndarray:
    """(B, 2) uint8 -> (B, 1) float32."""
    return np.ascontiguousarray(b).view("<f2").astype(F32)


def _pack_crumbs(lev: np.ndarray) -> np.ndarray:
    """2-bit levels (B, 256) -> (B, 64): byte 32h+l holds levels 128h + 32k + l in bits 2k..2k+1."""
    lev = lev.reshape(-1, 2, 4, 32).astype(np.uint8)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return np.bitwise_or.reduce(lev << shifts, axis=2).reshape(-1, 64)


def _unpack_crumbs(qs: np.ndarray) -> np.ndarray:
    """(B, 64) -> (B, 256) 2-bit levels (inverse of _pack_crumbs)."""
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, QK_K)


def _pack_bitplane(bits: np.ndarray) -> np.ndarray:
    """(B, 256) booleans -> (B, 32): bit b of byte m is element 32b + m."""
    return np.packbits(bits.reshape(-1, 8, 32).transpose(0, 2, 1), axis=-1, bitorder="little")[..., 0]


def _unpack_bitplane(mask: np.ndarray) -> np.ndarray:
    """(B, 32) -> (B, 256) of 0/1 (inverse of _pack_bitplane)."""
    bits = np.unpackbits(mask[..., None], axis=-1, bitorder="little")  # (B, 32, 8)
    return bits.transpose(0, 2, 1).reshape(-1, QK_K)


def _pack_nibbles_k(lev: np.ndarray) -> np.ndarray:
    """4-bit levels (B, 256) -> (B, 128): byte 32c + l holds levels 64c + l (low) and 64c + 32 + l (high)."""
    lev = lev.reshape(-1, 4, 2, 32).astype(np.uint8)
    return (lev[:, :, 0] | (lev[:, :, 1] << 4)).reshape(-1, 128)


def _unpack_nibbles_k(qs: np.ndarray) -> np.ndarray:
    qs = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(-1, QK_K)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins (B, 8) ints -> 12 bytes (B, 12), as C stores them (uint8 wraps)."""
    ls, lm = ls.astype(np.int32), lm.astype(np.int32)
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return (np.concatenate([lo, mid, hi], axis=1) & 0xFF).astype(np.uint8)


def _unpack_scales_k4(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes (B, 12) -> (scales, mins), each (B, 8) uint8 in 0..63 (ggml's get_scale_min_k4)."""
    lo, mid, hi = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc, mn


def _pack_scales_q3(lev: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit scales (B, 16) in 0..63 -> 12 bytes: low nibbles of j and j+8 share byte j,
    the high 2 bits of scale j go to byte 8 + j%4 at bit 2*(j//4)."""
    lev = lev.astype(np.int32)
    low = (lev[:, :8] & 0xF) | ((lev[:, 8:] & 0xF) << 4)
    high = ((lev >> 4) & 3).reshape(-1, 4, 4) << (2 * np.arange(4).reshape(1, 4, 1))
    return np.concatenate([low, np.bitwise_or.reduce(high, axis=1)], axis=1).astype(np.uint8)


def _unpack_scales_q3(b: np.ndarray) -> np.ndarray:
    """12 bytes (B, 12) -> sixteen signed scales (B, 16) int32 in -32..31."""
    low = np.concatenate([b[:, :8] & 0xF, b[:, :8] >> 4], axis=1).astype(np.int32)
    high = (b[:, 8:12].reshape(-1, 1, 4) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1)) & 3
    return (low | (high.reshape(-1, 16).astype(np.int32) << 4)) - 32


def _requantize(x: np.ndarray, lev: np.ndarray, d: np.ndarray, dm: np.ndarray | None, lo: int, hi: int) -> np.ndarray:
    """Re-round every weight against the stored group scales; groups whose scale is 0 keep `lev`.

    x, lev (B, G, n); d, dm (B, G) float32 effective scale / min. Returns levels offset to >= 0.
    """
    keep = d == 0
    safe = np.where(keep, F32(1), d)[..., None]
    num = x if dm is None else x + dm[..., None]
    new = round_clip(num / safe, lo, hi) - lo
    return np.where(keep[..., None], lev, new)


def _importance_weights(x: np.ndarray, qw: np.ndarray, sigma_factor: float) -> np.ndarray:
    """imatrix weights qw * sqrt(sigma2 + x^2), sigma2 = factor * mean(x^2) per super-block. x (B, 256)."""
    sigma2 = F32(sigma_factor) * seq_sum(x * x) / F32(QK_K)  # (B,); 1*s is exact, so one formula fits both
    return qw * np.sqrt(sigma2[:, None] + x * x)


# ---------------------------------------------------------------------------------------- Q2_K


def encode_q2_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """x (B, 256) float32, qw (B, 256) importance or None -> (B, 84) uint8 blocks."""
    nb = x.shape[0]
    g = x.reshape(nb * 16, 16)
    if qw is None:
        sc, mn, lev = fit_scale_min(g, np.abs(g), 3, -0.5, 0.1, 15, use_mad=True)
        sc, mn = sc.reshape(nb, 16), mn.reshape(nb, 16)
        max_sc = np.maximum(sc.max(axis=1), F32(0))
        max_mn = np.maximum(mn.max(axis=1), F32(0))
        has_sc, has_mn = max_sc > 0, max_mn > 0
        ls = np.where(has_sc[:, None], rint_int((F32(15) / np.where(has_sc, max_sc, F32(1)))[:, None] * sc), 0)
        lm = np.where(has_mn[:, None], rint_int((F32(15) / np.where(has_mn, max_mn, F32(1)))[:, None] * mn), 0)
        d, dmin = max_sc / F32(15), max_mn / F32(15)  # zero when the max is zero
    else:
        w = _importance_weights(x, qw, 1.0).reshape(nb * 16, 16)
        sw = seq_sum(w).reshape(nb, 16)
        sc, mn, lev = fit_scale_min(g, w, 3, -0.9, 0.05, 36, use_mad=False)
        d, ls = fit_positive_levels(sc.reshape(nb, 16), 15, sw)
        dmin, lm = fit_positive_levels(mn.reshape(nb, 16), 15, sw)
    scales = ((ls & 0xFF) | ((lm << 4) & 0xFF)).astype(np.uint8)  # (nb, 16)
    d_b, dmin_b = half_bytes(d), half_bytes(dmin)
    eff_d = half_read(d_b) * (scales & 0xF).astype(F32)  # (nb, 16)
    eff_m = half_read(dmin_b) * (scales >> 4).astype(F32)
    lev = _requantize(x.reshape(nb, 16, 16), lev.reshape(nb, 16, 16), eff_d, eff_m, 0, 3)
    return np.concatenate([scales, _pack_crumbs(lev), d_b, dmin_b], axis=1)


def decode_q2_k(b: np.ndarray) -> np.ndarray:
    """(B, 84) uint8 -> (B, 256) float32."""
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = half_read(b[:, 80:82]), half_read(b[:, 82:84])
    dl = (d * (scales & 0xF).astype(F32))[..., None]  # (B, 16, 1)
    ml = (dmin * (scales >> 4).astype(F32))[..., None]
    q = _unpack_crumbs(qs).reshape(-1, 16, 16).astype(F32)
    return (dl * q - ml).reshape(-1, QK_K)


# ---------------------------------------------------------------------------------------- Q3_K


def encode_q3_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """x (B, 256) -> (B, 110) uint8 blocks."""
    nb = x.shape[0]
    g = x.reshape(nb * 16, 16)
    if qw is None:
        sc, lev = fit_symmetric_q3(g, 4)
        sc = sc.reshape(nb, 16)
        max_sc = np.take_along_axis(sc, np.abs(sc).argmax(axis=1)[:, None], 1)[:, 0]  # first largest |scale|
        nz = max_sc != 0
        iscale = F32(-32) / np.where(nz, max_sc, F32(1))
        ls = np.where(nz[:, None], round_clip(iscale[:, None] * sc, -32, 31) + 32, 0)
        scales = np.where(nz[:, None], _pack_scales_q3(ls), 0).astype(np.uint8)
        d = np.where(nz, F32(1) / iscale, F32(0))
    else:
        w = _importance_weights(x, qw, 2.0).reshape(nb * 16, 16)
        sw = seq_sum(w).reshape(nb, 16)
        sc, lev = fit_symmetric(g, 4, w)
        d, ls = fit_symmetric(sc.reshape(nb, 16), 32, sw)
        scales = _pack_scales_q3(ls)
    d_b = half_bytes(d)
    eff_d = half_read(d_b) * _unpack_scales_q3(scales).astype(F32)  # (nb, 16)
    lev = _requantize(x.reshape(nb, 16, 16), lev.reshape(nb, 16, 16), eff_d, None, -4, 3).reshape(nb, QK_K)
    hmask = _pack_bitplane(lev > 3)
    qs = _pack_crumbs(np.where(lev > 3, lev - 4, lev))
    return np.concatenate([hmask, qs, scales, d_b], axis=1)


def decode_q3_k(b: np.ndarray) -> np.ndarray:
    """(B, 110) uint8 -> (B, 256) float32."""
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = half_read(b[:, 108:110])
    dl = (d * _unpack_scales_q3(scales).astype(F32))[..., None]  # (B, 16, 1)
    q = _unpack_crumbs(qs).astype(np.int8) - ((1 - _unpack_bitplane(hmask)) << 2).astype(np.int8)
    return (dl * q.reshape(-1, 16, 16).astype(F32)).reshape(-1, QK_K)


# ------------------------------------------------------------------------------- Q4_K and Q5_K


def _encode_k45(x: np.ndarray, qw: np.ndarray | None, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared Q4_K/Q5_K search: returns (header (B, 16) = d, dmin, 12 scale bytes; levels (B, 256))."""
    nb = x.shape[0]
    g = x.reshape(nb * 8, 32)
    if qw is None:
        av_x = np.sqrt(seq_sum(g * g) / F32(32))
        rmin, rdelta, nstep = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
        sc, mn, lev = fit_scale_min(g, av_x[:, None] + np.abs(g), nmax, rmin, rdelta, nstep, use_mad=False)
        sc, mn = sc.reshape(nb, 8), mn.reshape(nb, 8)
        max_sc = np.maximum(sc.max(axis=1), F32(0))
        max_mn = np.maximum(mn.max(axis=1), F32(0))
        inv_sc = np.where(max_sc > 0, F32(63) / np.where(max_sc > 0, max_sc, F32(1)), F32(0))
        inv_mn = np.where(max_mn > 0, F32(63) / np.where(max_mn > 0, max_mn, F32(1)), F32(0))
        ls = np.minimum(63, rint_int(inv_sc[:, None] * sc) & 0xFF)  # C: uint8_t then MIN(63, .)
        lm = np.minimum(63, rint_int(inv_mn[:, None] * mn) & 0xFF)
        d, dmin = max_sc / F32(63), max_mn / F32(63)
    else:
        w = _importance_weights(x, qw, 2.0).reshape(nb * 8, 32)
        sw = seq_sum(w).reshape(nb, 8)
        sc, mn, lev = fit_scale_min(g, w, nmax, -0.9, 0.05, 36, use_mad=False)
        d, ls = fit_positive_levels(sc.reshape(nb, 8), 63, sw)
        dmin, lm = fit_positive_levels(mn.reshape(nb, 8), 63, sw)
        if nmax == 31:  # Q5_K's impl clamps the 6-bit levels, Q4_K's does not (they are <= 63 anyway)
            ls, lm = np.minimum(63, ls), np.minimum(63, lm)
    scales = _pack_scales_k4(ls, lm)
    d_b, dmin_b = half_bytes(d), half_bytes(dmin)
    s6, m6 = _unpack_scales_k4(scales)
    eff_d = half_read(d_b) * s6.astype(F32)  # (nb, 8)
    eff_m = half_read(dmin_b) * m6.astype(F32)
    lev = _requantize(x.reshape(nb, 8, 32), lev.reshape(nb, 8, 32), eff_d, eff_m, 0, nmax)
    return np.concatenate([d_b, dmin_b, scales], axis=1), lev.reshape(nb, QK_K)


def encode_q4_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """x (B, 256) -> (B, 144) uint8 blocks: d, dmin, 12 scale bytes, 128 nibble bytes."""
    header, lev = _encode_k45(x, qw, 15)
    return np.concatenate([header, _pack_nibbles_k(lev)], axis=1)


def encode_q5_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """x (B, 256) -> (B, 176) uint8 blocks: d, dmin, 12 scale bytes, 32 high-bit bytes, 128 nibble bytes."""
    header, lev = _encode_k45(x, qw, 31)
    # high bit of level 64c + l goes to bit 2c of qh[l], of level 64c + 32 + l to bit 2c + 1
    return np.concatenate([header, _pack_bitplane(lev > 15), _pack_nibbles_k(lev & 0xF)], axis=1)


def _decode_k45(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    d, dmin = half_read(b[:, 0:2]), half_read(b[:, 2:4])
    sc, mn = _unpack_scales_k4(b[:, 4:16])
    dl = (d * sc.astype(F32))[..., None]  # (B, 8, 1)
    ml = (dmin * mn.astype(F32))[..., None]
    return (dl * q.reshape(-1, 8, 32).astype(F32) - ml).reshape(-1, QK_K)


def decode_q4_k(b: np.ndarray) -> np.ndarray:
    """(B, 144) uint8 -> (B, 256) float32."""
    return _decode_k45(b, _unpack_nibbles_k(b[:, 16:144]))


def decode_q5_k(b: np.ndarray) -> np.ndarray:
    """(B, 176) uint8 -> (B, 256) float32."""
    q = _unpack_nibbles_k(b[:, 48:176]) | (_unpack_bitplane(b[:, 16:48]) << 4)
    return _decode_k45(b, q)


# ---------------------------------------------------------------------------------------- Q6_K


def encode_q6_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """x (B, 256) -> (B, 210) uint8 blocks: 128 low-nibble bytes, 64 high-crumb bytes, 16 int8 scales, d."""
    nb = x.shape[0]
    sc, lev = fit_symmetric(x.reshape(nb * 16, 16), 32, qw.reshape(nb * 16, 16) if qw is not None else None)
    sc = sc.reshape(nb, 16)
    max_sc = np.take_along_axis(sc, np.abs(sc).argmax(axis=1)[:, None], 1)[:, 0]
    zero = np.abs(max_sc) < GROUP_MAX_EPS  # whole super-block stored as zeros
    iscale = F32(-128) / np.where(zero, F32(1), max_sc)
    scales = np.where(zero[:, None], 0, np.minimum(127, rint_int(iscale[:, None] * sc))).astype(np.int8)
    d_b = half_bytes(np.where(zero, F32(0), F32(1) / iscale))
    eff_d = half_read(d_b) * scales.astype(F32)
    lev = _requantize(x.reshape(nb, 16, 16), lev.reshape(nb, 16, 16), eff_d, None, -32, 31)
    lev = np.where(zero[:, None, None], 0, lev).reshape(nb, 2, 4, 32).astype(np.uint8)
    low = lev & 0xF
    ql = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).reshape(nb, 128)  # ql[64h + 32c + l]
    qh = np.bitwise_or.reduce((lev >> 4) << np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1), axis=2)
    return np.concatenate([ql, qh.reshape(nb, 64), scales.view(np.uint8), d_b], axis=1)


def decode_q6_k(b: np.ndarray) -> np.ndarray:
    """(B, 210) uint8 -> (B, 256) float32."""
    ql = b[:, :128].reshape(-1, 2, 2, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
    low = (ql & 0xF).transpose(0, 1, 3, 2, 4).reshape(-1, 2, 4, 32)  # level index 128h + 32k + l
    qh = (b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    q = (low | (qh << 4)).astype(np.int8) - np.int8(32)
    dl = (half_read(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(F32))[..., None]  # (B, 16, 1)
    return (dl * q.reshape(-1, 16, 16).astype(F32)).reshape(-1, QK_K)
