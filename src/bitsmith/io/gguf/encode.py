"""Tensors -> GGUF block bytes: exact re-encoding of bitsmith codes, and GPTQ error feedback on
llama.cpp's own grid.

Exact re-encoding (:func:`encode_exact`): a quantized layer whose grid a GGUF type stores as it is
keeps its codes, with no new rounding: ``w4g32s`` -> Q4_0 (``w = d (q - 8)``), ``w5g32s`` -> Q5_0,
``w8g32s`` -> Q8_0 (``q - 128`` as int8), ``w4g32`` -> Q4_1 and ``w5g32`` -> Q5_1 (``w = d q + m``
with ``d = scale`` and ``m = -zero * scale`` rounded to fp16: the one rounding step).

Error feedback (:func:`gptq_encode`): Frantar et al. 2022, "GPTQ", Algorithm 1, with each GGUF
block's scales chosen by the type's own encoder when the column walk reaches the block.

Why this is not :func:`bitsmith.methods.gptq.gptq_walk` with a GGUF column quantizer: the two agree
in exact arithmetic but not in float32, and the exported files are pinned byte for byte. Measured on
random 96-row layers (Hessians from 2048 random tokens): with the same inverse-Hessian factor the
shared walk writes identical Q4_K and Q3_K bytes (256-weight blocks = one lazy batch, so every block
is fitted on exact copies) but changes 5 % of Q5_0 and 0.5 % of Q8_0 bytes, the types SmolLM2's
576-wide rows fall back to: the walk is left-looking (``W[:, j] -= Err[:, :j] U[:j, j]`` per column,
and a block's encoder input is rebuilt as ``rows - U^T Err``) where this one updates the rest of the
batch in place after every column, so 32-weight blocks after the first in a batch see different
float32 roundings. The factor differs too (float64 ``cholesky(cholesky_inverse(cholesky(H)))`` here,
float32 reversed Cholesky + triangular inverse with damping retries there): it alone changed 16 Q4_K
bytes of 27648.
"""

from __future__ import annotations

import numpy as np
import torch

from bitsmith.formats.ggml_kquants import half_bytes
from bitsmith.formats.ggml_types import decode, encode, get_type, pack_legacy
from bitsmith.io.gguf.mixes import ExportError
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

# spec string -> (GGUF type, code offset): the GGUF types that store these grids as they are
EXACT_TYPES = {"w4g32s": ("Q4_0", 8), "w5g32s": ("Q5_0", 16), "w8g32s": ("Q8_0", 128),
               "w4g32": ("Q4_1", 0), "w5g32": ("Q5_1", 0)}
FLOAT_TYPES = ("F16", "F32", "BF16")


def exact_type(spec: QuantSpec) -> str | None:
    """The GGUF type that holds ``spec``'s codes without re-rounding them, or None."""
    found = EXACT_TYPES.get(str(spec))
    return found[0] if found else None


def encode_exact(qt: QuantizedTensor) -> tuple[str, np.ndarray, float]:
    """GGUF blocks holding ``qt``'s codes as they are: (type, uint8 [out, row_bytes], max |error|)
    against ``qt.dequantize()``; the error is the fp16 rounding of Q4_1/Q5_1's ``m = -zero*scale``."""
    name = exact_type(qt.spec)
    if name is None:
        raise ExportError(f"{qt.spec} has no exact GGUF type; exact types exist for {', '.join(EXACT_TYPES)}")
    _, offset = EXACT_TYPES[str(qt.spec)]
    rows, cols = qt.shape
    q = qt.codes.numpy().reshape(-1, 32).astype(np.int16)  # [B, 32], blocks = groups
    d = qt.scale.numpy().reshape(-1).astype(np.float32)  # [B]; fp16 values, exact in f32
    if name == "Q8_0":
        body = [half_bytes(d), (q - offset).astype(np.int8).view(np.uint8)]
    elif qt.zero is None:  # Q4_0 / Q5_0: w = d * (q - offset), offset = the symmetric midpoint
        body = [half_bytes(d), *pack_legacy(q, qt.spec.bits)]
    else:  # Q4_1 / Q5_1: w = d * q + m
        m = (-qt.zero.numpy().reshape(-1).astype(np.float64) * d).astype(np.float32)
        body = [half_bytes(d), half_bytes(m), *pack_legacy(q, qt.spec.bits)]
    data = np.concatenate(body, axis=1).reshape(rows, -1)
    err = np.abs(decode(data, name, (rows, cols)) - qt.dequantize().numpy()).max(initial=0.0)
    return name, data, float(err)


def encode_matrix(values: np.ndarray, qtype: str, importance: np.ndarray | None = None,
                  hessian: torch.Tensor | None = None) -> np.ndarray:
    """GGUF bytes of float ``values`` [rows, cols] as ``qtype``: with GPTQ error feedback when a
    Hessian is given and the type is quantized, else the type's (importance-weighted) encoder."""
    if hessian is not None and qtype not in FLOAT_TYPES:
        return gptq_encode(values, hessian, qtype, importance)
    return encode(values, qtype, importance)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)^-1 in float32 [C, C], computed in float64; dead inputs
    (H_ii = 0) get H_ii = 1, λ = damp x mean(diag H). No retry: a failed factorization raises."""
    cols = hessian.shape[0]
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()


def gptq_encode(weights: np.ndarray, hessian: torch.Tensor, qtype: str, importance: np.ndarray | None = None,
                damp: float = 0.01, block: int = 128) -> np.ndarray:
    """GGUF blocks of ``qtype`` for weights (rows, cols), with GPTQ error feedback on llama.cpp's own grid.

    Columns are quantized left to right; the rounding error of each is spread over the columns not
    yet quantized through the inverse Hessian ``hessian`` (cols, cols) = E[x x^T] of the layer's
    input, as GPTQ does. The grid (block scales and mins) of each GGUF block is chosen when the
    sweep reaches it, by the type's own (importance-weighted) encoder run on the weights as the
    feedback has updated them; the levels are then GPTQ's and are written into those blocks
    (:mod:`bitsmith.formats.ggml_grid`), so the file is plain ``qtype`` for every reader."""
    from bitsmith.formats.ggml_grid import grid, with_levels

    t = get_type(qtype)
    rows, cols = weights.shape
    size = t.block_size
    w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)).clone()  # [R, C]
    hinv = inverse_hessian_factor(hessian, damp)  # [C, C]
    out = np.empty((rows, cols // size, t.type_size), np.uint8)
    levels = np.empty((rows, cols), np.int32)
    step = size * max(1, block // size)  # lazy-batch width: whole GGUF blocks
    g = None
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        w1 = w[:, i1:i2].clone()  # [R, step]
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % size == 0:  # a new GGUF block: fit its scales to the weights as updated so far
                data = encode(w1[:, i:i + size].numpy(), qtype, None if importance is None else importance[col:col + size])
                out[:, col // size] = data
                g = grid(data, qtype)
            q, val = g.quantize(w1[:, i].numpy(), col % size)
            levels[:, col] = q
            e = (w1[:, i] - torch.from_numpy(val)) / h1[i, i]  # [R]
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)  # right-looking rank-1 update
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    for b in range(cols // size):
        out[:, b] = with_levels(out[:, b], qtype, levels[:, b * size:(b + 1) * size])
    return out.reshape(rows, -1)
