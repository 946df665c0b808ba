"""Export a bitsmith checkpoint in the GPTQ safetensors layout that transformers, vLLM and
GPTQModel load (``quant_method: "gptq"``), and the packing both ways.

Per quantized linear layer ``L`` (``out`` x ``in`` weights, ``G`` groups of ``group_size``):

    L.qweight  int32 [in * bits / 32, out]   codes packed along the input dim, as one little-endian
                                             bit stream per output column: 32 codes fill ``bits``
                                             int32 words (8 per word at 4 bits, 4 at 8 bits, and
                                             3-bit codes straddle words, as GPTQ's 3-bit packing)
    L.qzeros   int32 [G, out * bits / 32]    zero points packed the same way along the output dim
    L.scales   fp16  [G, out]
    L.g_idx    int32 [in]                    group of each input channel (i // group_size: no act-order)

Dequantization: ``w = scales * (code - zero)``, bitsmith's own convention. Format "gptq" (v1, read by
every loader) stores ``zero - 1``; loaders add the 1 back after masking, so a zero of 0 cannot be
expressed and is refused (use ``GPTQFormat.V2``, ``checkpoint_format: "gptq_v2"``, which stores the
zero itself, for GPTQModel). Fractional zeros (HQQ) are rounded to integers and the extra error is
reported; non-uniform grids and group sizes that do not divide ``in`` (GPTQ has no short last group)
are refused. Tensors the checkpoint kept unquantized are copied; config.json gains
``quantization_config``; the tokenizer files are copied. The folder is written under a temporary
name and renamed when complete.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from bitsmith.formats.packing import pack, unpack
from bitsmith.primitives import sqnr_db
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

log = logging.getLogger(__name__)

GPTQ_BITS = (2, 3, 4, 8)


class GPTQFormat(enum.Enum):
    V1 = "gptq"  # qzeros hold zero - 1 (AutoGPTQ, vLLM, transformers)
    V2 = "gptq_v2"  # qzeros hold zero (GPTQModel)


class GPTQError(ValueError):
    """A tensor or folder that the GPTQ layout cannot hold or that is not GPTQ; the message names the fix."""


def pack_columns(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [rows, n] codes -> int32 [rows, n * bits / 32]: each row one little-endian bit stream.
    bitsmith's packing already writes each row as such a stream, 8 codes to ``bits`` bytes."""
    rows, n = codes.shape
    if (n * bits) % 32:
        raise GPTQError(f"{n} {bits}-bit codes do not fill whole int32 words; GPTQ needs {32 // _gcd32(bits)}-aligned widths")
    return pack(codes.contiguous(), bits).view(torch.int32).reshape(rows, n * bits // 32)


def unpack_columns(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_columns`: int32 [rows, w] -> uint8 [rows, w * 32 / bits]."""
    rows, w = words.shape
    return unpack(words.contiguous().view(torch.uint8).reshape(rows, w * 4), bits, w * 32 // bits)


def _gcd32(bits: int) -> int:
    from math import gcd

    return gcd(bits, 32)


@dataclass(frozen=True)
class GPTQTensors:
    qweight: torch.Tensor  # int32 [in * bits / 32, out]
    qzeros: torch.Tensor  # int32 [G, out * bits / 32]
    scales: torch.Tensor  # fp16 [G, out]
    g_idx: torch.Tensor  # int32 [in]
    max_zero_rounding: float  # largest |zero - round(zero)| (0 for integer zeros)


def to_gptq(qt: QuantizedTensor, fmt: GPTQFormat = GPTQFormat.V1) -> GPTQTensors:
    """One layer in the GPTQ layout. Raises GPTQError for what the layout cannot hold."""
    spec, (out_features, in_features) = qt.spec, qt.shape
    if spec.grid != "uniform":
        raise GPTQError(f"{spec} is a non-uniform grid; GPTQ stores uniform codes only: quantize with a uniform spec (e.g. w4g128)")
    if spec.bits not in GPTQ_BITS:
        raise GPTQError(f"{spec.bits}-bit codes have no GPTQ packing; use 2, 3, 4 or 8 bits")
    group = spec.group_size or in_features
    if in_features % group:
        raise GPTQError(f"group size {group} does not divide the row of {in_features} weights and GPTQ loaders cannot "
                        f"express a short last group; quantize with a group size that divides {in_features} (e.g. g32) or per-channel")
    zero = qt.zero_or_mid()  # [out, G]
    rounded = torch.round(zero)
    if fmt is GPTQFormat.V1 and bool((rounded < 1).any()):
        raise GPTQError("a group has zero point 0, which GPTQ v1 (stored as zero - 1) cannot express; "
                        "export with format gptq_v2 (GPTQModel reads it)")
    stored = (rounded - (1 if fmt is GPTQFormat.V1 else 0)).clamp(0, spec.qmax).to(torch.uint8)  # [out, G]
    return GPTQTensors(
        qweight=pack_columns(qt.codes, spec.bits).t().contiguous(),
        qzeros=pack_columns(stored.t().contiguous(), spec.bits),
        scales=qt.scale.t().contiguous().half(),
        g_idx=(torch.arange(in_features, dtype=torch.int32) // group),
        max_zero_rounding=float((zero - rounded).abs().max()) if zero.numel() else 0.0,
    )


def from_gptq(t: GPTQTensors | dict[str, torch.Tensor], bits: int, group_size: int, sym: bool,
              fmt: GPTQFormat = GPTQFormat.V1) -> QuantizedTensor:
    """A GPTQ layer back to a QuantizedTensor, losslessly. ``group_size`` -1 means per-channel."""
    get = (lambda k: t[k]) if isinstance(t, dict) else (lambda k: getattr(t, k))
    qweight, qzeros, scales = get("qweight"), get("qzeros"), get("scales")
    codes = unpack_columns(qweight.t().contiguous(), bits)  # [out, in]
    out_features, in_features = codes.shape
    g_idx = get("g_idx") if isinstance(t, GPTQTensors) or "g_idx" in t else None
    group = in_features if group_size in (-1, None) else group_size
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(in_features) // group):
        raise GPTQError("this GPTQ layer uses act-order (desc_act: a permuted g_idx); bitsmith reads GPTQ without act-order only")
    stored = unpack_columns(qzeros, bits)[:, :out_features].t().float()  # [out, G]
    zero = stored + (1 if fmt is GPTQFormat.V1 else 0)
    spec = QuantSpec(bits, None if group == in_features and group_size in (-1, None) else group, False)
    if sym and bool((zero == (spec.qmax + 1) / 2).all()):
        return QuantizedTensor(codes, scales.t().contiguous().half(), None, QuantSpec(bits, spec.group_size, True))
    return QuantizedTensor(codes, scales.t().contiguous().half(), zero.half(), spec)


def export_gptq(checkpoint: str | Path, out: str | Path, fmt: GPTQFormat = GPTQFormat.V1, *,
                overwrite: bool = False) -> dict:
    """Write a bitsmith checkpoint as a GPTQ folder at ``out``; returns the per-layer report."""
    from safetensors.torch import save_file

    from bitsmith.io.checkpoint import read_info, shard_files
    from bitsmith.io.packed import quantized_tensors

    folder, out = Path(checkpoint), Path(out)
    info = read_info(folder) if folder.is_dir() else None
    if info is None:
        raise GPTQError(f"{checkpoint} is not a bitsmith checkpoint; quantize it first (bitsmith quantize MODEL --spec w4g128 --out DIR)")
    if out.exists() and not overwrite:
        raise GPTQError(f"{out} already exists; choose another --out or pass --overwrite")
    specs = {str(s) for s in info.specs.values()}
    if len({(s.bits, s.group_size, s.symmetric) for s in info.specs.values()}) > 1:
        raise GPTQError(f"the checkpoint mixes specs ({', '.join(sorted(specs))}); GPTQ's quantization_config holds one")
    spec = next(iter(info.specs.values()))
    quantized = quantized_tensors(folder, info)
    state: dict[str, torch.Tensor] = {}
    report: dict[str, dict] = {}
    for module, qt in quantized.items():
        g = to_gptq(qt, fmt)
        state.update({f"{module}.qweight": g.qweight, f"{module}.qzeros": g.qzeros,
                      f"{module}.scales": g.scales, f"{module}.g_idx": g.g_idx})
        entry = {"max_zero_rounding": g.max_zero_rounding}
        if g.max_zero_rounding:
            back = from_gptq(g, spec.bits, spec.group_size or -1, spec.symmetric, fmt)
            entry["sqnr_db"] = sqnr_db(qt.dequantize(), back.dequantize())
            log.warning("%s: fractional zeros rounded (max %.3f code); extra error %.1f dB", module, g.max_zero_rounding, entry["sqnr_db"])
        report[module] = entry
    from safetensors import safe_open

    for path in shard_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                module, _, part = key.rpartition(".")
                if not (module in quantized and part in ("qweight", "scale", "zero", "grid")):
                    state[key] = f.get_tensor(key)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for item in folder.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and item.name not in ("bitsmith.json", "model.safetensors.index.json"):
                shutil.copyfile(item, tmp / item.name)
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = {
            "quant_method": "gptq", "bits": spec.bits, "group_size": spec.group_size or -1, "desc_act": False,
            "sym": spec.symmetric, "checkpoint_format": fmt.value, "lm_head": "lm_head" in quantized,
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
