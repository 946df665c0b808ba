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
        result[module] = parts
    return result


def quantized_tensors(folder: Path, info: CheckpointInfo, exclude: frozenset[str] = frozenset()) -> dict[str, QuantizedTensor]:
    """Each quantized layer as an unpacked QuantizedTensor (for exporters and inspection; the loader
    itself builds QuantLinear straight from the packed state)."""
    return {module: QuantizedTensor.from_state(p["qweight"], p["scale"], p.get("zero"), info.specs[module],
                                               info.shapes[module][1], p.get("grid"))
            for module, p in quantized_state(folder, info, exclude).items()}


def _is_file_path(model: str | Path) -> bool:
    return Path(str(model)).expanduser().is_file()


def load_model(model: str | Path, dtype: torch.dtype = torch.float32, max_memory: int | None = None,
               dequantize: bool = False) -> LoadedModel:
    """``max_memory`` (bytes of quantized decoder-block weights): keep only the blocks that fit
    resident and stream the others from the checkpoint per forward (:mod:`bitsmith.nn.offload`).

    Quantized inputs stay quantized: a bitsmith checkpoint, a GPTQ-layout folder
    (:mod:`bitsmith.io.import_gptq`) and a GGUF *file* given by path (:mod:`bitsmith.io.gguf.quantized`:
    the matrices whose GGUF type maps onto bitsmith group codes) load as QuantLinear /
    QuantEmbedding layers. ``dequantize=True`` loads a GGUF file's exact float decoding instead.
    Aliases (the shipped unquantized references, stored as GGUF) always load as floats."""
    from bitsmith.models import open_source
    from bitsmith.models.arch import build_model

    source = open_source(model)
    info = read_info(source.path) if source.kind == "bitsmith" else None
    if info is None:
        if max_memory is not None:
            raise ValueError(f"{source.path} is not a bitsmith checkpoint; max_memory (offloading) needs one: quantize it first")
        if source.kind == "hf":
            from bitsmith.io.import_gptq import read_gptq_config

            if read_gptq_config(source.path) is not None:
                return _load_gptq(source, dtype)
        if source.kind == "gguf" and not dequantize and _is_file_path(model):
            return _load_gguf(source, dtype)
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
    for module_name, parts in quantized_state(source.path, info, frozenset(streamed)).items():
        spec, in_features = info.specs[module_name], info.shapes[module_name][1]
        old = net.get_submodule(module_name)
        if isinstance(old, torch.nn.Embedding) or "grid" in parts:
            qt = QuantizedTensor.from_state(parts["qweight"], parts["scale"], parts.get("zero"), spec, in_features, parts.get("grid"))
        if isinstance(old, torch.nn.Embedding):
            set_submodule(net, module_name, QuantEmbedding(qt, getattr(old, "embed_scale", None)))
            if tied_head and isinstance(net.get_output_embeddings(), torch.nn.Linear):
                net.set_output_embeddings(QuantLinear(qt))  # the tied head computes from the same table
            continue
        bias = getattr(old, "bias", None)
        bias = None if bias is None or bias.is_meta else bias.detach()
        if "grid" in parts:  # non-uniform grids go through the unpacked tensor
            set_submodule(net, module_name, QuantLinear(qt, bias))
        else:  # straight from the packed codes: no unpack/repack
            set_submodule(net, module_name, QuantLinear.from_state(parts["qweight"], parts["scale"], parts.get("zero"),
                                                                   spec, in_features, bias))
    return LoadedModel(net, source.tokenizer(), source, info, plan)


def _install(net: torch.nn.Module, quantized: dict[str, tuple[QuantizedTensor, torch.Tensor | None]], tied_head: bool) -> None:
    """Replace each named module of ``net`` by a quantized one computing from ``quantized``."""
    from bitsmith.io.import_gptq import InputPermuted

    for module_name, (qt, perm) in quantized.items():
        old = net.get_submodule(module_name)
        if isinstance(old, torch.nn.Embedding):
            set_submodule(net, module_name, QuantEmbedding(qt, getattr(old, "embed_scale", None)))
            if tied_head and isinstance(net.get_output_embeddings(), torch.nn.Linear):
                net.set_output_embeddings(QuantLinear(qt))
            continue
        bias = getattr(old, "bias", None)
        layer = QuantLinear(qt, None if bias is None or bias.is_meta else bias.detach())
        set_submodule(net, module_name, layer if perm is None else InputPermuted(layer, perm))


def _import_info(quantized: dict[str, tuple[QuantizedTensor, torch.Tensor | None]], origin: str, fmt: str) -> CheckpointInfo:
    """What an imported (GPTQ or GGUF) model holds, in a checkpoint's terms: its quantized layers."""
    specs = {name: qt.spec for name, (qt, _) in quantized.items()}
    shapes = {name: tuple(qt.shape) for name, (qt, _) in quantized.items()}
    return CheckpointInfo(method=f"import-{fmt}", options={}, specs=specs, shapes=shapes, format_version=fmt,
                          report={"source": origin})


def _load_gptq(source, dtype: torch.dtype) -> LoadedModel:
    """A GPTQ-layout folder: its quantized layers as QuantLinear, everything else as stored."""
    from bitsmith.io.import_gptq import load_gptq_folder
    from bitsmith.models.arch import build_model

    _, layers, _ = load_gptq_folder(source.path)
    net = build_model(source, dtype, skip=lambda name: name.rpartition(".")[0] in layers and not name.endswith(".bias"))
    _install(net, layers, tied_head=False)
    log.info("%s: %d GPTQ layers loaded quantized", source.path, len(layers))
    return LoadedModel(net, source.tokenizer(), source, _import_info(layers, str(source.path), "gptq"))


def _load_gguf(source, dtype: torch.dtype) -> LoadedModel:
    """A GGUF file: matrices of a type that maps onto bitsmith group codes load quantized, the rest
    (16-weight k-quant sub-blocks, floats) dequantized to ``dtype`` (logged)."""
    from bitsmith.io.gguf.quantized import gguf_quantized_tensors
    from bitsmith.models.arch import build_model
    from bitsmith.pipeline.quantize import meta_model

    meta = meta_model(source.config)
    wanted = {n for n, m in meta.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    found, notes = gguf_quantized_tensors(source.path, wanted)
    names = set(source.tensor_names())
    tied_head = "lm_head.weight" not in names
    # A tied head has no tensor of its own: when the embedding loads quantized, the head is skipped
    # with it (the head then computes from the embedding's codes, see _install).
    embed_quantized = "model.embed_tokens" in found

    def skip(name: str) -> bool:
        if tied_head and embed_quantized and name == "lm_head.weight":
            return True
        return name.rpartition(".")[0] in found and name.endswith(".weight")

    net = build_model(source, dtype, skip=skip)
    _install(net, {k: (v, None) for k, v in found.items()}, tied_head)
    if tied_head and "model.embed_tokens" not in found and not isinstance(net.get_output_embeddings(), QuantLinear):
        net.tie_weights()
    log.info("%s: %d of %d matrices loaded quantized", source.path.name, len(found), len(wanted))
    return LoadedModel(net, source.tokenizer(), source, _import_info({k: (v, None) for k, v in found.items()}, str(source.path), "gguf"))
