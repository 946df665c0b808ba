"""Read a compressed-tensors folder (``quantization_config.quant_method == "compressed-tensors"``,
``pack-quantized`` integer weights, group- or channel-wise, as llm-compressor and ``bitsmith export
--to compressed-tensors`` write them) as bitsmith quantized layers, losslessly: see
:mod:`bitsmith.formats.ct_layout` for the layout.

Each layer with ``weight_packed`` takes the scheme of the config group that targets it: by exact
module name, by ``re:`` pattern, or by class name (``Linear``: only linear layers are packed, so a
class target covers any). What bitsmith cannot run is refused with the reason: activation
quantization (bitsmith runs weight-only codes), act-order (a ``weight_g_idx``), other formats
(float8, nvfp4, sparse)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from bitsmith.formats.ct_layout import PARTS, CTError, from_ct
from bitsmith.io.safetensors import split_parts
from bitsmith.tensor import QuantizedTensor

READ_FORMATS = ("pack-quantized",)


def read_ct_config(folder: Path) -> dict | None:
    """The folder's quantization_config when it is compressed-tensors, else None; CTError for a
    config.json that is not valid JSON."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:
        raise CTError(f"{path} is not valid JSON ({str(exc)[:200]}); download it again") from exc
    qc = (config.get("quantization_config") if isinstance(config, dict) else None) or {}
    if not isinstance(qc, dict):
        raise CTError(f"{path} has a quantization_config that is not a JSON object; download it again")
    return qc if qc.get("quant_method") == "compressed-tensors" else None


def _groups(folder: Path, qc: dict) -> list[tuple[list[str], dict]]:
    """(targets, weights args) of each config group, after refusing what bitsmith cannot run."""
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CTError(f"{folder}/config.json has no config_groups in its compressed-tensors quantization_config; download it again")
    result = []
    for name, group in groups.items():
        if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
            raise CTError(f"config group {name!r} in {folder}/config.json quantizes no weights; bitsmith reads weight-only quantization")
        if group.get("input_activations") or group.get("output_activations"):
            raise CTError(f"config group {name!r} in {folder} also quantizes activations; bitsmith runs weight-only "
                          "quantization (load this model with vLLM, or use a weight-only export such as W4A16)")
        fmt = group.get("format") or qc.get("format")
        if fmt not in READ_FORMATS:
            raise CTError(f"config group {name!r} in {folder} is stored as {fmt!r}; bitsmith reads {', '.join(READ_FORMATS)}")
        if group["weights"].get("actorder") not in (None, False):
            raise CTError(f"config group {name!r} in {folder} uses act-order ({group['weights']['actorder']}); bitsmith reads compressed-tensors without act-order")
        targets = group.get("targets") or []
        result.append(([targets] if isinstance(targets, str) else list(targets), group["weights"]))
    return result


def _matches(module: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return module == target


def scheme_of(module: str, groups: list[tuple[list[str], dict]]) -> dict | None:
    """The weights args of the group targeting ``module``: by name or pattern first, else the first
    group with a class-name target (one without a dot or ``re:``, such as ``Linear``)."""
    for targets, args in groups:
        if any(_matches(module, t) for t in targets):
            return args
    for targets, args in groups:
        if any(not t.startswith("re:") and "." not in t for t in targets):
            return args
    return None


def _read_tensors(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(module -> its packed parts, every other tensor by name)."""
    return split_parts(folder, lambda part: part in PARTS or part == "weight_g_idx", CTError)


def load_ct_folder(path: str | Path) -> tuple[dict, dict[str, QuantizedTensor], dict[str, torch.Tensor]]:
    """(config.json as a dict, module name -> QuantizedTensor, every other tensor by name)."""
    folder = Path(path)
    qc = read_ct_config(folder)
    if qc is None:
        raise CTError(f"{folder} is not a compressed-tensors folder (config.json has no quantization_config "
                      "with quant_method 'compressed-tensors')")
    groups = _groups(folder, qc)
    parts, others = _read_tensors(folder)
    quantized = {}
    for module, tensors in parts.items():
        if "weight_g_idx" in tensors:
            raise CTError(f"{module} in {folder} stores weight_g_idx (act-order); bitsmith reads compressed-tensors without act-order")
        args = scheme_of(module, groups)
        if args is None:
            raise CTError(f"{module} in {folder} is packed but no config group targets it; the config is corrupt, download it again")
        try:
            quantized[module] = from_ct(tensors, args)
        except CTError as exc:  # the layout's message, with the layer and folder it is about
            raise CTError(f"{module} in {folder}: {exc}") from exc
    config = json.loads((folder / "config.json").read_text())
    return config, quantized, others
