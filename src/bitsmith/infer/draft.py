"""The draft model for speculative decoding (:mod:`bitsmith.infer.speculative`): a checkpoint the user
names, or a quantized copy of the target's own unquantized source built in memory (nothing written).

``--draft w2g64`` quantizes every decoder linear of the target's source with plain min-max RTN at that
spec (no clip search: the search costs ~7 s per million weights on two loaded cores, minutes for a 135M
model and most of an hour for 1.5B, while a draft only has to rank the next token well), and installs them as
packed :class:`~bitsmith.nn.qlinear.QuantLinear` layers, so the draft decodes on the native kernels. The
output head is quantized too (at ``head_spec``, w4g128 by default): at a 150k vocabulary an unquantized
head is a quarter of Qwen2.5-1.5B's bytes per token and would keep the draft nearly as slow as the target,
while 4 bits keep the head's ranking close to the original's (a 2-bit head loses more acceptance than
it saves time).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitsmith.runtime.options import RuntimeOptions
from bitsmith.spec import QuantSpec

__all__ = ["Draft", "DEFAULT_HEAD_SPEC", "draft_source", "load_draft", "quantized_copy"]

log = logging.getLogger(__name__)

DEFAULT_HEAD_SPEC = "w4g128"
RTN_OPTIONS = {"clip_search": False}  # see the module docstring


@dataclass(frozen=True)
class Draft:
    model: nn.Module
    label: str  # "w2g64 of PATH (built in memory)" or the checkpoint's path
    build_s: float


def draft_source(loaded: Any) -> str:
    """The unquantized source behind a loaded target: itself when it is unquantized, else the source a
    bitsmith checkpoint recorded when it was quantized."""
    info = getattr(loaded, "info", None)
    if info is None:
        return str(loaded.source.path)
    recorded = info.report.get("source") or info.report.get("model")
    if not recorded or not Path(str(recorded)).expanduser().exists():
        where = f" ({recorded} no longer exists)" if recorded else ""
        raise ValueError(f"cannot build a draft from {loaded.source.path}: the checkpoint does not name an unquantized "
                         f"source that is still on disk{where}; pass --draft CHECKPOINT (a quantized copy of the same "
                         "model) instead of a spec")
    return str(recorded)


def quantized_copy(source_path: str, spec: QuantSpec, options: RuntimeOptions,
                   head_spec: QuantSpec | None = None) -> nn.Module:
    """The model at ``source_path`` with its decoder linears RTN-quantized to ``spec`` and, when
    ``head_spec`` is given, its output head to ``head_spec`` (a tied head gets its own quantized copy;
    the input embedding stays as loaded)."""
    from bitsmith.methods import get_method
    from bitsmith.models import open_source
    from bitsmith.models.arch import build_model
    from bitsmith.nn.qlinear import QuantLinear
    from bitsmith.pipeline.common import quantizable_layers
    from bitsmith.runtime.install import QuantizedLayer, install_quantized

    source = open_source(source_path)
    net = build_model(source, torch.float32)
    rtn = get_method("rtn")
    with torch.no_grad():
        for name in quantizable_layers(source.config):  # one layer at a time: floats freed as we go
            qt = rtn(net.get_submodule(name).weight.detach(), spec, None, RTN_OPTIONS)
            install_quantized(net, {name: QuantizedLayer.of(qt)}, tied_head=False, options=options)
        head = net.get_output_embeddings()
        if head_spec is not None and isinstance(head, nn.Linear):
            qt = rtn(head.weight.detach(), head_spec, None, RTN_OPTIONS)
            bias = None if head.bias is None else head.bias.detach()
            net.set_output_embeddings(QuantLinear(qt, bias, options))
            net.config.tie_word_embeddings = False  # the head no longer shares the embedding's table
    return net.eval()


def load_draft(spec_or_path: str, target: Any, options: RuntimeOptions,
               head_spec: str | None = DEFAULT_HEAD_SPEC) -> Draft:
    """``spec_or_path``: a spec such as ``w2g64`` (built from the target's source) or a model path."""
    import time

    start = time.perf_counter()
    if Path(spec_or_path).expanduser().exists():
        from bitsmith.runtime.load import load_model

        model = load_model(spec_or_path, options=options).model
        return Draft(model.eval(), str(spec_or_path), time.perf_counter() - start)
    try:
        spec = QuantSpec.parse(spec_or_path)
    except ValueError:
        raise ValueError(f"--draft {spec_or_path!r} is neither an existing checkpoint or model path nor a "
                         "quantization spec such as w2g64 or w3g128") from None
    source = draft_source(target)
    head = QuantSpec.parse(head_spec) if head_spec else None
    model = quantized_copy(source, spec, options, head)
    log.info("draft %s of %s built in memory", spec, source)
    return Draft(model, f"{spec} of {source} (built in memory, head {head or 'unquantized'})",
                 time.perf_counter() - start)
