"""GGUF tensor types: a table of block layouts, and vectorised numpy encoders/decoders for them.

    encode(weights (..., cols) float, "Q4_K", importance=None) -> uint8 (..., cols/256*144)
    decode(data, "Q4_K", shape) -> float32 shape

Supported: F32, F16, BF16, the legacy 32-weight blocks Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
(w = d*q or d*q + m, one fp16 d (and m) per block) and the k-quants Q2_K..Q6_K (ggml_kquants.py).
Every function works on all blocks of the tensor at once.

Fidelity, by type (reference: llama.cpp ggml-quants.c, and gguf-py's numpy port, gguf.quants):
- Encoders without importance are bit-exact with gguf-py's `quantize` (F32, F16, BF16, Q4_0,
  Q4_1, Q5_0, Q5_1, Q8_0), a port of the C `quantize_row_*_ref` functions, with one exception
  where we follow C: in blocks holding -0.0, C keeps the first of tied extremes (and +0.0 for
  an all-zero block) while gguf-py's numpy min/max may pick the other zero, so a stored d or m
  can differ in the sign of zero (decoded values then still compare equal).
- gguf-py has no k-quant quantizer; the k-quant encoders follow the C reference step for step
  (see ggml_search.py for the float32 evaluation-order rules). All quantized types, with and
  without importance, matched ggml's C code byte for byte (ggml commit d99724f, x86-64 build
  without FMA); the test suite repeats that check when BITSMITH_GGML_LIB names such a library.
- With `importance` (per-input-column weights, llama.cpp's imatrix: mean squared activation of
  each input feature), Q4_0..Q5_1 and the k-quants follow the C `quantize_row_*_impl` paths;
  Q8_0 and the float types ignore it, as llama.cpp does.
- Decoders reproduce gguf-py's `dequantize` bit for bit for every type here.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from . import ggml_kquants as kq
from .ggml_kquants import half_bytes, half_read
from .ggml_search import F32, fit_scale_min, fit_symmetric, seq_sum


class Family(enum.Enum):
    """How a type stores weights: plain floats, 32-weight legacy blocks, or 256-weight k-quant super-blocks."""

    FLOAT = "float"
    LEGACY = "legacy"
    KQUANT = "kquant"


@dataclass(frozen=True)
class GGMLType:
    """One GGUF tensor type.

    type_id: the ggml_type enum value written in GGUF files. block_size weights are stored in
    type_size bytes. half_fields: byte offsets, within a block, of the 16-bit floats (scales, or
    the values themselves for F16/BF16) that must stay finite.
    """

    name: str
    type_id: int
    block_size: int
    type_size: int
    family: Family
    half_fields: tuple[int, ...] = ()
    bfloat: bool = False  # the 16-bit fields are bfloat16 rather than IEEE half

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, cols: int) -> int:
        """Bytes one row of `cols` weights takes (cols must be a multiple of block_size)."""
        return cols // self.block_size * self.type_size


_TYPES = (
    GGMLType("F32", 0, 1, 4, Family.FLOAT),
    GGMLType("F16", 1, 1, 2, Family.FLOAT, (0,)),
    GGMLType("BF16", 30, 1, 2, Family.FLOAT, (0,), bfloat=True),
    GGMLType("Q4_0", 2, 32, 18, Family.LEGACY, (0,)),
    GGMLType("Q4_1", 3, 32, 20, Family.LEGACY, (0, 2)),
    GGMLType("Q5_0", 6, 32, 22, Family.LEGACY, (0,)),
    GGMLType("Q5_1", 7, 32, 24, Family.LEGACY, (0, 2)),
    GGMLType("Q8_0", 8, 32, 34, Family.LEGACY, (0,)),
    GGMLType("Q2_K", 10, 256, 84, Family.KQUANT, (80, 82)),
    GGMLType("Q3_K", 11, 256, 110, Family.KQUANT, (108,)),
    GGMLType("Q4_K", 12, 256, 144, Family.KQUANT, (0, 2)),
    GGMLType("Q5_K", 13, 256, 176, Family.KQUANT, (0, 2)),
    GGMLType("Q6_K", 14, 256, 210, Family.KQUANT, (208,)),
)
GGML_TYPES: Mapping[str, GGMLType] = MappingProxyType({t.name: t for t in _TYPES})


def get_type(qtype: str | GGMLType) -> GGMLType:
    """Look a type up by name ("Q4_K", case-insensitive) or pass a GGMLType through."""
    if isinstance(qtype, GGMLType):
        return qtype
    found = GGML_TYPES.get(str(qtype).upper())
    if found is None:
        raise ValueError(f"unknown GGUF type {qtype!r}; supported types: {', '.join(GGML_TYPES)}")
    return found


# ------------------------------------------------------------------------------ float types


def _encode_float(t: GGMLType, x: np.ndarray) -> np.ndarray:
    if t.name == "F32":
        return x.astype("<f4").view(np.uint8)
    if t.name == "F16":
        return x.astype("<f2").view(np.uint8)
    u = x.astype("<f4").view(np.uint32).astype(np.uint64)  # BF16: round to nearest even
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").view(np.uint8)


def _decode_float(t: GGMLType, b: np.ndarray) -> np.ndarray:
    if t.name == "F32":
        return b.view("<f4").astype(F32)
    if t.name == "F16":
        return b.view("<f2").astype(F32)
    return (b.view("<u2").astype(np.uint32) << 16).view(F32)


# ------------------------------------------------------------------------------ legacy blocks


def _round_away(v: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero), exact: v - trunc(v) is exact in float32."""
    t = np.trunc(v)
    return t + np.sign(v) * (np.abs(v - t) >= F32(0.5))


