"""The affine grid of encoded GGUF blocks, and re-packing them with new levels.

Every quantized GGUF type here decodes each weight as ``a * q + b`` with an integer level ``q`` in
``[lo, hi]`` and ``(a, b)`` shared by a sub-block of ``group`` weights (32 for the legacy types and
Q4_K/Q5_K, 16 for Q2_K/Q3_K/Q6_K). ``grid(data, qtype)`` reads ``(a, b)`` from the stored scales;
``with_levels(data, qtype, q)`` writes new levels into the blocks and keeps their scales. Together
they let a search outside the encoder (GPTQ error feedback, :mod:`bitsmith.io.gguf.encode`) choose
the levels while the file keeps llama.cpp's own block layout: decode(with_levels(d, t, q)) equals
``a * q + b`` up to float32 rounding of the decoder's order of operations.

Levels, per type: Q4_0 0..15 (``d (q - 8)``), Q5_0 0..31 (``d (q - 16)``), Q4_1/Q5_1 0..15/31
(``d q + m``), Q8_0 -128..127 (``d q``), Q2_K 0..3 and Q4_K/Q5_K 0..15/31 (``d sc q - dmin m``),
Q3_K -4..3 and Q6_K -32..31 (``d sc q``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ggml_kquants as kq
from .ggml_kquants import half_read
from .ggml_search import F32
from .ggml_types import get_type, pack_legacy

# type -> (lo, hi, group)
LEVELS = {"Q4_0": (0, 15, 32), "Q4_1": (0, 15, 32), "Q5_0": (0, 31, 32), "Q5_1": (0, 31, 32), "Q8_0": (-128, 127, 32),
          "Q2_K": (0, 3, 16), "Q3_K": (-4, 3, 16), "Q4_K": (0, 15, 32), "Q5_K": (0, 31, 32), "Q6_K": (-32, 31, 16)}


@dataclass(frozen=True)
class Grid:
    """a, b: float32 (rows, cols // group); level q of a weight in sub-block g decodes to a[g] q + b[g]."""

    a: np.ndarray
    b: np.ndarray
    lo: int
    hi: int
    group: int

    def quantize(self, w: np.ndarray, col: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest level of column ``col`` for weights w (rows,): (levels int32, their values)."""
        g = col // self.group
        a, b = self.a[:, g], self.b[:, g]
        safe = np.where(a == 0, F32(1), a)
        q = np.clip(np.rint((w - b) / safe), self.lo, self.hi).astype(np.int32)
        q = np.where(a == 0, self.lo, q)
        return q, a * q + b


def _blocks(data: np.ndarray, qtype: str) -> tuple[np.ndarray, int]:
    t = get_type(qtype)
    rows = data.shape[0] if data.ndim > 1 else 1
    return np.ascontiguousarray(data).reshape(-1, t.type_size), rows


def grid(data: np.ndarray, qtype: str) -> Grid:
    """The grid of GGUF blocks ``data`` (rows, row_bytes) of type ``qtype``."""
    if qtype not in LEVELS:
        raise ValueError(f"{qtype} has no level grid here; grids exist for {', '.join(LEVELS)}")
    lo, hi, group = LEVELS[qtype]
    blk, rows = _blocks(data, qtype)
    if qtype in ("Q4_0", "Q5_0", "Q8_0", "Q4_1", "Q5_1"):
        d = half_read(blk[:, 0:2])[:, 0]
        if qtype in ("Q4_1", "Q5_1"):
            b = half_read(blk[:, 2:4])[:, 0]
        else:
            b = -d * F32({"Q4_0": 8, "Q5_0": 16, "Q8_0": 0}[qtype])
        a = d
    elif qtype == "Q2_K":
        sc = blk[:, :16]
        d, dmin = half_read(blk[:, 80:82]), half_read(blk[:, 82:84])
        a, b = d * (sc & 0xF).astype(F32), -(dmin * (sc >> 4).astype(F32))
    elif qtype == "Q3_K":
        a = half_read(blk[:, 108:110]) * kq._unpack_scales_q3(blk[:, 96:108]).astype(F32)
        b = np.zeros_like(a)
    elif qtype in ("Q4_K", "Q5_K"):
        sc, mn = kq._unpack_scales_k4(blk[:, 4:16])
        a = half_read(blk[:, 0:2]) * sc.astype(F32)
        b = -(half_read(blk[:, 2:4]) * mn.astype(F32))
    else:  # Q6_K
        a = half_read(blk[:, 208:210]) * blk[:, 192:208].view(np.int8).astype(F32)
        b = np.zeros_like(a)
    return Grid(a.reshape(rows, -1).astype(F32), b.reshape(rows, -1).astype(F32), lo, hi, group)


def with_levels(data: np.ndarray, qtype: str, q: np.ndarray) -> np.ndarray:
    """A copy of blocks ``data`` (rows, row_bytes) whose levels are ``q`` (rows, cols), scales kept."""
    lo, hi, _ = LEVELS[qtype]
    q = np.asarray(q)
    if q.min(initial=lo) < lo or q.max(initial=hi) > hi:
        raise ValueError(f"{qtype} levels must lie in {lo}..{hi}; got {int(q.min())}..{int(q.max())}")
    t = get_type(qtype)
    blk, rows = _blocks(data.copy(), qtype)
    lev = (q.reshape(-1, t.block_size) - lo).astype(np.int32)  # (B, block) >= 0
    if qtype == "Q8_0":
        blk[:, 2:] = (lev + lo).astype(np.int8).view(np.uint8)
    elif t.block_size == 32:  # Q4_0 Q4_1 Q5_0 Q5_1: levels after d (and m)
        start = 4 if qtype in ("Q4_1", "Q5_1") else 2
        packed = np.concatenate(pack_legacy(lev, 4 if qtype.startswith("Q4") else 5), axis=1)
        blk[:, start:start + packed.shape[1]] = packed
    elif qtype == "Q2_K":
        blk[:, 16:80] = kq._pack_crumbs(lev)
    elif qtype == "Q3_K":  # stored lev 0..7 is q + 4: the high bit set means q >= 0
        blk[:, :32] = kq._pack_bitplane(lev > 3)
        blk[:, 32:96] = kq._pack_crumbs(np.where(lev > 3, lev - 4, lev))
    elif qtype == "Q4_K":
        blk[:, 16:144] = kq._pack_nibbles_k(lev)
    elif qtype == "Q5_K":
        blk[:, 16:48] = kq._pack_bitplane(lev > 15)
        blk[:, 48:176] = kq._pack_nibbles_k(lev & 0xF)
    else:  # Q6_K, stored lev 0..63 is q + 32
        lv = lev.reshape(-1, 2, 4, 32).astype(np.uint8)
        low = lv & 0xF
        blk[:, :128] = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).reshape(-1, 128)
        qh = np.bitwise_or.reduce((lv >> 4) << np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1), axis=2)
        blk[:, 128:192] = qh.reshape(-1, 64)
    return blk.reshape(data.shape)
