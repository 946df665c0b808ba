"""Read a GPTQ safetensors folder (``quantization_config.quant_method == "gptq"``) as bitsmith
quantized layers, losslessly: see :mod:`bitsmith.formats.gptq_layout` for the layout.

Act-order folders (``desc_act``: ``g_idx`` assigns input channels to groups out of order) are read
too: sorting the channels by group makes every group contiguous, so the layer is a bitsmith
QuantizedTensor over the sorted channels, run by :class:`InputPermuted`, which gathers the input's
channels in that order first (``y = x[..., perm] W_sorted^T``): the same products, no rounding."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bitsmith.formats.gptq_layout import PARTS, GPTQError, GPTQFormat, gptq_layer
from bitsmith.io.safetensors import shard_files
from bitsmith.tensor import QuantizedTensor


def read_gptq_config(folder: Path) -> dict | None:
    """The folder's quantization_config when it is GPTQ, else None."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    qc = json.loads(path.read_text()).get("quantization_config") or {}
    return qc if qc.get("quant_method") == "gptq" else None


class InputPermuted(torch.nn.Module):
    """``inner(x[..., perm])``: a GPTQ act-order layer as a QuantLinear over group-sorted channels."""

    def __init__(self, inner: torch.nn.Module, perm: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("perm", perm.long(), persistent=False)
        self.in_features, self.out_features = perm.numel(), getattr(inner, "out_features", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.index_select(-1, self.perm))


def load_gptq_folder(path: str | Path) -> tuple[dict, dict[str, tuple[QuantizedTensor, torch.Tensor | None]], dict[str, torch.Tensor]]:
    """(config.json as a dict, module name -> (QuantizedTensor, act-order permutation or None),
    every other tensor by name)."""
    from safetensors import safe_open

    folder = Path(path)
    qc = read_gptq_config(folder)
    if qc is None:
        raise GPTQError(f"{folder} is not a GPTQ folder (config.json has no quantization_config with quant_method 'gptq')")
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
                if part in PARTS:
                    parts.setdefault(module, {})[part] = f.get_tensor(key)
                else:
                    others[key] = f.get_tensor(key)
    quantized = {}
    for module, tensors in parts.items():
        missing = [p for p in PARTS[:3] if p not in tensors]
        if missing:
            raise GPTQError(f"{module} in {folder} lacks {', '.join(missing)}; the GPTQ folder is incomplete, download it again")
        quantized[module] = gptq_layer(tensors, int(qc["bits"]), int(qc.get("group_size", -1)), bool(qc.get("sym", True)), fmt)
    config = json.loads((folder / "config.json").read_text())
    return config, quantized, others