def pack_legacy(q: np.ndarray, bits: int) -> list[np.ndarray]:
    """Levels (B, 32) -> [qh (B, 4) if 5-bit] + [qs (B, 16)]: qs[j] = q[j] low | q[j+16] high nibble."""
    q = q.astype(np.uint8)
    qs = (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)
    if bits == 4:
        return [qs]
    return [np.packbits(q >> 4, axis=-1, bitorder="little"), qs]  # bit j of a little-endian uint32


def _inv(d: np.ndarray) -> np.ndarray:
    """C `d ? 1.0f/d : 0.0f`."""
    return np.where(d == 0, F32(0), F32(1) / np.where(d == 0, F32(1), d))


def _legacy_ref(name: str, x: np.ndarray) -> np.ndarray:
    """quantize_row_{q4_0,q4_1,q5_0,q5_1,q8_0}_ref over blocks x (B, 32)."""
    if name == "Q8_0":
        d = np.abs(x).max(axis=1) / F32(127)
        q = _round_away(x * _inv(d)[:, None]).astype(np.int8)
        return np.concatenate([half_bytes(d), q.view(np.uint8)], axis=1)
    bits = 4 if name in ("Q4_0", "Q4_1") else 5
    top = (1 << bits) - 1
    if name in ("Q4_0", "Q5_0"):  # symmetric: the largest-magnitude weight maps to level 0
        vmax = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], 1)[:, 0]
        vmax = np.where(vmax == 0, F32(0), vmax)  # C starts from +0.0 and keeps it for an all-zero block
        d = vmax / F32(-(1 << (bits - 1)))
        q = np.clip(np.trunc(x * _inv(d)[:, None] + F32((1 << (bits - 1)) + 0.5)), 0, top)
        return np.concatenate([half_bytes(d), *pack_legacy(q, bits)], axis=1)
    # the first minimum / maximum, as C's `if (v < min)` scans keep them: this decides the sign
    # of a zero min or range (-0.0 vs 0.0) where numpy's min/max (and so gguf-py) may pick either
    vmin = np.take_along_axis(x, x.argmin(axis=1)[:, None], 1)[:, 0]
    vmax = np.take_along_axis(x, x.argmax(axis=1)[:, None], 1)[:, 0]
    d = (vmax - vmin) / F32(top)
    q = np.clip(np.trunc((x - vmin[:, None]) * _inv(d)[:, None] + F32(0.5)), 0, top)
    return np.concatenate([half_bytes(d), half_bytes(vmin), *pack_legacy(q, bits)], axis=1)


