"""The default policy for the embedding table and the output head.

A checkpoint whose head stays in fp16 reads, per generated token, about as many head bytes as
4-bit body bytes on a small model (SmolLM2-135M: 57 MB of fp16 head against 57 MB of w4g128
body), so decode runs at half the speed it could. llama.cpp keeps its output tensor at 6-8 bits
for the same reason. bitsmith's default is therefore the embedding and the head at ``w8`` (one
8-bit scale per row); a tied head stays tied and computes from the 8-bit embedding.

The quality cost of this default is measured in bench/results/speed (``bench/output_layers.py``).
``keep`` restores the old behaviour (both tensors at the plan's ``unquantized_dtype``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from bitsmith.spec import QuantSpec

if TYPE_CHECKING:
    from bitsmith.pipeline.plan import QuantizePlan

DEFAULT_OUTPUT_SPEC = "w8"
KEEP = "keep"


def parse_output_spec(text: str) -> QuantSpec | None:
    """``keep`` -> None (embedding and head unquantized); any spec string -> that spec."""
    if text.strip().lower() == KEEP:
        return None
    return QuantSpec.parse(text)


def with_output_spec(plan: QuantizePlan, model: object, spec: QuantSpec | None) -> QuantizePlan:
    """``plan`` with the embedding (and an untied head) quantized at ``spec``.

    ``model`` is anything :func:`bitsmith.models.open_source` accepts; only its config is read.
    An explicit ``quantize_head``/``quantize_embeddings`` in the plan wins (those tensors then
    follow the plan's own spec), and per-layer specs already in the plan are kept."""
    if spec is None or plan.quantize_head or plan.quantize_embeddings:
        return plan
    from bitsmith.models import embedding_and_head_names, open_source
    from bitsmith.models.meta import meta_model

    embedding, head = embedding_and_head_names(meta_model(open_source(model).config))
    outputs = {embedding.removesuffix(".weight"): spec}
    if head is not None:  # untied: the head is its own tensor; tied: it computes from the embedding
        outputs[head.removesuffix(".weight")] = spec
    return replace(plan, quantize_embeddings=True, quantize_head=head is not None,
                   layer_specs={**outputs, **plan.layer_specs})
