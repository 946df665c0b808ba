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
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from bitsmith.calib.data import CalibrationConfig
from bitsmith.io.checkpoint import DEFAULT_SHARD_BYTES, CheckpointError, CheckpointWriter
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
STREAM_SHARD_BYTES = DEFAULT_SHARD_BYTES  # output shard size of the calibration-free path (tests shrink it)


def quantize(model: str | Path, out_dir: Path, plan: QuantizePlan, *, progress: Progress | None = None,
             resume: bool = False, overwrite: bool = False) -> Path:
    """Quantize ``model`` (folder, GGUF file or alias) into a bitsmith checkpoint at ``out_dir``.

    ``resume`` continues an interrupted run: a calibrated one from its last finished block, a
    calibration-free one from its last finished output shard; ``overwrite`` replaces ``out_dir``
    once the new checkpoint is complete."""
    from bitsmith.models import open_source

    start = time.perf_counter()
    # the destination rule before any work: an existing --out is refused, and with --overwrite so is
    # anything but an earlier checkpoint (a foreign folder, the current directory)
    Destination(Path(out_dir), "checkpoint", overwrite, CheckpointError).check()
    if plan.needs_calibration:
        from bitsmith.pipeline.layerwise import quantize_blocks

        calib = calibration(plan)
        log.info("calibration text: %s, %d x %d tokens", calib.text or "the State of the Union text", calib.samples,
                 calib.seq_len)
        tokens = calib.batches(open_source(model).tokenizer())  # [samples, seq_len]
        return quantize_blocks(model, Path(out_dir), plan, tokens, progress=progress, resume=resume, overwrite=overwrite)
    return _stream(model, Path(out_dir), plan, progress, overwrite, resume, start)


def calibration(plan: QuantizePlan) -> CalibrationConfig:
    """The plan's calibration; without a text named, the first of its transforms' own default texts
    (AWQ: prose + code), else its quantizer's (vq: prose + code), else the library's default text."""
    calib = plan.calib or CalibrationConfig()
    texts = [*(TRANSFORMS[t].calib_text for t in plan.transforms), METHODS[plan.quantizer].calib_text]
    default = next((text for text in texts if text), None)
    return replace(calib, text=default) if calib.text is None and default else calib


def calibrated_methods() -> list[str]:
    """The method spellings that always calibrate (for messages): registered transforms and the
    methods that need calibration data."""
    return sorted([*(n for n, t in TRANSFORMS.items() if t.needs is not Needs.NOTHING),
                   *(name for name, info in METHODS.items() if info.needs is not Needs.NOTHING)])


def _stream(model: str | Path, out_dir: Path, plan: QuantizePlan, progress: Progress | None, overwrite: bool,
            resume: bool, start: float) -> Path:
    """The calibration-free loop: every tensor of the source once, in file order. Every closed output
    shard is committed to ``<out>.partial/`` (:mod:`bitsmith.io.ledger`); a resumed run skips the
    source tensors whose outputs an earlier run committed and writes the same checkpoint."""
    from bitsmith.models import open_source

    source = open_source(model)
    layers = quantizable_layers(source.config, plan.quantize_head, plan.quantize_embeddings)
    check_layers(layers, plan)
    method, options = plan.quantizer_fn(), plan.method_options()
    plain = get_method(plan.quantizer)  # an embedding is a lookup table: never rotated
    embedding = _embedding_module(source.config)
    names = source.tensor_names()
    untie = plan.unties_head(names)
    with CheckpointWriter(out_dir, plan.method, plan.recorded_options(), overwrite=overwrite, shard_bytes=STREAM_SHARD_BYTES,
                          resume_key=_resume_key(source, plan, STREAM_SHARD_BYTES), resume=resume) as writer:
        report_layers = list(writer.resumed_reports)
        for i, name in enumerate(names):
            module = name.removesuffix(".weight")
            head = untie and name.endswith("embed_tokens.weight")  # the head gets a quantized copy of it
            todo_self = not _written(writer, name, module in layers)  # False: committed by the run resumed
            todo_head = head and not _written(writer, f"{HEAD_MODULE}.weight", True)
            tensor = source.load_tensor(name) if todo_self or todo_head else None
            if todo_self and module in layers:
                fn = plain if module == embedding else method
                report_layers.append(_write_layer(writer, module, tensor, fn, plan.spec_for(module), options))
            elif todo_self:
                writer.add_tensor(name, storage(tensor, plan.unquantized_dtype))
            if todo_head:  # the embedding stays at full precision (written above)
                report_layers.append(_write_layer(writer, HEAD_MODULE, tensor, method, plan.spec_for(HEAD_MODULE), options))
            # released before the next load, not replaced by it: the 151,936 x 1,536 embedding and head
            # are 0.93 GB each in float32, and the head was still held while the embedding was read
            tensor = None
            if progress:
                progress(name, i + 1, len(names))
        finish_folder(writer, source, untie)
        return writer.finish(summary(source, plan, report_layers, start))


def _written(writer: CheckpointWriter, name: str, quantizable: bool) -> bool:
    """Whether tensor ``name`` (``<module>.weight``) is in the checkpoint already: as itself, or, for a
    quantizable layer, as its packed codes."""
    return writer.has(name) or (quantizable and writer.has(name.removesuffix(".weight") + ".qweight"))


def _resume_key(source, plan: QuantizePlan, shard_bytes: int) -> dict:
    """What a resumed calibration-free run must share with the run it continues for the two to write
    the same checkpoint: the source, the per-layer specs, the method, its options and the shard size."""
    import json

    options = json.loads(json.dumps(plan.recorded_options(), sort_keys=True, default=str))
    return {"model": str(source.path), "spec": str(plan.spec), "method": plan.method, "options": options,
            "layer_specs": {k: str(v) for k, v in sorted(plan.layer_specs.items())}, "shard_bytes": shard_bytes}


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
        report = kept_report(module, weight)
        writer.add_tensor(f"{module}.weight", weight.float(), report)
        return report
    report = layer_report(module, weight, qt, time.perf_counter() - t0, sqnr_by_rows(weight, qt))
    writer.add_quantized(module, qt, report)  # the report goes with the shard, for a resumed run
    return report


REPORT_CHUNK = 1 << 18  # weights per slice of rows when measuring a layer's error


def sqnr_by_rows(weight: torch.Tensor, qt) -> float:
    """10 log10(|w|^2 / |w - w_hat|^2) in dB, reconstructing ``qt`` a slice of rows at a time: the
    whole-tensor reconstruction plus float64 copies cost a 13824 x 5120 layer 2.6 s and ~850 MB, more
    than quantizing it. The arithmetic is :func:`bitsmith.primitives.sqnr_db`'s (float64 differences
    and sums), only the order of the additions differs."""
    noise = signal = 0.0
    step = max(1, REPORT_CHUNK // max(1, weight.shape[1]))
    for i in range(0, weight.shape[0], step):
        w = weight[i : i + step].double().reshape(-1)
        diff = w - qt.rows(slice(i, i + step)).weight().reshape(-1).double()
        noise += float(torch.dot(diff, diff))
        signal += float(torch.dot(w, w))
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)

