"""The calibration-free quantization pipeline: stream the source tensor by tensor, quantize the
linear layers of the decoder blocks, write the checkpoint shard by shard.

Peak memory is one tensor plus one shard's worth of output, whatever the model size.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from bitsmith.calib.data import CalibrationConfig
from bitsmith.io.checkpoint import CheckpointError, CheckpointWriter
from bitsmith.methods import get_method
from bitsmith.primitives import abs_max, sqnr_db
from bitsmith.spec import QuantSpec, SpecError

log = logging.getLogger(__name__)

CALIBRATED_METHODS = frozenset({"gptq", "awq"})  # methods that need calibration data
STORAGE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantizeConfig:
    spec: QuantSpec
    method: str = "rtn"
    options: dict = field(default_factory=dict)
    quantize_head: bool = False  # also quantize lm_head (untied from the embedding if tied)
    quantize_embeddings: bool = False  # also quantize the input embedding (a tied head then shares it)
    unquantized_dtype: str = "fp16"  # storage for 2-D tensors left unquantized (embeddings, lm_head)
    layer_specs: dict[str, QuantSpec] = field(default_factory=dict)  # per-module overrides (mixed precision)

    def spec_for(self, module: str) -> QuantSpec:
        return self.layer_specs.get(module, self.spec)


def meta_model(config) -> torch.nn.Module:
    """The architecture with no weights: enough to find blocks and layer names."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def quantizable_layers(config, quantize_head: bool = False, quantize_embeddings: bool = False) -> dict[str, tuple[int, int]]:
    """Module names of the layers to quantize -> (out, in): every linear in the decoder blocks,
    plus lm_head and the input embedding when asked."""
    from bitsmith.models.arch import block_linears, embedding_and_head_names, find_blocks

    model = meta_model(config)
    path, blocks = find_blocks(model)
    layers = {}
    for i, block in enumerate(blocks):
        for rel, linear in block_linears(block).items():
            layers[f"{path}.{i}.{rel}"] = (linear.out_features, linear.in_features)
    emb_name, head_name = embedding_and_head_names(model)
    if quantize_head:
        weight = model.get_parameter(emb_name if head_name is None else head_name)
        layers["lm_head"] = tuple(weight.shape)
    if quantize_embeddings:
        layers[emb_name.removesuffix(".weight")] = tuple(model.get_parameter(emb_name).shape)
    return layers


def check_layers(layers: dict[str, tuple[int, int]], config: "QuantizeConfig") -> None:
    unknown = sorted(set(config.layer_specs) - set(layers))
    if unknown:
        raise SpecError(f"per-layer specs name {unknown[0]}, which is not a quantizable layer of this model")
    for name, (_, in_features) in layers.items():
        spec = config.spec_for(name)
        if spec.group_size is not None and spec.group_size > in_features:
            raise SpecError(
                f"group size {spec.group_size} is larger than {name}'s row of {in_features} weights; "
                f"use a group size <= {in_features} or per-channel (e.g. w{spec.bits})"
            )


def _storage(tensor: torch.Tensor, dtype_name: str) -> torch.Tensor:
    """Norms and biases stay fp32; 2-D tensors go to the chosen dtype unless fp16 would overflow."""
    if tensor.dim() < 2:
        return tensor.float()
    dtype = STORAGE_DTYPES[dtype_name]
    if dtype is torch.float16 and abs_max(tensor) > FP16_MAX:
        log.warning("a tensor exceeds the fp16 range; storing it in fp32")
        return tensor.float()
    return tensor.to(dtype)


def _layer_report(name: str, weight: torch.Tensor, qt, seconds: float) -> dict:
    out_features, in_features = weight.shape
    return {"name": name, "shape": [out_features, in_features], "spec": str(qt.spec),
            "bits_per_weight": qt.spec.bits_per_weight(out_features, in_features),
            "sqnr_db": sqnr_db(weight, qt.dequantize()), "seconds": round(seconds, 4)}


