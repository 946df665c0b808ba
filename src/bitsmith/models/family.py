"""Model families as data: the one table of what differs between decoder LLM families.

Everything bitsmith knows about a family *by name* is a field of :class:`Family` in
:data:`FAMILIES`, keyed by the Hugging Face ``model_type``. Lookups by :func:`family_of` also
accept llama.cpp's GGUF architecture name (``general.architecture``), because GGUF metadata names
the family that way. A name not in the table gets :data:`GENERIC`: a Llama-like decoder with two norms
per block, an untied head unless the config ties it, no q/k/v bias, no q/k norm, no GGUF layout and
no fused decode.

What is *not* per family stays generic and lives here too, as patterns over module names: the
execution order of a block's linears (:data:`LINEAR_ORDER`) and the groups AWQ scales together
(:data:`AWQ_GROUPS`). Finding the decoder blocks needs no table at all (see
:func:`bitsmith.models.arch.find_blocks`).

Adding a family is adding one :class:`Family` line; other packages read family facts only from here.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "ATTENTION_HINT",
    "AWQ_GROUPS",
    "FAMILIES",
    "FUSED_DECODE_TYPES",
    "GENERIC",
    "GGUF_ARCHES",
    "GGUF_PRE_TOKENIZERS",
    "HEAD_MODULE",
    "HEAD_WEIGHT",
    "LINEAR_ORDER",
    "MODEL_TYPE_TO_GGUF_ARCH",
    "AWQGroup",
    "Family",
    "GGUFArch",
    "awq_scale_groups",
    "family_of",
    "gguf_pre_tokenizer",
]

# The output head of every Hugging Face causal LM bitsmith supports: the module and its weight.
HEAD_MODULE = "lm_head"
HEAD_WEIGHT = f"{HEAD_MODULE}.weight"

# ------------------------------------------------------------------------------ generic patterns

# Execution order of a block's linears: the first pattern that matches the last name component
# (or the whole relative name) gives the rank; unmatched linears keep module order after these.
LINEAR_ORDER: tuple[str, ...] = (
    r"(q_proj|query|wq|q)$",
    r"(k_proj|key|wk|k)$",
    r"(v_proj|value|wv|v)$",
    r"(qkv_proj|query_key_value|c_attn|wqkv)$",
    r"(o_proj|out_proj|dense|wo|c_proj)$",
    r"(gate_proj|w1|gate)$",
    r"(up_proj|w3|up|fc1|c_fc|dense_h_to_4h)$",
    r"(gate_up_proj)$",
    r"(down_proj|w2|down|fc2|dense_4h_to_h)$",
)
# One-letter linear names (q, k, v) only count as attention inside a module named like this.
ATTENTION_HINT = re.compile(r"attn|attention")


@dataclass(frozen=True)
class AWQGroup:
    """Linears that AWQ scales together, as names of the *last* component of a block's modules."""

    prev: tuple[str, ...]  # op whose output the linears read; the first candidate present wins
    linears: tuple[str, ...]  # the consumers; all must be present
    blockers: str | None = None  # a module of this name in the block makes the fold invalid


AWQ_GROUPS: tuple[AWQGroup, ...] = (
    AWQGroup(prev=("input_layernorm",), linears=("q_proj", "k_proj", "v_proj")),
    AWQGroup(prev=("v_proj",), linears=("o_proj",), blockers="v_norm"),
    # Gemma 2/3 read pre_feedforward_layernorm in the MLP; post_attention_layernorm there normalises
    # the attention output instead, so the order of the candidates matters.
    AWQGroup(prev=("pre_feedforward_layernorm", "post_attention_layernorm"), linears=("gate_proj", "up_proj")),
    AWQGroup(prev=("up_proj",), linears=("down_proj",)),
)

# ------------------------------------------------------------------------------ GGUF layouts

