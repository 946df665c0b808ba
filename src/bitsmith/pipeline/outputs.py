"""The default policy for the embedding table and the output head.

A checkpoint whose head stays in fp16 reads, per generated token, about as many head bytes as
4-bit body bytes on a small model (SmolLM2-135M: 57 MB of fp16 head against 57 MB of w4g128
body), so decode runs at half the speed it could. llama.cpp keeps its output tensor at 6-8 bits
for the same reason (Q6_K for its 2-5-bit types, Q8_0 for Q8_0). bitsmith's default follows the
body's width (:func:`default_output_spec`): ``w6g128`` under bodies of at most 4 bits, ``w8`` (one
scale per row) above; a tied head stays tied and computes from the quantized embedding.

Why w6g128 under 4-bit bodies (session 24, top-256 reference caches, 8-16 windows x 512 per domain,
bench/results/speed/README.md): it reads fewer bytes per token (Qwen2.5-Coder-1.5B's untied head
233 -> 182 MB of 930) and on Qwen2.5-Coder-1.5B w4g128 it is also the better head (KLD prose
0.0722 -> 0.0609, code 0.0320 -> 0.0274: one scale per 1536-wide row loses more than 6 bits per
128-group with a zero point). On SmolLM2-135M w4g128 (tied: the embedding too) it costs prose KLD
0.2723 -> 0.2793 (+2.6%) and code 0.2577 -> 0.2599 (+0.8%) for 7% fewer bytes. Under a w8 body
it would triple SmolLM2's KLD (0.0029 -> 0.0097), so 8-bit bodies keep w8.

``keep`` restores the unquantized outputs (both tensors at the plan's ``unquantized_dtype``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

from bitsmith.spec import GROUP_SIZES, QuantSpec

if TYPE_CHECKING:
    from bitsmith.pipeline.plan import QuantizePlan

DEFAULT_OUTPUT_SPEC = "w8"  # under bodies wider than NARROW_BODY_BITS
NARROW_OUTPUT_SPEC = "w6g128"  # under bodies of at most NARROW_BODY_BITS
NARROW_BODY_BITS = 4
KEEP = "keep"
AUTO = "auto"


def default_output_spec(body: QuantSpec, width: int) -> QuantSpec:
    """The embedding/head spec bitsmith uses without ``--output-spec`` for a body quantized at ``body``,
    for an embedding of ``width`` features: a group never wider than the row (tiny models)."""
    spec = QuantSpec.parse(NARROW_OUTPUT_SPEC if body.bits <= NARROW_BODY_BITS else DEFAULT_OUTPUT_SPEC)
    if spec.group_size is not None and spec.group_size > width:
        fits = [g for g in GROUP_SIZES if g <= width]
        spec = replace(spec, group_size=fits[-1] if fits else None)
    return spec


def parse_output_spec(text: str) -> QuantSpec | str | None:
    """``keep`` -> None (embedding and head unquantized); ``auto`` -> ``AUTO`` (:func:`default_output_spec`,
    resolved by :func:`with_output_spec`); any spec string -> that spec."""
    word = text.strip().lower()
    if word == KEEP:
        return None
    if word == AUTO:
        return AUTO
    return QuantSpec.parse(text)


def budget_body(spec: QuantSpec, bits_per_weight: float | None) -> QuantSpec:
    """The body ``AUTO`` resolves against under a mixed-precision budget: ``bits_per_weight`` rounded
    down (2.34bpw and 4.25bpw are 2- and 4-bit bodies: w6g128; 6bpw and above: w8), else ``spec``,
    the plan's main spec (a size budget, whose body width is not known before the allocation).

    Before session 28 a budget kept both tensors unquantized by default: Qwen2.5-Coder-1.5B at
    2.34bpw stored 1317 MB where uniform w2g64vq with the auto outputs stored 734 MB, and its
    decode read an fp16 head."""
    if bits_per_weight is None:
        return spec
    return QuantSpec.parse(f"w{min(8, max(2, math.floor(bits_per_weight)))}")


def with_output_spec(plan: QuantizePlan, model: object, spec: QuantSpec | str | None,
                     body: QuantSpec | None = None) -> QuantizePlan:
    """``plan`` with the embedding (and an untied head) quantized at ``spec`` (``AUTO``: the default for
    ``body``, else the plan's own spec, :func:`default_output_spec`).

    ``model`` is anything :func:`bitsmith.models.open_source` accepts; only its config is read.
    An explicit ``quantize_head``/``quantize_embeddings`` in the plan wins (those tensors then
    follow the plan's own spec), and per-layer specs already in the plan are kept."""
    if spec is None or plan.quantize_head or plan.quantize_embeddings:
        return plan
    from bitsmith.models import embedding_and_head_names, open_source
    from bitsmith.models.meta import meta_model

    meta = meta_model(open_source(model).config)
    embedding, head = embedding_and_head_names(meta)
    if spec == AUTO:
        spec = default_output_spec(body or plan.spec, meta.get_input_embeddings().weight.shape[1])
    elif not isinstance(spec, QuantSpec):
        raise ValueError(f"output spec {spec!r}: give a spec (e.g. w8), {AUTO!r} or None (keep)")
    outputs = {embedding.removesuffix(".weight"): spec}
    if head is not None:  # untied: the head is its own tensor; tied: it computes from the embedding
        outputs[head.removesuffix(".weight")] = spec
    return replace(plan, quantize_embeddings=True, quantize_head=head is not None,
                   layer_specs={**outputs, **plan.layer_specs})
