"""A bitsmith checkpoint's quantized layers as stored: each layer's packed tensors (``qweight``,
``scale`` and, where present, ``zero``, ``grid``), memory-mapped and checked against its spec, or
unpacked into QuantizedTensors. Read by the loader (:mod:`bitsmith.runtime.load`) and the exporters."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from bitsmith.formats.packing import packed_row_bytes
from bitsmith.hadamard import ROTATION_PART, Rotation
from bitsmith.io.checkpoint import CheckpointError, CheckpointInfo, shard_files
from bitsmith.primitives import abs_max
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

PACKED_PARTS = ("qweight", "scale", "zero", "grid", ROTATION_PART)


def _stored_parts(folder: Path, info: CheckpointInfo, exclude: frozenset[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Every stored part of the quantized layers, memory-mapped; a shard the safetensors library
    refuses (its header passed bitsmith's reader, e.g. an unknown dtype) becomes a CheckpointError."""
    from safetensors import SafetensorError, safe_open

    found: dict[str, dict[str, torch.Tensor]] = {}
    for path in shard_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    module, _, part = key.rpartition(".")
                    if module in info.specs and module not in exclude and part in PACKED_PARTS:
                        found.setdefault(module, {})[part] = f.get_tensor(key)
        except SafetensorError as exc:
            raise CheckpointError(f"{path} cannot be read ({exc}); the checkpoint is corrupt, quantize again") from exc
    return found


def _check_layer(folder: Path, module: str, parts: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> None:
    """A layer's stored parts against its spec and shape: what unpacking and the kernels assume."""
    if "qweight" not in parts or "scale" not in parts:
        raise CheckpointError(f"{folder} lists {module} as quantized but its packed tensors are missing; the checkpoint is incomplete, quantize again")
    out_features, in_features = shape
    if tuple(parts["scale"].shape) != (out_features, spec.groups_per_row(in_features)):
        raise CheckpointError(f"{module} in {folder} has scales of shape {tuple(parts['scale'].shape)}, which do not fit {spec} on a {out_features}x{in_features} weight; the checkpoint is corrupt, quantize again")
    qweight, zero = parts["qweight"], parts.get("zero")
    packed = (out_features, packed_row_bytes(in_features, spec.bits))
    if qweight.dtype != torch.uint8 or tuple(qweight.shape) != packed:
        raise CheckpointError(f"{module}.qweight in {folder} is {qweight.dtype} {tuple(qweight.shape)}, not the uint8 "
                              f"{packed} that {spec} packs a {out_features}x{in_features} weight into; the checkpoint "
                              "is corrupt, quantize again")
    if zero is not None and zero.shape != parts["scale"].shape:
        raise CheckpointError(f"{module}.zero in {folder} has shape {tuple(zero.shape)}, not its scales' "
                              f"{tuple(parts['scale'].shape)}; the checkpoint is corrupt, quantize again")
    for part in ("scale", "zero", "grid"):  # an inf scale dequantizes its whole group to inf/NaN
        t = parts.get(part)
        if t is not None and not t.is_floating_point():
            raise CheckpointError(f"{module}.{part} in {folder} holds {t.dtype} values, not floats; the checkpoint "
                                  "is corrupt, quantize again")
        if t is not None and t.numel() and not math.isfinite(abs_max(t)):
            noun = {"scale": "scales", "zero": "zeros", "grid": "grid levels"}[part]
            raise CheckpointError(f"{module}.{part} in {folder} holds inf/NaN {noun}; re-quantize it "
                                  "(this bitsmith keeps layers whose scales overflow fp16 at fp32)")


def _check_rotation(folder: Path, module: str, parts: dict[str, torch.Tensor], info: CheckpointInfo) -> None:
    """A rotated layer's packed signs: present, uint8 [ceil(in / 8)]."""
    if module not in info.rotations:
        parts.pop(ROTATION_PART, None)  # not listed as rotated: the tensor means nothing to this layer
        return
    signs, width = parts.get(ROTATION_PART), info.shapes[module][1]
    if signs is None or signs.dtype != torch.uint8 or tuple(signs.shape) != (math.ceil(width / 8),):
        raise CheckpointError(f"{module} in {folder} is listed as rotated but its {ROTATION_PART} tensor is missing or "
                              f"not uint8 [{math.ceil(width / 8)}]; the checkpoint is corrupt, quantize again")


def layer_rotation(parts: dict[str, torch.Tensor], width: int, block: int | None) -> Rotation | None:
    """The rotation of a layer from its stored parts and its metadata block (None: not rotated)."""
    return None if block is None else Rotation.from_state(parts[ROTATION_PART], width, block)


def quantized_state(folder: Path, info: CheckpointInfo, exclude: frozenset[str] = frozenset()) -> dict[str, dict[str, torch.Tensor]]:
    """Each quantized layer's stored tensors (``qweight``, ``scale`` and, where present, ``zero``,
    ``grid``), memory-mapped and checked against the layer's spec and shape; not those in ``exclude``.
    A layer that does not fit raises CheckpointError (a ValueError) naming it."""
    found = _stored_parts(folder, info, exclude)
    result = {}
    for module, spec in info.specs.items():
        if module in exclude:
            continue
        parts = found.get(module, {})
        _check_layer(folder, module, parts, spec, info.shapes[module])
        _check_rotation(folder, module, parts, info)
        result[module] = parts
    return result


def quantized_tensors(folder: Path, info: CheckpointInfo, exclude: frozenset[str] = frozenset(),
                      rotated: bool = False) -> dict[str, QuantizedTensor]:
    """Each quantized layer as an unpacked QuantizedTensor (for exporters and inspection; the loader
    itself builds QuantLinear straight from the packed state). Rotated layers (``quantize --rotate``)
    are refused unless ``rotated``: other formats (GGUF, GPTQ) have no way to say that a layer reads
    rotated inputs, so exporting their codes would silently change the model."""
    if info.rotations and not rotated:
        first = sorted(info.rotations)[0]
        raise CheckpointError(f"{folder} was quantized with --rotate ({len(info.rotations)} layers, e.g. {first}, read "
                              "Hadamard-rotated inputs); that is a bitsmith-only format which GGUF and GPTQ cannot "
                              "express: quantize again without --rotate to export")
    return {module: QuantizedTensor.from_state(p["qweight"], p["scale"], p.get("zero"), info.specs[module],
                                               info.shapes[module][1], p.get("grid"),
                                               layer_rotation(p, info.shapes[module][1], info.rotations.get(module)))
            for module, p in quantized_state(folder, info, exclude).items()}


def other_tensors(folder: Path, quantized: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor the checkpoint stores outside its packed layers (embeddings, norms, biases, head)."""
    from safetensors import safe_open

    state = {}
    for path in shard_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                module, _, part = key.rpartition(".")
                if not (module in quantized and part in ("qweight", "scale", "zero", "grid")):
                    state[key] = f.get_tensor(key)
    return state


def quantized_embedding(folder: Path, info: CheckpointInfo) -> str | None:
    """The input embedding's module name when the checkpoint quantizes it (bitsmith's default w8
    embedding), else None: formats without quantized embeddings write it dequantized."""
    from bitsmith.models import embedding_and_head_names, meta_model, open_source

    embed, _ = embedding_and_head_names(meta_model(open_source(folder).config))
    module = embed.removesuffix(".weight")
    return module if module in info.specs else None