_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GEMMA_BLOCK = {
    **_LLAMA_BLOCK,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    **_QK_NORM,
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": HEAD_MODULE}


@dataclass(frozen=True)
class GGUFArch:
    """How one GGUF architecture's tensors map back to the Hugging Face model.

    llama.cpp's converter renames tensors (``blk.N.attn_q.weight``), interleaves the q/k rows of
    the llama family for its rotary kernel, and stores Gemma's RMSNorm weights as ``1 + w``; each
    of these is a field here, undone by :mod:`bitsmith.models.gguf_source`.
    """

    block: Mapping[str, str]  # GGUF block tensor stem -> HF name inside model.layers.N
    top: Mapping[str, str] = field(default_factory=lambda: dict(_TOP))
    permute_qk: bool = False  # the converter interleaved q/k rows for rotary (llama family)
    norm_offset: float = 0.0  # the converter stored norm weights as offset + w
    ignore: frozenset[str] = frozenset({"rope_freqs"})  # GGUF-only tensors, no HF parameter


_LLAMA_GGUF = GGUFArch(_LLAMA_BLOCK, permute_qk=True)
_GEMMA3_GGUF = GGUFArch(_GEMMA_BLOCK, norm_offset=1.0)

# ------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Family:
    """What bitsmith needs to know about one model family beyond its config and modules."""

    model_type: str  # Hugging Face config.model_type
    gguf_arch: str | None = None  # llama.cpp general.architecture; None: no GGUF support
    gguf: GGUFArch | None = None  # tensor layout of that GGUF architecture
    gguf_pre_tokenizer: str = "default"  # llama.cpp tokenizer.ggml.pre for BPE vocabularies
    tied_by_default: bool = False  # the head reuses the embedding when the config does not say
    norms_per_layer: int = 2  # RMSNorm vectors of size hidden per block (Gemma 2/3: four)
    qkv_bias: bool = False  # q/k/v carry a bias even without config.attention_bias (Qwen2)
    qk_norm: bool = False  # each query and key head is RMS-normalised (Gemma 3, Qwen3)
    fused_decode: bool = False  # infer.lean's forward (and the fused native decode) supports it
    awq_groups: tuple[AWQGroup, ...] = AWQ_GROUPS  # what AWQ scales together


FAMILIES: tuple[Family, ...] = (
    Family("llama", "llama", _LLAMA_GGUF, "llama-bpe", fused_decode=True),
    Family("mistral", "llama", _LLAMA_GGUF),
    Family("qwen2", "qwen2", GGUFArch(_LLAMA_BLOCK), "qwen2", qkv_bias=True, fused_decode=True),
    Family("qwen3", "qwen3", GGUFArch({**_LLAMA_BLOCK, **_QK_NORM}), "qwen2", qk_norm=True),
    Family("gemma", tied_by_default=True),
    Family("gemma2", "gemma2", GGUFArch(_GEMMA_BLOCK, norm_offset=1.0), tied_by_default=True,
           norms_per_layer=4),
    # Gemma 3's multimodal model_type and its text decoder's share one GGUF architecture.
    Family("gemma3", "gemma3", _GEMMA3_GGUF, tied_by_default=True, norms_per_layer=4, qk_norm=True),
    Family("gemma3_text", "gemma3", _GEMMA3_GGUF, tied_by_default=True, norms_per_layer=4,
           qk_norm=True, fused_decode=True),
)
GENERIC = Family("generic")

_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES}
_BY_GGUF_ARCH: dict[str, Family] = {}
for _f in FAMILIES:
    if _f.gguf_arch is not None:
        _BY_GGUF_ARCH.setdefault(_f.gguf_arch, _f)  # the first family of an architecture speaks for it
del _f

# GGUF architecture name -> layout, and HF model_type -> GGUF architecture name (both read-only).
GGUF_ARCHES: Mapping[str, GGUFArch] = MappingProxyType(
    {arch: f.gguf for arch, f in _BY_GGUF_ARCH.items() if f.gguf is not None}
)
MODEL_TYPE_TO_GGUF_ARCH: Mapping[str, str] = MappingProxyType(
    {f.model_type: f.gguf_arch for f in FAMILIES if f.gguf_arch is not None}
)
# HF model_type -> llama.cpp tokenizer.ggml.pre, for the families that have a name of their own.
GGUF_PRE_TOKENIZERS: Mapping[str, str] = MappingProxyType(
    {f.model_type: f.gguf_pre_tokenizer for f in FAMILIES if f.gguf_pre_tokenizer != "default"}
)
# model_types that infer.lean's generic forward knows.
FUSED_DECODE_TYPES: frozenset[str] = frozenset(f.model_type for f in FAMILIES if f.fused_decode)


def family_of(name: str) -> Family:
    """The family of an HF ``model_type`` or a GGUF architecture name; :data:`GENERIC` if unknown."""
    return _BY_MODEL_TYPE.get(name) or _BY_GGUF_ARCH.get(name) or GENERIC


def gguf_pre_tokenizer(model_type: str) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for a BPE vocabulary of this family."""
    found = _BY_MODEL_TYPE.get(model_type)
    return found.gguf_pre_tokenizer if found is not None else "default"


def awq_scale_groups(model_type: str | None = None) -> tuple[AWQGroup, ...]:
    """The groups AWQ scales together; the generic patterns when the family is not known."""
    return AWQ_GROUPS if model_type is None else family_of(model_type).awq_groups
