"""The default policy for the embedding table and the output head.

A checkpoint whose head stays in fp16 reads, per generated token, about as many head bytes as
4-bit body bytes on a small model (SmolLM2-135M: 57 MB of fp16 head against 57 MB of w4g128
body), so decode runs at half the speed it could. llama.cpp keeps its output tensor at 6-8 bits
for the same reason (Q6_K for its 2-5-bit types, Q8_0 for Q8_0). bitsmith's default follows the
body's width (:func:`default_output_spec`): ``w6g128`` under bodies of at most 4 bits, ``w8`` (one
scale per row) above; a tied head stays tied and computes from the quantized embedding. An untied
embedding table, only looked up, goes narrower under those bodies (:func:`default_embedding_spec`).

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
NARROW_EMBEDDING_SPEC = "w4g128"  # an untied input table under those bodies
KEEP = "keep"
AUTO = "auto"


def _fitted(spec: QuantSpec, width: int) -> QuantSpec:
    """``spec`` with a group never wider than the row (tiny models)."""
    if spec.group_size is not None and spec.group_size > width:
        fits = [g for g in GROUP_SIZES if g <= width]
        spec = replace(spec, group_size=fits[-1] if fits else None)
    return spec


def default_output_spec(body: QuantSpec, width: int) -> QuantSpec:
    """The embedding/head spec bitsmith uses without ``--output-spec`` for a body quantized at ``body``,
    for an embedding of ``width`` features: a group never wider than the row (tiny models)."""
    return _fitted(QuantSpec.parse(NARROW_OUTPUT_SPEC if body.bits <= NARROW_BODY_BITS else DEFAULT_OUTPUT_SPEC), width)


def default_embedding_spec(body: QuantSpec, width: int) -> QuantSpec:
    """The spec of an untied input embedding table without ``--embedding-spec``: ``w4g128`` under bodies
    of at most 4 bits (where the head gets w6g128: llama.cpp's Q4_K_M keeps Q4_K / Q6_K), else the head's.

    A lookup reads one row per token, so the table's width costs file and memory bytes, not decode
    time. Measured on Qwen2.5-Coder-1.5B (session 29, 4 + 4 held-out windows, float32 reference),
    prose / code KLD with the table at w6g128 -> w4g128:

    - w4g128 body: 0.0809 / 0.0333 -> 0.0822 / 0.0340 (+1.6% / +2.1%), 1073 -> 1015 MB;
    - w3g128 body: 0.4195 / 0.1782 -> 0.4214 / 0.1810 (+0.5% / +1.6%), 909 -> 851 MB;
    - the 2.34bpw budget mix: 0.5557 / 0.2627 -> 0.5575 / 0.2634 (+0.3%), 760 -> 702 MB.

    Narrower tables cost more (w3g128 under the mix +2.7% / +0.7%, 673 MB; w2g64 +8.3% / +4.0%, 651
    MB); ``--embedding-spec`` gives them. A tied table is the head: it keeps the head's spec."""
    if body.bits > NARROW_BODY_BITS:
        return default_output_spec(body, width)
    return _fitted(QuantSpec.parse(NARROW_EMBEDDING_SPEC), width)


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
                     body: QuantSpec | None = None, embedding: QuantSpec | str | None = AUTO) -> QuantizePlan:
    """``plan`` with the head and the embedding table quantized: the head at ``spec`` (``AUTO``: the
    default for ``body``, else the plan's own spec, :func:`default_output_spec`; None: kept), the
    embedding at ``embedding`` (``AUTO``: :func:`default_embedding_spec` when ``spec`` is ``AUTO``, else
    the head's; None: kept).

    A tied model has one table for both: an ``embedding`` other than the head's is refused (a
    ValueError that says so). ``model`` is anything :func:`bitsmith.models.open_source` accepts; only
    its config is read. An explicit ``quantize_head``/``quantize_embeddings`` in the plan wins (those
    tensors then follow the plan's own spec), and per-layer specs already in the plan are kept."""
    if (spec is None and embedding in (None, AUTO)) or plan.quantize_head or plan.quantize_embeddings:
        return plan
    from bitsmith.models import embedding_and_head_names, open_source
    from bitsmith.models.meta import meta_model

    meta = meta_model(open_source(model).config)
    embedding_name, head = embedding_and_head_names(meta)
    width = meta.get_input_embeddings().weight.shape[1]
    head_spec = _resolved(spec, default_output_spec(body or plan.spec, width))
    if embedding == AUTO:
        auto = spec == AUTO and head is not None
        table = default_embedding_spec(body or plan.spec, width) if auto else head_spec
    else:
        table = _resolved(embedding, None)
    if head is None and table != head_spec:  # tied: the head computes from the embedding table
        raise ValueError(f"this model ties its output head to its embedding table, so one spec covers both: "
                         f"give it with --output-spec ({_name(head_spec)}), not a separate --embedding-spec "
                         f"({_name(table)})")
    outputs = {} if table is None else {embedding_name.removesuffix(".weight"): table}
    if head is not None and head_spec is not None:  # untied: the head is its own tensor
        outputs[head.removesuffix(".weight")] = head_spec
    return replace(plan, quantize_embeddings=table is not None, quantize_head=head is not None and head_spec is not None,
                   layer_specs={**outputs, **plan.layer_specs})


def _resolved(spec: QuantSpec | str | None, auto: QuantSpec | None) -> QuantSpec | None:
    if spec == AUTO:
        return auto
    if spec is not None and not isinstance(spec, QuantSpec):
        raise ValueError(f"output spec {spec!r}: give a spec (e.g. w8), {AUTO!r} or None (keep)")
    return spec


def _name(spec: QuantSpec | None) -> str:
    return KEEP if spec is None else str(spec)
