"""What both quantize loops share: which layers a plan quantizes, how the tensors it leaves alone are
stored, the per-layer report, and how the checkpoint folder is finished.

The calibration-free loop (:mod:`bitsmith.pipeline.quantize`) and the calibrated block loop
(:mod:`bitsmith.pipeline.layerwise`) both write through these, so a tensor left unquantized is stored
the same way whichever loop wrote it.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any

import torch

from bitsmith.io.checkpoint import CheckpointWriter
from bitsmith.models.family import HEAD_MODULE
from bitsmith.pipeline.plan import QuantizePlan
from bitsmith.primitives import abs_max, sqnr_db
from bitsmith.spec import SpecError

log = logging.getLogger(__name__)

STORAGE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FP16_MAX = 65504.0


def dtype_name(dtype: torch.dtype) -> str:
    """The plan's name of a torch dtype (the inverse of STORAGE_DTYPES)."""
    names = {v: k for k, v in STORAGE_DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"compute dtype must be one of {', '.join(map(str, names))}, got {dtype}")
    return names[dtype]


def quantizable_layers(config, quantize_head: bool = False, quantize_embeddings: bool = False) -> dict[str, tuple[int, int]]:
    """Module names of the layers to quantize -> (out, in): every linear in the decoder blocks,
    plus lm_head and the input embedding when asked."""
    from bitsmith.models.arch import block_linears, embedding_and_head_names, find_blocks
    from bitsmith.models.meta import meta_model

    model = meta_model(config)
    path, blocks = find_blocks(model)
    layers = {}
    for i, block in enumerate(blocks):
        for rel, linear in block_linears(block).items():
            layers[f"{path}.{i}.{rel}"] = (linear.out_features, linear.in_features)
    emb_name, head_name = embedding_and_head_names(model)
    if quantize_head:
        weight = model.get_parameter(emb_name if head_name is None else head_name)
        layers[HEAD_MODULE] = tuple(weight.shape)
    if quantize_embeddings:
        layers[emb_name.removesuffix(".weight")] = tuple(model.get_parameter(emb_name).shape)
    return layers


def check_layers(layers: dict[str, tuple[int, int]], plan: QuantizePlan) -> None:
    unknown = sorted(set(plan.layer_specs) - set(layers))
    if unknown:
        raise SpecError(f"per-layer specs name {unknown[0]}, which is not a quantizable layer of this model")
    for name, (_, in_features) in layers.items():
        spec = plan.spec_for(name)
        if spec.group_size is not None and spec.group_size > in_features:
            raise SpecError(
                f"group size {spec.group_size} is larger than {name}'s row of {in_features} weights; "
                f"use a group size <= {in_features} or per-channel (e.g. w{spec.bits})"
            )


def storage(tensor: torch.Tensor, dtype_name: str) -> torch.Tensor:
    """Norms and biases stay fp32; 2-D tensors go to the chosen dtype unless fp16 would overflow."""
    if tensor.dim() < 2:
        return tensor.float()
    dtype = STORAGE_DTYPES[dtype_name]
    if dtype is torch.float16 and abs_max(tensor) > FP16_MAX:
        log.warning("a tensor exceeds the fp16 range; storing it in fp32")
        return tensor.float()
    return tensor.to(dtype)


# -- the fp16 overflow rule ------------------------------------------------------------------------
# A checkpoint stores scales and zeros as fp16 (max 65504). A finite fp32 weight far beyond that
# range (1e30 in a corrupt or badly trained layer) gives a scale that rounds to inf, and the whole
# layer then dequantizes to inf/NaN: the run used to exit 0 and eval printed ppl=nan. Clipping the
# scale to 65504 would keep the file finite but answer garbage for every group it touches, so a layer
# whose stored scales, zeros or grid are not finite is kept unquantized at fp32 instead (the rule
# :func:`storage` already applies to unquantized tensors beyond fp16), with a warning naming the layer
# and its largest |weight|, and an entry in the report's ``unquantized_layers``.

KEPT = "kept_unquantized"  # the report key that marks a layer kept at fp32 (its value says why)