def _legacy_impl(name: str, rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """quantize_row_{q4_0,q4_1,q5_0,q5_1}_impl: importance-weighted search. rows (R, C), qw (C,)."""
    sigma2 = seq_sum(rows * rows) / F32(rows.shape[1])  # (R,) mean square over the whole row
    w = (qw[None, :] * np.sqrt(sigma2[:, None] + rows * rows)).reshape(-1, 32)  # (B, 32)
    x = rows.reshape(-1, 32)
    bits = 4 if name in ("Q4_0", "Q4_1") else 5
    if name in ("Q4_0", "Q5_0"):
        d, lev = fit_symmetric(x, 1 << (bits - 1), w)
        return np.concatenate([half_bytes(d), *pack_legacy(lev, bits)], axis=1)
    d, neg_min, lev = fit_scale_min(x, w, (1 << bits) - 1, -0.9, 0.05, 36, use_mad=False)
    return np.concatenate([half_bytes(d), half_bytes(-neg_min), *pack_legacy(lev, bits)], axis=1)


def _decode_legacy(name: str, b: np.ndarray) -> np.ndarray:
    """(B, type_size) -> (B, 32) float32, in gguf-py's order of operations."""
    d = half_read(b[:, 0:2])
    if name == "Q8_0":
        return b[:, 2:].view(np.int8).astype(F32) * d
    asym = name in ("Q4_1", "Q5_1")
    start = 4 if asym else 2
    if name in ("Q5_0", "Q5_1"):
        qh = np.unpackbits(b[:, start:start + 4], axis=-1, bitorder="little")  # (B, 32)
        start += 4
    else:
        qh = np.zeros((b.shape[0], 32), np.uint8)
    qs = b[:, start:start + 16]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=1) | (qh << 4)  # (B, 32)
    if asym:
        return d * q.astype(F32) + half_read(b[:, 2:4])
    return d * (q.astype(np.int8) - np.int8(16 if name == "Q5_0" else 8)).astype(F32)


# ------------------------------------------------------------------------------ public API

_CHUNK_WEIGHTS = 1 << 16  # rows are encoded ~64k weights at a time: the search's temporaries stay in cache

