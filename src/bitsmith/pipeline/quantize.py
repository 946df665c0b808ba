"""The quantize pipeline's front door: ``quantize(model, out_dir, plan)``.

One entry point, two loops, chosen by the plan:

- a plan that needs calibration (its quantizer or a transform needs it, or calibration text is
  given) walks the decoder blocks with their calibration inputs
  (:func:`bitsmith.pipeline.layerwise.quantize_blocks`);
- any other plan streams the source tensor by tensor, here: it never builds the model, so peak
  memory is one tensor plus one shard's worth of output whatever the model size, and it reads the
  tensors in file order. Running it through the block loop without statistics would give the same
  numbers but build every block and capture activations for nothing, so it keeps its own loop.

The rules both loops follow (which layers, how other tensors are stored, the tied-head rule,
reports) live in :mod:`bitsmith.pipeline.plan` and :mod:`bitsmith.pipeline.common`, once.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch

from bitsmith.calib.data import CalibrationConfig
from bitsmith.io.checkpoint import CheckpointError, CheckpointWriter
from bitsmith.io.destination import Destination
from bitsmith.methods import METHODS, Needs, get_method
from bitsmith.pipeline.common import (
    check_layers, finish_folder, fits_fp16, kept_report, layer_report, quantizable_layers, storage,
    summary,
)
from bitsmith.models.family import HEAD_MODULE
from bitsmith.pipeline.plan import QuantizePlan
from bitsmith.transforms import TRANSFORMS

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (what was just done, done, total)


def quantize(model: str | Path, out_dir: Path, plan: QuantizePlan, *, progress: Progress | None = None,
             resume: bool = False, overwrite: bool = False) -> Path:
    """Quantize ``model`` (folder, GGUF file or alias) into a bitsmith checkpoint at ``out_dir``.

    ``resume`` continues an interrupted calibrated run from its last finished block; ``overwrite``
    replaces ``out_dir`` once the new checkpoint is complete."""
    from bitsmith.models import open_source

    start = time.perf_counter()
    # the destination rule before any work: an existing --out is refused, and with --overwrite so is
    # anything but an earlier checkpoint (a foreign folder, the current directory)
    Destination(Path(out_dir), "checkpoint", overwrite, CheckpointError).check()
    if plan.needs_calibration:
        from bitsmith.pipeline.layerwise import quantize_blocks

        tokens = (plan.calib or CalibrationConfig()).batches(open_source(model).tokenizer())  # [samples, seq_len]
        return quantize_blocks(model, Path(out_dir), plan, tokens, progress=progress, resume=resume, overwrite=overwrite)
    if resume:
        raise ValueError(f"--resume applies to calibrated methods ({', '.join(calibrated_methods())}); "
                         f"{plan.method} without --calib runs in one pass, drop --resume")
    return _stream(model, Path(out_dir), plan, progress, overwrite, start)


def calibrated_methods() -> list[str]:
    """The method spellings that always calibrate (for messages): registered transforms and the
    methods that need calibration data."""
    return sorted([*(n for n, t in TRANSFORMS.items() if t.needs is not Needs.NOTHING),
                   *(name for name, info in METHODS.items() if info.needs is not Needs.NOTHING)])


def _stream(model: str | Path, out_dir: Path, plan: QuantizePlan, progress: Progress | None, overwrite: bool,
            start: float) -> Path:
    """The calibration-free loop: every tensor of the source once, in file order."""
    from bitsmith.models import open_source

    source = open_source(model)
    layers = quantizable_layers(source.config, plan.quantize_head, plan.quantize_embeddings)
    check_layers(layers, plan)
    method, options = plan.quantizer_fn(), plan.method_options()
    plain = get_method(plan.quantizer)  # an embedding is a lookup table: never rotated
    embedding = _embedding_module(source.config)
    names = source.tensor_names()
    untie = plan.unties_head(names)
    report_layers = []
    with CheckpointWriter(out_dir, plan.method, plan.recorded_options(), overwrite=overwrite) as writer:
        for i, name in enumerate(names):
            module = name.removesuffix(".weight")
            tensor = source.load_tensor(name)
            if module in layers:
                fn = plain if module == embedding else method
                report_layers.append(_write_layer(writer, module, tensor, fn, plan.spec_for(module), options))
            else:
                writer.add_tensor(name, storage(tensor, plan.unquantized_dtype))
            if untie and name.endswith("embed_tokens.weight"):
                # the embedding stays at full precision (written above); the head gets a quantized copy
                report_layers.append(_write_layer(writer, HEAD_MODULE, tensor, method, plan.spec_for(HEAD_MODULE), options))
            if progress:
                progress(name, i + 1, len(names))
        finish_folder(writer, source, untie)
        return writer.finish(summary(source, plan, report_layers, start))


def _embedding_module(config) -> str:
    from bitsmith.models import embedding_and_head_names
    from bitsmith.models.meta import meta_model

    return embedding_and_head_names(meta_model(config))[0].removesuffix(".weight")


def _write_layer(writer: CheckpointWriter, module: str, weight: torch.Tensor, method, spec, options: dict) -> dict:
    """Quantize one layer and write it, or write it at fp32 when its scales overflow fp16 (the rule in
    :mod:`bitsmith.pipeline.common`); returns its report entry."""
    t0 = time.perf_counter()
    qt = method(weight, spec, None, options)
    if not fits_fp16(qt):
        writer.add_tensor(f"{module}.weight", weight.float())
        return kept_report(module, weight)
    writer.add_quantized(module, qt)
    return layer_report(module, weight, qt, time.perf_counter() - t0)

