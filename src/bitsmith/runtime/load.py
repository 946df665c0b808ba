"""Load any model bitsmith understands into a runnable torch module: a bitsmith checkpoint (linear
layers compute from packed weights), a Hugging Face folder, a GGUF file, or an alias."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from bitsmith.io.checkpoint import CheckpointInfo, read_info
from bitsmith.io.packed import quantized_state
from bitsmith.nn.qlinear import QuantLinear
from bitsmith.runtime.install import QuantizedLayer, install_quantized
from bitsmith.runtime.options import RuntimeOptions

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: object  # bitsmith.models.ModelSource
    info: CheckpointInfo | None  # None for unquantized sources
    offload: object | None = None  # bitsmith.runtime.offload.OffloadPlan when loaded with max_memory
    options: RuntimeOptions = RuntimeOptions()  # what the model was loaded with (pass them on to generate)

    @property
    def name(self) -> str:
        return str(self.source.path)


def _is_file_path(model: str | Path) -> bool:
    return Path(str(model)).expanduser().is_file()


def load_model(model: str | Path, dtype: torch.dtype = torch.float32, max_memory: int | None = None,
               dequantize: bool = False, options: RuntimeOptions | None = None) -> LoadedModel:
    """``max_memory`` (bytes of quantized decoder-block weights): keep only the blocks that fit
    resident and stream the others from the checkpoint per forward (:mod:`bitsmith.runtime.offload`).

    Quantized inputs stay quantized: a bitsmith checkpoint, a GPTQ-layout folder
    (:mod:`bitsmith.io.import_gptq`), a compressed-tensors folder (:mod:`bitsmith.io.import_ct`) and a GGUF *file* given by path (:mod:`bitsmith.io.gguf.quantized`:
    the matrices whose GGUF type maps onto bitsmith group codes) load as QuantLinear /
    QuantEmbedding layers. ``dequantize=True`` loads a GGUF file's exact float decoding instead.
    Aliases (the shipped unquantized references, stored as GGUF) always load as floats.

    ``options`` choose the kernels the quantized layers compute with; None (the default) takes
    :meth:`RuntimeOptions.from_env`, so the user's ``BITSMITH_*`` overrides apply."""
    from bitsmith.models import open_source
    from bitsmith.models.arch import build_model

    options = RuntimeOptions.from_env() if options is None else options
    source = open_source(model)
    info = read_info(source.path) if source.kind == "bitsmith" else None
    if info is not None:
        return _load_checkpoint(source, info, dtype, max_memory, options)
    if max_memory is not None:
        raise ValueError(f"{source.path} is not a bitsmith checkpoint; max_memory (offloading) needs one: quantize it first")
    if source.kind == "hf":
        from bitsmith.io.import_gptq import read_gptq_config

        if read_gptq_config(source.path) is not None:
            return _load_gptq(source, dtype, options)
        from bitsmith.io.import_ct import read_ct_config

        if read_ct_config(source.path) is not None:
            return _load_ct(source, dtype, options)
    if source.kind == "gguf" and not dequantize and _is_file_path(model):
        return _load_gguf(source, dtype, options)
    return LoadedModel(build_model(source, dtype), source.tokenizer(), source, None, options=options)


def _load_checkpoint(source, info: CheckpointInfo, dtype: torch.dtype, max_memory: int | None,
                     options: RuntimeOptions) -> LoadedModel:
    """A bitsmith checkpoint: its quantized layers as QuantLinear / QuantEmbedding, streamed per block
    under ``max_memory``, everything else as stored."""
    from bitsmith.models.arch import build_model

    quantized = set(info.specs)
    tied_head = getattr(source.config, "tie_word_embeddings", False) and "lm_head" not in quantized
    if tied_head:
        from bitsmith.models import embedding_and_head_names
        from bitsmith.models.meta import meta_model

        embed_name, head_name = embedding_and_head_names(meta_model(source.config))
        if embed_name.removesuffix(".weight") in quantized:
            quantized.add((head_name or "lm_head.weight").removesuffix(".weight"))  # shares the embedding's codes
    # a quantized linear's bias is stored as is (L.bias) and is loaded like any other tensor
    net = build_model(source, dtype, skip=lambda name: name.rpartition(".")[0] in quantized and not name.endswith(".bias"))
    plan, streamed = None, frozenset()
    if max_memory is not None:
        from bitsmith.runtime.offload import offload_blocks

        plan, streamed = offload_blocks(net, source.path, info, max_memory, options)
    layers = {name: QuantizedLayer(info.specs[name], info.shapes[name][1], parts=parts, rotation_block=info.rotations.get(name))
              for name, parts in quantized_state(source.path, info, frozenset(streamed)).items()}
    install_quantized(net, layers, tied_head, options)
    return LoadedModel(net, source.tokenizer(), source, info, plan, options)


