"""Bit packing of integer codes, 2 to 8 bits, row by row.

Layout (format version 1): each row of ``cols`` codes is padded with zeros to a multiple of 8 codes;
every run of 8 codes becomes ``bits`` bytes holding a little-endian bit stream, code ``i`` of the run
in bits ``[i*bits, (i+1)*bits)``. A row therefore costs ``ceil(cols / 8) * bits`` bytes, so the size
on disk is exactly what :meth:`bitsmith.spec.QuantSpec.stored_bits` counts. One rule serves every
width, including 3, 5 and 6 bits, and rows stay independently addressable.
"""

from __future__ import annotations

import math

import torch


def packed_row_bytes(cols: int, bits: int) -> int:
    return math.ceil(cols / 8) * bits


# Rows per slice of pack/unpack for 3, 5, 6 and 7 bits, whose int64 intermediates take ~14 bytes per
# code: a 151936 x 1536 embedding table (Qwen2.5's, at w6g128) in one go took ~3 GB of transient memory
# at load; in slices of 4096 rows it takes ~90 MB.
ROW_SLICE = 4096


def _by_row_slices(fn, src: torch.Tensor, width: int) -> torch.Tensor:
    """fn over row slices of ``src`` into one uint8 [rows, width] result."""
    out = torch.empty((src.shape[0], width), dtype=torch.uint8, device=src.device)
    for r0 in range(0, src.shape[0], ROW_SLICE):
        out[r0 : r0 + ROW_SLICE] = fn(src[r0 : r0 + ROW_SLICE])
    return out


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: uint8 [rows, cols], every value < 2**bits -> uint8 [rows, ceil(cols/8)*bits]."""
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise ValueError(f"pack expects a 2-D uint8 code matrix, got {tuple(codes.shape)} {codes.dtype}")
    if not 2 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit codes; 2 to 8 bits are supported")
    rows, cols = codes.shape
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise ValueError(f"a code is {int(codes.max())}, too large for {bits} bits")
    if rows > ROW_SLICE and 8 % bits:
        return _by_row_slices(lambda part: pack(part, bits), codes, packed_row_bytes(cols, bits))
    runs = math.ceil(cols / 8)
    # row-major bytes: the views below need them (a transposed code matrix is copied once here)
    padded = codes.contiguous() if runs * 8 == cols else torch.nn.functional.pad(codes, (0, runs * 8 - cols))
    if bits == 8:  # a fresh row-major copy (canonical strides, even for one row: callers view it as int32)
        return torch.empty((rows, runs * 8), dtype=torch.uint8, device=codes.device).copy_(padded)
    if 8 % bits == 0:  # 2 and 4 bits: whole codes per byte, code k of a byte at bits [k*bits, (k+1)*bits)
        per_byte = padded.view(rows, runs * bits, 8 // bits)
        out = per_byte[..., 0].clone()
        for k in range(1, 8 // bits):
            out |= per_byte[..., k] << (k * bits)
        return out
    return _pack_bytewise(padded.view(rows, runs, 8), bits).reshape(rows, runs * bits)


def _pack_bytewise(runs: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [rows, runs, 8] codes -> uint8 [rows, runs, bits]: byte j of a run is the OR of the codes
    whose bits [i*bits, (i+1)*bits) overlap [8j, 8j+8), each shifted into place in uint8 arithmetic
    (a left shift drops the bits that belong to the next byte, a right shift those of the previous).
    At most 3 codes touch a byte, so this is a few ops on 1/8-sized slices, and no int64 words."""
    out = torch.empty(*runs.shape[:-1], bits, dtype=torch.uint8, device=runs.device)
    for j in range(bits):
        acc = None
        for i in range(8):
            shift = i * bits - 8 * j  # where code i's lowest bit lands in byte j
            if shift >= 8 or shift + bits <= 0:
                continue
            part = runs[..., i] << shift if shift >= 0 else runs[..., i] >> -shift
            acc = part if acc is None else acc.bitwise_or_(part)
        out[..., j] = acc
    return out


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 [rows, ceil(cols/8)*bits] -> uint8 [rows, cols]."""
    rows = packed.shape[0]
    runs = math.ceil(cols / 8)
    if packed.dim() != 2 or packed.shape[1] != runs * bits:
        raise ValueError(
            f"packed codes have shape {tuple(packed.shape)}; {cols} {bits}-bit codes per row need {runs * bits} bytes"
        )
    if bits == 8:
        return packed[:, :cols].contiguous()
    if rows > ROW_SLICE and 8 % bits:
        return _by_row_slices(lambda part: unpack(part, bits, cols), packed, cols)
    if bits in (2, 4):  # whole codes per byte: code k of a byte sits at bits [k*bits, (k+1)*bits)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # [8 // bits]
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [rows, runs*bits, 8 // bits]
        return codes.reshape(rows, runs * 8)[:, :cols].contiguous()
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    word = (packed.view(rows, runs, bits).to(torch.int64) << byte_shifts).sum(-1)  # [rows, runs]
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [rows, runs, 8]
    return codes.to(torch.uint8).reshape(rows, runs * 8)[:, :cols].contiguous()
