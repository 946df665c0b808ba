"""Load any model bitsmith understands into a runnable torch module: a bitsmith checkpoint (linear
layers compute from packed weights), a Hugging Face folder, a GGUF file, or an alias."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from bitsmith.io.checkpoint import CheckpointInfo, read_info, shard_files
from bitsmith.nn.qembedding import QuantEmbedding
from bitsmith.nn.qlinear import QuantLinear, set_submodule
from bitsmith.tensor import QuantizedTensor

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: object  # bitsmith.models.ModelSource
    info: CheckpointInfo | None  # None for unquantized sources
    offload: object | None = None  # bitsmith.nn.offload.OffloadPlan when loaded with max_memory

    @property
    def name(self) -> str:
        return str(self.source.path)


def _quantized_tensors(folder: Path, info: CheckpointInfo, exclude: frozenset[str] = frozenset()) -> dict[str, QuantizedTensor]:
    """Read each quantized layer's packed tensors once, memory-mapped (not those in ``exclude``)."""
    from safetensors import safe_open

    found: dict[str, dict[str, torch.Tensor]] = {}
    for path in shard_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                module, _, part = key.rpartition(".")
                if module in info.specs and module not in exclude and part in ("qweight", "scale", "zero", "grid"):
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
        result[module] = QuantizedTensor.from_state(
            parts["qweight"], parts["scale"], parts.get("zero"), spec, in_features, parts.get("grid")
        )
    return result


def load_model(model: str | Path, dtype: torch.dtype = torch.float32, max_memory: int | None = None) -> LoadedModel:
    """``max_memory`` (bytes of quantized decoder-block weights): keep only the blocks that fit
    resident and stream the others from the checkpoint per forward (:mod:`bitsmith.nn.offload`)."""
    from bitsmith.models import open_source
    from bitsmith.models.arch import build_model

    source = open_source(model)
    info = read_info(source.path) if source.kind == "bitsmith" else None
    if info is None:
        if max_memory is not None:
            raise ValueError(f"{source.path} is not a bitsmith checkpoint; max_memory (offloading) needs one: quantize it first")
        return LoadedModel(build_model(source, dtype), source.tokenizer(), source, None)
    quantized = set(info.specs)
    tied_head = getattr(source.config, "tie_word_embeddings", False) and "lm_head" not in quantized
    if tied_head:
        from bitsmith.models import embedding_and_head_names
        from bitsmith.pipeline.quantize import meta_model

        embed_name, head_name = embedding_and_head_names(meta_model(source.config))
        if embed_name.removesuffix(".weight") in quantized:
            quantized.add((head_name or "lm_head.weight").removesuffix(".weight"))  # shares the embedding's codes
    # a quantized linear's bias is stored as is (L.bias) and is loaded like any other tensor
    net = build_model(source, dtype, skip=lambda name: name.rpartition(".")[0] in quantized and not name.endswith(".bias"))
    plan, streamed = None, frozenset()
    if max_memory is not None:
        from bitsmith.nn.offload import offload_blocks

        plan, streamed = offload_blocks(net, source.path, info, max_memory)
    for module_name, qt in _quantized_tensors(source.path, info, frozenset(streamed)).items():
        old = net.get_submodule(module_name)
        if isinstance(old, torch.nn.Embedding):
            set_submodule(net, module_name, QuantEmbedding(qt, getattr(old, "embed_scale", None)))
            if tied_head and isinstance(net.get_output_embeddings(), torch.nn.Linear):
                net.set_output_embeddings(QuantLinear(qt))  # the tied head computes from the same table
            continue
        bias = getattr(old, "bias", None)
        set_submodule(net, module_name, QuantLinear(qt, None if bias is None or bias.is_meta else bias.detach()))
    return LoadedModel(net, source.tokenizer(), source, info, plan)