def quantize_model(
    model: str | Path,
    out_dir: Path,
    config: QuantizeConfig,
    *,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    calib: CalibrationConfig | None = None,
    resume: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    hessian_dtype: str = "fp32",
) -> Path:
    """Quantize ``model`` (folder, GGUF file or alias) into a bitsmith checkpoint at ``out_dir``.

    Methods that need calibration (CALIBRATED_METHODS), or any method given ``calib``, go through
    the layer-wise pipeline (:func:`bitsmith.pipeline.layerwise.quantize_calibrated`); the rest
    stream tensor by tensor here.
    """
    from bitsmith.models import open_source

    start = time.perf_counter()
    if Path(out_dir).exists() and not overwrite:  # fail before any work
        raise CheckpointError(f"{out_dir} already exists; choose another --out or pass --overwrite")
    if config.method in CALIBRATED_METHODS or calib is not None:
        from bitsmith.pipeline.layerwise import quantize_calibrated

        calib = calib or CalibrationConfig()
        tokens = calib.batches(open_source(model).tokenizer())  # [samples, seq_len]
        return quantize_calibrated(model, Path(out_dir), config, tokens, resume=resume, overwrite=overwrite,
                                   progress=progress, compute_dtype=compute_dtype, hessian_dtype=hessian_dtype)
    if resume:
        raise ValueError(f"--resume applies to calibrated methods ({', '.join(sorted(CALIBRATED_METHODS))}); "
                         f"{config.method} without --calib runs in one pass, drop --resume")
    source = open_source(model)
    layers = quantizable_layers(source.config, config.quantize_head, config.quantize_embeddings)
    check_layers(layers, config)
    method = get_method(config.method)
    names = source.tensor_names()
    # A tied head is untied only when the head alone is quantized; quantizing the embedding with a
    # tied head keeps them tied (the head then computes from the quantized embedding).
    head_is_tied = config.quantize_head and "lm_head.weight" not in names and not config.quantize_embeddings
    report_layers = []
    options = {**config.options, "quantize_head": config.quantize_head,
               "quantize_embeddings": config.quantize_embeddings, "unquantized_dtype": config.unquantized_dtype}
    with CheckpointWriter(Path(out_dir), config.method, options, overwrite=overwrite) as writer:
        for i, name in enumerate(names):
            module = name.removesuffix(".weight")
            tensor = source.load_tensor(name)
            if module in layers:
                t0 = time.perf_counter()
                qt = method(tensor, config.spec_for(module), None, config.options)
                writer.add_quantized(module, qt)
                report_layers.append(_layer_report(module, tensor, qt, time.perf_counter() - t0))
            else:
                writer.add_tensor(name, _storage(tensor, config.unquantized_dtype))
            if head_is_tied and name.endswith("embed_tokens.weight"):
                # Untie: the embedding stays at full precision, the output projection is quantized.
                qt = method(tensor, config.spec_for("lm_head"), None, config.options)
                writer.add_quantized("lm_head", qt)
                report_layers.append(_layer_report("lm_head", tensor, qt, 0.0))
            if progress:
                progress(name, i + 1, len(names))
        finish_folder(writer, source, head_is_tied)
        return writer.finish(summary(source, config, report_layers, start))


def finish_folder(writer: CheckpointWriter, source, head_is_tied: bool) -> None:
    """Config and tokenizer into the checkpoint; an untied config when a tied head was quantized."""
    source.save_config_and_tokenizer(writer.tmp_dir)
    if head_is_tied:
        untied = copy.deepcopy(source.config)
        untied.tie_word_embeddings = False
        untied.save_pretrained(writer.tmp_dir)


def summary(source, config: QuantizeConfig, report_layers: list[dict], start: float) -> dict:
    """The checkpoint report: per-layer entries plus totals."""
    stored = sum(l["bits_per_weight"] * l["shape"][0] * l["shape"][1] for l in report_layers)
    count = sum(l["shape"][0] * l["shape"][1] for l in report_layers)
    return {"source": str(source.path), "spec": str(config.spec), "method": config.method, "layers": report_layers,
            "quantized_weights": count, "bits_per_weight": stored / max(count, 1),
            "seconds": round(time.perf_counter() - start, 2)}