def fits_fp16(qt) -> bool:
    """Whether a QuantizedTensor's stored scale, zero and grid are all finite (nothing overflowed fp16)."""
    parts = [t for t in (qt.scale, qt.zero, qt.grid) if t is not None]
    return all(math.isfinite(abs_max(t)) for t in parts)


def kept_report(name: str, weight: torch.Tensor) -> dict:
    """Warn that layer ``name`` stays unquantized at fp32 and return its report entry."""
    largest = abs_max(weight)
    reason = f"its scales overflow fp16 (largest |weight| {largest:.3g} > {FP16_MAX:g}); stored unquantized at fp32"
    log.warning("layer %s is not quantized: %s", name, reason)
    out_features, in_features = weight.shape
    return {"name": name, "shape": [out_features, in_features], "spec": "fp32", "bits_per_weight": 32.0,
            "max_abs_weight": largest, KEPT: reason}


def layer_report(name: str, weight: torch.Tensor, qt, seconds: float, sqnr: float | None = None) -> dict:
    """A quantized layer's report entry; ``sqnr`` when the caller measured it already (the streaming
    path does, by slices of rows, without a whole-tensor reconstruction)."""
    out_features, in_features = weight.shape
    return {"name": name, "shape": [out_features, in_features], "spec": str(qt.spec),
            "bits_per_weight": qt.spec.bits_per_weight(out_features, in_features) + rotation_bits(qt, out_features),
            "sqnr_db": sqnr_db(weight, qt.weight()) if sqnr is None else sqnr, "seconds": round(seconds, 4),
            **({"rotation_block": qt.rotation.block} if getattr(qt, "rotation", None) is not None else {})}


SQNR_SLICE = 1 << 20  # float64 elements per partial sum: primitives.sqnr_db's slices


def sqnr_db_by_rows(weight: torch.Tensor, approx_rows) -> float:
    """:func:`bitsmith.primitives.sqnr_db` of ``weight`` against an approximation made a few rows at a
    time by ``approx_rows(rows) -> float32 [len(rows), in]`` (e.g. ``qt.rows(rows).weight()``): the
    same flat slices, differences and float64 sums in the same order, so the same figure, without a
    whole-tensor reconstruction (0.93 GB of float32 for a 151,936 x 1,536 head)."""
    ref = weight.reshape(-1)
    in_features, total = weight.shape[1], weight.numel()
    noise = signal = 0.0
    for i in range(0, total, SQNR_SLICE):
        j = min(i + SQNR_SLICE, total)
        first, last = i // in_features, -(-j // in_features)  # the rows this flat slice touches
        app = approx_rows(slice(first, last)).reshape(-1)[i - first * in_features : j - first * in_features]
        r = ref[i:j].double()
        noise += (r - app.double()).pow(2).sum().item()
        signal += r.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise)


def rotation_bits(qt, out_features: int) -> float:
    """Bits/weight of a rotated layer's stored sign vector: one bit per input channel (0 unrotated)."""
    return 0.0 if getattr(qt, "rotation", None) is None else 1.0 / out_features


def finish_folder(writer: CheckpointWriter, source: Any, head_is_tied: bool) -> None:
    """Config and tokenizer into the checkpoint; an untied config when a tied head was quantized."""
    source.save_config_and_tokenizer(writer.tmp_dir)
    if head_is_tied:
        untied = copy.deepcopy(source.config)
        untied.tie_word_embeddings = False
        untied.save_pretrained(writer.tmp_dir)


def summary(source: Any, plan: QuantizePlan, report_layers: list[dict], start: float) -> dict:
    """The checkpoint report: per-layer entries plus totals; layers kept at fp32 by the overflow rule
    are listed apart (``unquantized_layers``) and count in no total."""
    kept = [l for l in report_layers if KEPT in l]
    report_layers = [l for l in report_layers if KEPT not in l]
    stored = sum(l["bits_per_weight"] * l["shape"][0] * l["shape"][1] for l in report_layers)
    count = sum(l["shape"][0] * l["shape"][1] for l in report_layers)
    return {"source": str(source.path), "spec": str(plan.spec), "method": plan.method, "layers": report_layers,
            "quantized_weights": count, "bits_per_weight": stored / max(count, 1),
            "seconds": round(time.perf_counter() - start, 2), **({"unquantized_layers": kept} if kept else {})}