_KQUANT: Mapping[str, tuple[Callable[..., np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "Q2_K": (kq.encode_q2_k, kq.decode_q2_k),
    "Q3_K": (kq.encode_q3_k, kq.decode_q3_k),
    "Q4_K": (kq.encode_q4_k, kq.decode_q4_k),
    "Q5_K": (kq.encode_q5_k, kq.decode_q5_k),
    "Q6_K": (kq.encode_q6_k, kq.decode_q6_k),
}


def _check_row_length(t: GGMLType, cols: int) -> None:
    if cols % t.block_size:
        fix = ("use Q4_0/Q8_0 (block 32) for this tensor" if cols % 32 == 0
               else "pad the rows to a multiple of the block, or keep this tensor as F16/F32")
        raise ValueError(f"row length {cols} is not a multiple of {t.name}'s block of {t.block_size} weights; {fix}")


def _check_weights(weights: np.ndarray, t: GGMLType) -> np.ndarray:
    x = np.asarray(weights)
    if x.ndim == 0:
        raise ValueError(f"weights must have at least one axis (rows of weights); got a scalar for {t.name}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"weights must be a float array, got dtype {x.dtype}; convert it with .astype(np.float32)")
    x = np.ascontiguousarray(x, dtype=F32)
    _check_row_length(t, x.shape[-1])
    bad = ~np.isfinite(x)
    if bad.any():
        n_nan = int(np.isnan(x).sum())
        raise ValueError(
            f"weights contain {int(bad.sum())} non-finite values ({n_nan} NaN, {int(bad.sum()) - n_nan} inf) "
            f"out of {x.size}; GGUF {t.name} needs finite weights: fix or drop them before encoding")
    return x


def _check_importance(importance: np.ndarray, cols: int) -> np.ndarray:
    imp = np.asarray(importance, dtype=F32)
    if imp.shape != (cols,):
        raise ValueError(f"importance must have one weight per input column, shape ({cols},); got {imp.shape}")
    if not np.isfinite(imp).all() or (imp < 0).any():
        raise ValueError("importance must be finite and >= 0 (e.g. the mean squared activation of each input "
                         f"column); it has {int((~np.isfinite(imp)).sum())} non-finite and {int((imp < 0).sum())} negative values")
    return imp


def _check_halves(t: GGMLType, blocks: np.ndarray, x: np.ndarray) -> None:
    """Raise if a stored 16-bit float (a scale, or an F16/BF16 value) overflowed to inf.

    blocks (B, type_size) encoded; x (B, block_size) the weights they came from.
    """
    if not t.half_fields or blocks.size == 0:
        return
    fields = np.stack([blocks[:, o:o + 2] for o in t.half_fields], axis=1)  # (B, k, 2)
    u = np.ascontiguousarray(fields).view("<u2")[..., 0]  # (B, k)
    exp_mask = 0x7F80 if t.bfloat else 0x7C00
    bad = ((u & exp_mask) == exp_mask).any(axis=1)
    if bad.any():
        kind = "bfloat16" if t.bfloat else "float16"
        limit = "3.39e38" if t.bfloat else "65504"
        biggest = float(np.abs(x.reshape(blocks.shape[0], -1)[bad]).max())
        n_bad = int(bad.sum())
        what = ("value" if t.family is Family.FLOAT else "block") + ("s overflow" if n_bad > 1 else " overflows")
        raise ValueError(
            f"{n_bad} {t.name} {what} {kind} (max {limit}); the largest |weight| there is "
            f"{biggest:.3g}. {t.name} cannot store weights this large: keep this tensor as F32, "
            "or scale it down and fold the factor into a neighbouring tensor")


def encode(weights: np.ndarray, qtype: str | GGMLType, importance: np.ndarray | None = None) -> np.ndarray:
    """Encode float weights (..., cols) into GGUF blocks: uint8 array (..., row_bytes).

    importance: optional per-input-column weights, shape (cols,), >= 0 (llama.cpp's imatrix);
    used by Q4_0, Q4_1, Q5_0, Q5_1 and the k-quants, ignored by Q8_0 and float types.
    """
    t = get_type(qtype)
    x = _check_weights(weights, t)
    cols = x.shape[-1]
    imp = None if importance is None else _check_importance(importance, cols)
    out_shape = (*x.shape[:-1], t.row_bytes(cols))
    if x.size == 0:
        return np.zeros(out_shape, np.uint8)
    rows = x.reshape(-1, cols)  # (R, C)
    step = max(1, _CHUNK_WEIGHTS // cols)  # whole rows per chunk: bounds the search's temporaries
    out = np.concatenate([_encode_rows(t, rows[r:r + step], imp) for r in range(0, rows.shape[0], step)])
    _check_halves(t, out, rows.reshape(out.shape[0], t.block_size))
    return out.reshape(out_shape)


def _encode_rows(t: GGMLType, rows: np.ndarray, imp: np.ndarray | None) -> np.ndarray:
    """Encode rows (R, C) -> blocks (R * C / block_size, type_size), all blocks at once."""
    blocks = rows.reshape(-1, t.block_size)  # (B, block)
    with np.errstate(all="ignore"):  # only rejected (overflowing) inputs hit inf/NaN paths
        if t.family is Family.FLOAT:
            out = _encode_float(t, blocks).reshape(-1, t.type_size)
        elif t.family is Family.LEGACY:
            if imp is None or t.name == "Q8_0":
                out = _legacy_ref(t.name, blocks)
            else:
                out = _legacy_impl(t.name, rows, imp)
        else:
            qw = None if imp is None else np.broadcast_to(imp, rows.shape).reshape(-1, t.block_size)
            out = _KQUANT[t.name][0](blocks, qw)
    return out


def decode(data: np.ndarray | bytes | bytearray | memoryview, qtype: str | GGMLType,
           shape: tuple[int, ...]) -> np.ndarray:
    """Decode GGUF blocks back to float32 weights of `shape` (..., cols)."""
    t = get_type(qtype)
    shape = tuple(int(s) for s in shape)
    if not shape or min(shape) < 0:
        raise ValueError(f"shape must be a tuple of one or more non-negative sizes, got {shape}")
    _check_row_length(t, shape[-1])
    if isinstance(data, np.ndarray):
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    else:
        raw = np.frombuffer(data, dtype=np.uint8)
    n_blocks = math.prod(shape) // t.block_size
    if raw.size != n_blocks * t.type_size:
        raise ValueError(f"{t.name} data for shape {shape} must be {n_blocks * t.type_size} bytes "
                         f"({n_blocks} blocks of {t.type_size}), got {raw.size}; check the type and shape")
    blocks = raw.reshape(n_blocks, t.type_size)
    if n_blocks == 0:
        return np.zeros(shape, F32)
    if t.family is Family.FLOAT:
        out = _decode_float(t, blocks)
    elif t.family is Family.LEGACY:
        out = _decode_legacy(t.name, blocks)
    else:
        out = _KQUANT[t.name][1](blocks)
    return out.reshape(shape)
