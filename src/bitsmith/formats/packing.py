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


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: uint8 [rows, cols], every value < 2**bits -> uint8 [rows, ceil(cols/8)*bits]."""
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise ValueError(f"pack expects a 2-D uint8 code matrix, got {tuple(codes.shape)} {codes.dtype}")
    if not 2 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit codes; 2 to 8 bits are supported")
    rows, cols = codes.shape
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise ValueError(f"a code is {int(codes.max())}, too large for {bits} bits")
    runs = math.ceil(cols / 8)
    padded = torch.nn.functional.pad(codes, (0, runs * 8 - cols)).view(rows, runs, 8)
    if bits == 8:
        return padded.reshape(rows, runs * 8).clone()
    shifts = torch.arange(8, dtype=torch.int64, device=codes.device) * bits
    word = (padded.to(torch.int64) << shifts).sum(-1)  # [rows, runs], < 2**56
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF  # [rows, runs, bits]
    return out.to(torch.uint8).reshape(rows, runs * bits)


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
    if bits in (2, 4):  # whole codes per byte: code k of a byte sits at bits [k*bits, (k+1)*bits)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # [8 // bits]
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [rows, runs*bits, 8 // bits]
        return codes.reshape(rows, runs * 8)[:, :cols].contiguous()
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    word = (packed.view(rows, runs, bits).to(torch.int64) << byte_shifts).sum(-1)  # [rows, runs]
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [rows, runs, 8]
    return codes.to(torch.uint8).reshape(rows, runs * 8)[:, :cols].contiguous()
