"""The family table: one entry per family, the generic fallback, and the views other packages read."""
from __future__ import annotations

from bitsmith.models.family import (
    FAMILIES,
    FUSED_DECODE_TYPES,
    GENERIC,
    GGUF_ARCHES,
    MODEL_TYPE_TO_GGUF_ARCH,
    awq_scale_groups,
    family_of,
    gguf_pre_tokenizer,
)


def test_lookup_by_model_type_and_by_gguf_arch() -> None:
    assert family_of("qwen2").qkv_bias and not family_of("llama").qkv_bias
    assert family_of("gemma3_text").norms_per_layer == 4 and family_of("gemma3_text").qk_norm
    assert family_of("gemma").tied_by_default and family_of("gemma").norms_per_layer == 2
    # GGUF metadata names Gemma 3 "gemma3", the text decoder's model_type is "gemma3_text"
    assert family_of("gemma3").gguf == family_of("gemma3_text").gguf
    assert MODEL_TYPE_TO_GGUF_ARCH["gemma3_text"] == "gemma3" and MODEL_TYPE_TO_GGUF_ARCH["mistral"] == "llama"


def test_unknown_names_get_the_generic_family() -> None:
    for name in ("phi3", "", "Llama"):
        assert family_of(name) is GENERIC
    assert not GENERIC.tied_by_default and GENERIC.norms_per_layer == 2 and GENERIC.gguf is None
    assert awq_scale_groups("phi3") == awq_scale_groups()
    assert gguf_pre_tokenizer("phi3") == "default" and gguf_pre_tokenizer("qwen3") == "qwen2"


def test_every_gguf_architecture_has_a_layout() -> None:
    assert sorted(GGUF_ARCHES) == ["gemma2", "gemma3", "llama", "qwen2", "qwen3"]
    assert GGUF_ARCHES["llama"].permute_qk and GGUF_ARCHES["gemma3"].norm_offset == 1.0
    for f in FAMILIES:
        assert (f.gguf_arch is None) == (f.gguf is None), f.model_type
        assert f.gguf_arch is None or f.gguf_arch in GGUF_ARCHES
    assert FUSED_DECODE_TYPES == {"llama", "qwen2", "gemma3_text"}
