"""Read a GPTQ safetensors folder (``quantization_config.quant_method == "gptq"``, no act-order) as
bitsmith quantized layers, losslessly: see :mod:`bitsmith.io.export_gptq` for the layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bitsmith.io.export_gptq import GPTQError, GPTQFormat, from_gptq
from bitsmith.tensor import QuantizedTensor

_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def read_gptq_config(folder: Path) -> dict | None:
    """The folder's quantization_config when it is GPTQ, else None."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    qc = json.loads(path.read_text()).get("quantization_config") or {}
    return qc if qc.get("quant_method") == "gptq" else None


def load_gptq_folder(path: str | Path) -> tuple[dict, dict[str, QuantizedTensor], dict[str, torch.Tensor]]:
    """(config.json as a dict, module name -> QuantizedTensor, every other tensor by name)."""
    from safetensors import safe_open

    from bitsmith.io.checkpoint import shard_files

    folder = Path(path)
    qc = read_gptq_config(folder)
    if qc is None:
        raise GPTQError(f"{folder} is not a GPTQ folder (config.json has no quantization_config with quant_method 'gptq')")
    if qc.get("desc_act"):
        raise GPTQError(f"{folder} was quantized with act-order (desc_act: true); bitsmith reads GPTQ without act-order only")
    try:
        fmt = GPTQFormat(qc.get("checkpoint_format", "gptq"))
    except ValueError:
        raise GPTQError(f"{folder} has GPTQ checkpoint_format {qc.get('checkpoint_format')!r}; bitsmith reads 'gptq' and 'gptq_v2'") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for shard in shard_files(folder):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                module, _, part = key.rpartition(".")
                if part in _PARTS:
                    parts.setdefault(module, {})[part] = f.get_tensor(key)
                else:
                    others[key] = f.get_tensor(key)
    quantized = {}
    for module, tensors in parts.items():
        missing = [p for p in _PARTS[:3] if p not in tensors]
        if missing:
            raise GPTQError(f"{module} in {folder} lacks {', '.join(missing)}; the GPTQ folder is incomplete, download it again")
        quantized[module] = from_gptq(tensors, int(qc["bits"]), int(qc.get("group_size", -1)), bool(qc.get("sym", True)), fmt)
    config = json.loads((folder / "config.json").read_text())
    return config, quantized, others