def _import_info(layers: dict[str, QuantizedLayer], origin: str, fmt: str) -> CheckpointInfo:
    """What an imported (GPTQ or GGUF) model holds, in a checkpoint's terms: its quantized layers."""
    specs = {name: layer.spec for name, layer in layers.items()}
    shapes = {name: tuple(layer.tensor.shape) for name, layer in layers.items()}
    return CheckpointInfo(method=f"import-{fmt}", options={}, specs=specs, shapes=shapes, format_version=fmt,
                          report={"source": origin})


def _load_gptq(source, dtype: torch.dtype, options: RuntimeOptions) -> LoadedModel:
    """A GPTQ-layout folder: its quantized layers as QuantLinear, everything else as stored."""
    from bitsmith.io.import_gptq import load_gptq_folder
    from bitsmith.models.arch import build_model

    _, found, _ = load_gptq_folder(source.path)
    layers = {name: QuantizedLayer.of(qt, perm) for name, (qt, perm) in found.items()}
    net = build_model(source, dtype, skip=lambda name: name.rpartition(".")[0] in layers and not name.endswith(".bias"))
    install_quantized(net, layers, False, options)
    log.info("%s: %d GPTQ layers loaded quantized", source.path, len(layers))
    return LoadedModel(net, source.tokenizer(), source, _import_info(layers, str(source.path), "gptq"), options=options)


def _load_ct(source, dtype: torch.dtype, options: RuntimeOptions) -> LoadedModel:
    """A compressed-tensors folder (pack-quantized): its quantized layers as QuantLinear, everything
    else as stored."""
    from bitsmith.io.import_ct import load_ct_folder
    from bitsmith.models.arch import build_model

    _, found, _ = load_ct_folder(source.path)
    layers = {name: QuantizedLayer.of(qt) for name, qt in found.items()}
    net = build_model(source, dtype, skip=lambda name: name.rpartition(".")[0] in layers and not name.endswith(".bias"))
    install_quantized(net, layers, False, options)
    log.info("%s: %d compressed-tensors layers loaded quantized", source.path, len(layers))
    return LoadedModel(net, source.tokenizer(), source, _import_info(layers, str(source.path), "compressed-tensors"), options=options)


def _load_gguf(source, dtype: torch.dtype, options: RuntimeOptions) -> LoadedModel:
    """A GGUF file: matrices of a type that maps onto bitsmith group codes load quantized, the rest
    (16-weight k-quant sub-blocks, floats) dequantized to ``dtype`` (logged)."""
    from bitsmith.io.gguf.quantized import gguf_quantized_tensors
    from bitsmith.models.arch import build_model
    from bitsmith.models.meta import meta_model

    meta = meta_model(source.config)
    wanted = {n for n, m in meta.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    found, notes = gguf_quantized_tensors(source.path, wanted)
    layers = {name: QuantizedLayer.of(qt) for name, qt in found.items()}
    names = set(source.tensor_names())
    tied_head = "lm_head.weight" not in names
    # A tied head has no tensor of its own: when the embedding loads quantized, the head is skipped
    # with it (the head then computes from the embedding's codes, see install_quantized).
    embed_quantized = "model.embed_tokens" in found

    def skip(name: str) -> bool:
        if tied_head and embed_quantized and name == "lm_head.weight":
            return True
        return name.rpartition(".")[0] in found and name.endswith(".weight")

    net = build_model(source, dtype, skip=skip)
    install_quantized(net, layers, tied_head, options)
    if tied_head and "model.embed_tokens" not in found and not isinstance(net.get_output_embeddings(), QuantLinear):
        net.tie_weights()
    log.info("%s: %d of %d matrices loaded quantized", source.path.name, len(found), len(wanted))
    return LoadedModel(net, source.tokenizer(), source, _import_info(layers, str(source.path), "gguf"), options=options)
