"""GGUF matrices as bitsmith quantized tensors, read from their blocks (never dequantized to floats
on the way): ``gguf_quantized_tensors(path)``.

How each GGUF type maps onto bitsmith's affine group codes ``w = scale (code - zero)``:

- Q4_0 / Q5_0 / Q8_0 -> w4g32s / w5g32s / w8g32s: exact (``w = d (q - 8)``, ``d (q - 16)``, ``d q``;
  code = level + offset, scale = the stored fp16 ``d``).
- Q4_1 / Q5_1 -> w4g32 / w5g32: ``w = d q + m``: scale = ``d`` (exact), zero = ``-m / d`` rounded to
  fp16, so each weight may move by ``|d| |zero| 2^-11`` at most (fp16 rounding of the zero).
- Q4_K / Q5_K -> w4g32 / w5g32: ``w = (d sc) q - (dmin m)`` per 32-weight sub-block: scale =
  ``d sc`` and zero = ``dmin m / (d sc)``, both rounded to fp16 (relative error <= 2^-11 each).
- Q2_K, Q3_K, Q6_K use 16-weight sub-blocks, which bitsmith's group sizes (32..256) cannot hold:
  those tensors, and F16/F32/BF16 ones, stay floating point (logged). The maximum absolute difference
  from the GGUF decoder is logged per tensor.

llama q/k rows are un-permuted on the codes, scales and zeros alike (the converter's interleave).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

log = logging.getLogger(__name__)

SPEC_OF = {"Q4_0": "w4g32s", "Q5_0": "w5g32s", "Q8_0": "w8g32s", "Q4_1": "w4g32", "Q5_1": "w5g32",
           "Q4_K": "w4g32", "Q5_K": "w5g32"}
EXACT = frozenset({"Q4_0", "Q5_0", "Q8_0"})


def blocks_to_quantized(data: np.ndarray, qtype: str, shape: tuple[int, int]) -> tuple[QuantizedTensor, float]:
    """GGUF blocks (rows, row_bytes) of ``qtype`` -> (QuantizedTensor, max |difference| from gguf's decoder)."""
    from bitsmith.formats.ggml_grid import grid
    from bitsmith.formats.ggml_types import decode

    if qtype not in SPEC_OF:
        raise ValueError(f"GGUF {qtype} has no bitsmith group code (mappable: {', '.join(SPEC_OF)})")
    rows, cols = shape
    g = grid(data.reshape(rows, -1), qtype)
    values = decode(data, qtype, shape)  # only to read the levels back and to measure the mapping
    a = np.repeat(g.a, g.group, axis=1)
    b = np.repeat(g.b, g.group, axis=1)
    level = np.clip(np.rint((values - b) / np.where(a == 0, 1, a)), g.lo, g.hi)
    level = np.where(a == 0, g.lo, level)
    spec = QuantSpec.parse(SPEC_OF[qtype])
    codes = torch.from_numpy((level - g.lo).astype(np.uint8))
    if spec.symmetric:
        qt = QuantizedTensor(codes, torch.from_numpy(g.a).half(), None, spec)
    else:
        const = (g.a == 0) & (g.b != 0)  # a constant sub-block (all codes 0): w = |b| (0 + sign b) = b
        scale = np.where(const, np.abs(g.b), g.a)
        zero = np.where(g.a == 0, -np.sign(g.b), -g.b / np.where(g.a == 0, 1, g.a))
        qt = QuantizedTensor(codes, torch.from_numpy(scale).half(), torch.from_numpy(zero.astype(np.float32)).half(), spec)
    err = float(np.abs(qt.dequantize().numpy() - values).max(initial=0.0))
    return qt, err


def gguf_quantized_tensors(path: str | Path, modules: set[str] | None = None) -> tuple[dict[str, QuantizedTensor], list[str]]:
    """(HF module name -> QuantizedTensor for every 2-D weight of a mappable type, notes on the rest).
    ``modules``: only these module names (e.g. the model's linear and embedding modules)."""
    from bitsmith.io.gguf.header import read_header
    from bitsmith.io.gguf.names import unpermute_qk
    from bitsmith.models.family import GGUF_ARCHES

    path = Path(path)
    header = read_header(path)
    arch_name = str(header.metadata.get("general.architecture", "?"))
    arch = GGUF_ARCHES[arch_name]
    n_head = header.metadata.get(f"{arch_name}.attention.head_count", 0)
    n_head_kv = header.metadata.get(f"{arch_name}.attention.head_count_kv", n_head)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    from gguf import GGMLQuantizationType

    out: dict[str, QuantizedTensor] = {}
    notes: list[str] = []
    for info in header.tensors:
        stem, _, suffix = info.name.rpartition(".")
        parts = stem.split(".")
        if suffix != "weight" or len(info.shape) != 2:
            continue
        if len(parts) == 3 and parts[0] == "blk" and parts[2] in arch.block:
            module = f"model.layers.{parts[1]}.{arch.block[parts[2]]}"
        elif stem in arch.top:
            module = arch.top[stem]
        else:
            continue
        if modules is not None and module not in modules:
            continue
        qtype = GGMLQuantizationType(info.qtype).name
        if qtype not in SPEC_OF:
            if qtype not in ("F32", "F16", "BF16"):
                notes.append(f"{info.name}: {qtype} has no bitsmith group code (16-weight sub-blocks); kept as float32")
            continue
        rows = info.shape[0]
        data = np.asarray(raw[info.offset:info.offset + info.n_bytes]).reshape(rows, -1)
        qt, err = blocks_to_quantized(data, qtype, tuple(info.shape))
        if arch.permute_qk and stem.endswith((".attn_q", ".attn_k")):
            idx = torch.from_numpy(unpermute_qk(np.arange(rows), n_head if stem.endswith(".attn_q") else n_head_kv))
            qt = QuantizedTensor(qt.codes[idx], qt.scale[idx], None if qt.zero is None else qt.zero[idx], qt.spec)
        log.info("%s: GGUF %s -> %s, max |difference| %.3g%s", info.name, qtype, qt.spec, err,
                 "" if qtype in EXACT else " (fp16 rounding of scale/zero)")
        out[module] = qt
    for note in notes:
        log.info("%s: %s", path.name, note)
    return out, notes
