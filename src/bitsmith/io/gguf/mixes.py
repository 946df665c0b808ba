"""llama.cpp's type mixes: which GGUF type each tensor of a ``Q4_K_M`` (``Q3_K_M``, ...) file gets.

Learned from llama.cpp ``src/llama-quant.cpp`` (``llama_tensor_get_type_impl``), non-MoE, non-Falcon
path. A mix is a base type plus upgrades of ``attn_v``, ``ffn_down`` and ``attn_output`` by layer
position (:class:`Rule`); rows that fit no block of the chosen type fall back as llama.cpp's
``tensor_type_fallback`` does. Pure data and one pure function, :func:`pick_type`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from bitsmith.formats.ggml_types import get_type


class ExportError(ValueError):
    """The model cannot be exported as asked; the message says why and what to do."""


class Rule(enum.Enum):
    """When a layer gets the mix's larger type (i: the layer's index among n such layers)."""

    NEVER = "never"
    MORE_BITS = "more_bits"  # llama.cpp's use_more_bits: first and last eighth, and every third between
    FIRST_EIGHTH = "first_eighth"  # i < n / 8
    FIRST_FOUR = "first_four"  # i < 4
    FIRST_TWO = "first_two"  # i < 2
    FIRST_SIXTEENTH = "first_sixteenth"  # i < n / 16
    GQA4 = "gqa4"  # every layer, when each k/v head serves at least 4 query heads


@dataclass(frozen=True)
class Mix:
    """A llama.cpp file type: the base type and the per-tensor upgrades of llama_tensor_get_type.
    attn_v / ffn_down: (rule, type when the rule holds, type otherwise; "" keeps the base)."""

    base: str
    attn_v: tuple[Rule, str, str] = (Rule.NEVER, "", "")
    ffn_down: tuple[Rule, str, str] = (Rule.NEVER, "", "")
    attn_output: str = ""  # "" keeps the base type


# Every quantized mix: output.weight (and token_embd.weight when the head is tied) -> Q6_K, or Q8_0
# when the row is not a multiple of 256 (Q8_0 mixes keep Q8_0); an untied token_embd keeps the base.
# Q4_0/Q5_0 give the first eighth of ffn_down Q4_1/Q5_1: llama.cpp does so only with an imatrix,
# which quantizing from float weights always has unless asked not to.
MIXES: dict[str, Mix] = {
    "Q4_0": Mix("Q4_0", ffn_down=(Rule.FIRST_EIGHTH, "Q4_1", "")), "Q4_1": Mix("Q4_1"),
    "Q5_0": Mix("Q5_0", ffn_down=(Rule.FIRST_EIGHTH, "Q5_1", "")), "Q5_1": Mix("Q5_1"), "Q8_0": Mix("Q8_0"),
    "Q2_K": Mix("Q2_K", (Rule.GQA4, "Q4_K", "Q3_K"), (Rule.NEVER, "", "Q3_K"), "Q3_K"),
    "Q3_K_M": Mix("Q3_K", (Rule.FIRST_TWO, "Q5_K", "Q4_K"), (Rule.FIRST_SIXTEENTH, "Q5_K", "Q4_K"), "Q4_K"),
    "Q3_K_L": Mix("Q3_K", (Rule.NEVER, "", "Q5_K"), (Rule.NEVER, "", "Q5_K"), "Q5_K"),
    "Q4_K_S": Mix("Q4_K", (Rule.FIRST_FOUR, "Q5_K", ""), (Rule.FIRST_EIGHTH, "Q5_K", "")),
    "Q4_K_M": Mix("Q4_K", (Rule.MORE_BITS, "Q6_K", ""), (Rule.MORE_BITS, "Q6_K", "")),
    "Q5_K_S": Mix("Q5_K"),
    "Q5_K_M": Mix("Q5_K", (Rule.MORE_BITS, "Q6_K", ""), (Rule.MORE_BITS, "Q6_K", "")),
    "Q6_K": Mix("Q6_K"),
    "F16": Mix("F16"), "F32": Mix("F32"),
}
# Rows not a multiple of 256 (SmolLM2's 576, Gemma3-270M's 640): llama.cpp's tensor_type_fallback
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def rule_applies(rule: Rule, i: int, n: int, n_gqa: int = 1) -> bool:
    """Whether layer ``i`` of ``n`` gets the larger type under ``rule``."""
    return {Rule.NEVER: False, Rule.GQA4: n_gqa >= 4, Rule.FIRST_EIGHTH: i < n // 8, Rule.FIRST_FOUR: i < 4, Rule.FIRST_TWO: i < 2,
            Rule.FIRST_SIXTEENTH: i < n // 16,
            Rule.MORE_BITS: i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2}[rule]


def pick_type(mix_name: str, gguf_name: str, cols: int, n_layers: int, tied: bool, n_gqa: int = 1) -> str:
    """The GGUF type llama.cpp's mix ``mix_name`` gives matrix ``gguf_name`` with rows of ``cols``."""
    mix = mix_for(mix_name)
    if mix.base in ("F16", "F32"):
        return mix.base
    parts = gguf_name.rsplit(".", 1)[0].split(".")
    layer, kind = (int(parts[1]), parts[2]) if parts[0] == "blk" else (-1, parts[0])
    qtype = mix.base
    if kind == "output" or (kind == "token_embd" and tied):
        qtype = "Q8_0" if cols % 256 or mix.base == "Q8_0" else "Q6_K"
    elif kind in ("attn_v", "ffn_down"):
        rule, hi, otherwise = mix.attn_v if kind == "attn_v" else mix.ffn_down
        qtype = hi if rule_applies(rule, layer, n_layers, n_gqa) else (otherwise or mix.base)
    elif kind == "attn_output" and mix.attn_output:
        qtype = mix.attn_output
    if cols % get_type(qtype).block_size:
        qtype = FALLBACK.get(qtype, qtype)
    if cols % get_type(qtype).block_size:
        qtype = "F16"  # as llama.cpp: a row that fits no block stays 16-bit
    return qtype


def mix_for(name: str) -> Mix:
    """The mix called ``name`` (any case); ExportError naming the known ones otherwise."""
    mix = MIXES.get(name.upper())
    if mix is None:
        raise ExportError(f"unknown GGUF type {name!r}; use one of {', '.join(MIXES)}")
    return mix
