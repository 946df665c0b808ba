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
from bitsmith.io.safetensors import split_parts
from bitsmith.tensor import QuantizedTensor


def read_gptq_config(folder: Path) -> dict | None:
    """The folder's quantization_config when it is GPTQ, else None; GPTQError for a config.json
    that is not a JSON object or whose quantization_config is not one."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:  # not UTF-8 or not JSON, a 4,300-digit integer, too deep
        raise GPTQError(f"{path} is not valid JSON ({str(exc)[:200]}); download it again") from exc
    qc = (config.get("quantization_config") if isinstance(config, dict) else None) or {}
    if not isinstance(qc, dict):
        raise GPTQError(f"{path} has a quantization_config that is not a JSON object; download it again")
    return qc if qc.get("quant_method") == "gptq" else None


def gptq_options(folder: Path, qc: dict) -> tuple[int, int, bool]:
    """(bits, group_size, sym) of a GPTQ quantization_config; GPTQError naming config.json when
    bits or group_size is not an integer."""
    bits, group = qc.get("bits"), qc.get("group_size", -1)
    if type(bits) is not int or type(group) is not int:
        raise GPTQError(f"{Path(folder) / 'config.json'} has GPTQ bits {bits!r:.40} and group_size {group!r:.40}; "
                        "both must be integers: download it again")
    return bits, group, bool(qc.get("sym", True))  # any JSON value has a truth value, as before


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
    folder = Path(path)
    qc = read_gptq_config(folder)
    if qc is None:
        raise GPTQError(f"{folder} is not a GPTQ folder (config.json has no quantization_config with quant_method 'gptq')")
    try:
        fmt = GPTQFormat(qc.get("checkpoint_format", "gptq"))
    except ValueError:
        raise GPTQError(f"{folder} has GPTQ checkpoint_format {qc.get('checkpoint_format')!r}; bitsmith reads 'gptq' and 'gptq_v2'") from None
    bits, group_size, sym = gptq_options(folder, qc)
    parts, others = split_parts(folder, lambda part: part in PARTS, GPTQError)
    quantized = {}
    for module, tensors in parts.items():
        missing = [p for p in PARTS[:3] if p not in tensors]
        if missing:
            raise GPTQError(f"{module} in {folder} lacks {', '.join(missing)}; the GPTQ folder is incomplete, download it again")
        try:
            quantized[module] = gptq_layer(tensors, bits, group_size, sym, fmt)
        except GPTQError as exc:  # the layout's message, with the layer and folder it is about
            raise GPTQError(f"{module} in {folder}: {exc}") from exc
    config = json.loads((folder / "config.json").read_text())
    return config, quantized, others
