"""A bitsmith checkpoint's quantized layers as stored: each layer's packed tensors (``qweight``,
``scale`` and, where present, ``zero``, ``grid``), memory-mapped and checked against its spec, or
unpacked into QuantizedTensors. Read by the loader (:mod:`bitsmith.runtime.load`) and the exporters."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from bitsmith.io.checkpoint import CheckpointError, CheckpointInfo, shard_files
from bitsmith.primitives import abs_max
from bitsmith.tensor import QuantizedTensor

PACKED_PARTS = ("qweight", "scale", "zero", "grid")


def quantized_state(folder: Path, info: CheckpointInfo, exclude: frozenset[str] = frozenset()) -> dict[str, dict[str, torch.Tensor]]:
    """Each quantized layer's stored tensors (``qweight``, ``scale`` and, where present, ``zero``,
    ``grid``), memory-mapped and checked against the layer's spec and shape; not those in ``exclude``."""
    from safetensors import safe_open

    found: dict[str, dict[str, torch.Tensor]] = {}
    for path in shard_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                module, _, part = key.rpartition(".")
                if module in info.specs and module not in exclude and part in PACKED_PARTS:
                    found.setdefault(module, {})[part] = f.get_tensor(key)
    result = {}
    for module, spec in info.specs.items():
        if module in exclude:
            continue
        parts = found.get(module, {})
        if "qweight" not in parts or "scale" not in parts:
            raise ValueError(f"{folder} lists {module} as quantized but its packed tensors are missing; the checkpoint is incomplete, quantize again")
        out_features, in_features = info.shapes[module]
        if tuple(parts["scale"].shape) != (out_features, spec.groups_per_row(in_features)):
            raise ValueError(f"{module} in {folder} has scales of shape {tuple(parts['scale'].shape)}, which do not fit {spec} on a {out_features}x{in_features} weight; the checkpoint is corrupt, quantize again")
        for part in ("scale", "zero", "grid"):  # an inf scale dequantizes its whole group to inf/NaN
            t = parts.get(part)
            if t is not None and t.numel() and not math.isfinite(abs_max(t)):
                noun = {"scale": "scales", "zero": "zeros", "grid": "grid levels"}[part]
                raise CheckpointError(f"{module}.{part} in {folder} holds inf/NaN {noun}; re-quantize it "
                                      "(this bitsmith keeps layers whose scales overflow fp16 at fp32)")
        result[module] = parts
    return result


def quantized_tensors(folder: Path, info: CheckpointInfo, exclude: frozenset[str] = frozenset()) -> dict[str, QuantizedTensor]:
    """Each quantized layer as an unpacked QuantizedTensor (for exporters and inspection; the loader
    itself builds QuantLinear straight from the packed state)."""
    return {module: QuantizedTensor.from_state(p["qweight"], p["scale"], p.get("zero"), info.specs[module],
                                               info.shapes[module][1], p.get("grid"))
            for module, p in quantized_state(folder, info, exclude).items()}
