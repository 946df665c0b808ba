"""Export to GGUF, the file format of llama.cpp: ``export_gguf(model, out, qtype)``.

Two routes, chosen by what ``model`` is:

(a) A bitsmith checkpoint: each quantized layer whose grid a GGUF type stores exactly is re-encoded
    from its codes, with no new rounding: ``w4g32s`` -> Q4_0 (``w = d (q - 8)``), ``w5g32s`` -> Q5_0,
    ``w8g32s`` -> Q8_0 (``q - 128`` as int8), ``w4g32`` -> Q4_1 and ``w5g32`` -> Q5_1
    (``w = d q + m`` with ``d = scale`` and ``m = -zero * scale`` rounded to fp16: the one rounding
    step, reported per tensor as ``max_abs_error``; zero for integer zeros whose product fits fp16).
    Any other spec, or a ``qtype`` other than the exact one, re-quantizes the dequantized weights
    into ``qtype`` and reports the extra error (SQNR, dB) against the checkpoint's own weights.
    Tensors the checkpoint kept unquantized are written as stored (F16 matrices, F32 vectors).
(b) Any other model (Hugging Face folder, GGUF file, alias): every matrix is quantized straight to
    the llama.cpp mix named by ``qtype`` (see :data:`MIXES`), with importance weights (llama.cpp's
    imatrix: per-input-channel mean squared activation) from a forward pass over calibration text.

Names, llama q/k row interleaving and Gemma's ``1 + w`` norms are the reverse of
:mod:`bitsmith.models.gguf_source` (its :data:`GGUF_ARCHES` table is the one source of truth).
Metadata: when the model came from a GGUF file (an alias, or a checkpoint whose report names a
``.gguf`` source), that file's ``general.*``, ``tokenizer.*`` and hyperparameter keys are copied
verbatim, the most faithful route; otherwise hyperparameters come from the config (the reverse of
transformers' ``GGUF_CONFIG_MAPPING``) and the vocabulary from the tokenizer files via gguf-py's
vocab readers. The file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitsmith.formats.ggml_kquants import half_bytes
from bitsmith.formats.ggml_types import pack_legacy, decode, encode, get_type
from bitsmith.models.family import GGUF_PRE_TOKENIZERS, MODEL_TYPE_TO_GGUF_ARCH
from bitsmith.primitives import sqnr_db
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

log = logging.getLogger(__name__)

# HF model_type -> GGUF architecture (names as llama.cpp spells them)
MODEL_TYPE_TO_ARCH = MODEL_TYPE_TO_GGUF_ARCH  # both from the family table (models.family)
# llama.cpp's tokenizer.ggml.pre names for BPE vocabularies, by model_type (else "default")
PRE_TOKENIZER = GGUF_PRE_TOKENIZERS
_SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version", "general.alignment")


class ExportError(ValueError):
    """The model cannot be exported as asked; the message says why and what to do."""


# ------------------------------------------------------------------------------ type mixes


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


# Learned from llama.cpp src/llama-quant.cpp (llama_tensor_get_type_impl), non-MoE, non-Falcon path.
# Every quantized mix: output.weight (and token_embd.weight when the head is tied) -> Q6_K, or Q8_0
# when the row is not a multiple of 256 (Q8_0 mixes keep Q8_0); an untied token_embd keeps the base.
# Q4_0/Q5_0 give the first eighth of ffn_down Q4_1/Q5_1: llama.cpp does so only with an imatrix,
# which route (b) always has unless asked not to.
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


def _rule_applies(rule: Rule, i: int, n: int, n_gqa: int = 1) -> bool:
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
        qtype = hi if _rule_applies(rule, layer, n_layers, n_gqa) else (otherwise or mix.base)
    elif kind == "attn_output" and mix.attn_output:
        qtype = mix.attn_output
    if cols % get_type(qtype).block_size:
        qtype = FALLBACK.get(qtype, qtype)
    if cols % get_type(qtype).block_size:
        qtype = "F16"  # as llama.cpp: a row that fits no block stays 16-bit
    return qtype


def mix_for(name: str) -> Mix:
    mix = MIXES.get(name.upper())
    if mix is None:
        raise ExportError(f"unknown GGUF type {name!r}; use one of {', '.join(MIXES)}")
    return mix


# ------------------------------------------------------------------------------ exact re-encoding

# spec string -> (GGUF type, code offset): the GGUF types that store these grids as they are
EXACT_TYPES = {"w4g32s": ("Q4_0", 8), "w5g32s": ("Q5_0", 16), "w8g32s": ("Q8_0", 128),
               "w4g32": ("Q4_1", 0), "w5g32": ("Q5_1", 0)}


def exact_type(spec: QuantSpec) -> str | None:
    """The GGUF type that holds ``spec``'s codes without re-rounding them, or None."""
    found = EXACT_TYPES.get(str(spec))
    return found[0] if found else None


def encode_exact(qt: QuantizedTensor) -> tuple[str, np.ndarray, float]:
    """GGUF blocks holding ``qt``'s codes as they are: (type, uint8 [out, row_bytes], max |error|)
    against ``qt.dequantize()``; the error is the fp16 rounding of Q4_1/Q5_1's ``m = -zero*scale``."""
    name = exact_type(qt.spec)
    if name is None:
        raise ExportError(f"{qt.spec} has no exact GGUF type; exact types exist for {', '.join(EXACT_TYPES)}")
    _, offset = EXACT_TYPES[str(qt.spec)]
    rows, cols = qt.shape
    q = qt.codes.numpy().reshape(-1, 32).astype(np.int16)  # [B, 32], blocks = groups
    d = qt.scale.numpy().reshape(-1).astype(np.float32)  # [B]; fp16 values, exact in f32
    if name == "Q8_0":
        body = [half_bytes(d), (q - offset).astype(np.int8).view(np.uint8)]
    elif qt.zero is None:  # Q4_0 / Q5_0: w = d * (q - offset), offset = the symmetric midpoint
        body = [half_bytes(d), *pack_legacy(q, qt.spec.bits)]
    else:  # Q4_1 / Q5_1: w = d * q + m
        m = (-qt.zero.numpy().reshape(-1).astype(np.float64) * d).astype(np.float32)
        body = [half_bytes(d), half_bytes(m), *pack_legacy(q, qt.spec.bits)]
    data = np.concatenate(body, axis=1).reshape(rows, -1)
    err = np.abs(decode(data, name, (rows, cols)) - qt.dequantize().numpy()).max(initial=0.0)
    return name, data, float(err)


# ------------------------------------------------------------------------------ names and layout


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary row interleave (inverse of gguf_source.unpermute_qk), rows of any array."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class Naming:
    """HF -> GGUF names and per-tensor fix-ups for one architecture."""

    arch_name: str
    n_head: int
    n_head_kv: int
    reverse_block: dict[str, str]
    reverse_top: dict[str, str]
    permute_qk: bool
    norm_offset: float

    @classmethod
    def for_config(cls, config: Any) -> "Naming":
        from bitsmith.models.gguf_source import GGUF_ARCHES

        arch_name = MODEL_TYPE_TO_ARCH.get(config.model_type)
        if arch_name is None or arch_name not in GGUF_ARCHES:
            raise ExportError(f"GGUF export of {config.model_type!r} models is not supported yet (supported: "
                              f"{', '.join(sorted(MODEL_TYPE_TO_ARCH))}); add it to MODEL_TYPE_TO_ARCH and GGUF_ARCHES")
        arch = GGUF_ARCHES[arch_name]
        n_head = config.num_attention_heads
        return cls(arch_name, n_head, getattr(config, "num_key_value_heads", None) or n_head,
                   {v: k for k, v in arch.block.items()}, {v: k for k, v in arch.top.items()},
                   arch.permute_qk, arch.norm_offset)

    def gguf_name(self, hf_name: str) -> str | None:
        stem, _, suffix = hf_name.rpartition(".")
        parts = stem.split(".")
        if len(parts) > 3 and parts[:2] == ["model", "layers"]:
            block = self.reverse_block.get(".".join(parts[3:]))
            return None if block is None else f"blk.{parts[2]}.{block}.{suffix}"
        top = self.reverse_top.get(stem)
        return None if top is None else f"{top}.{suffix}"

    def fix_rows(self, gguf_name: str, rows: np.ndarray) -> np.ndarray:
        """Row permutation of q/k (llama family); applies to weights, codes, scales and biases alike."""
        stem = gguf_name.rsplit(".", 1)[0]
        if self.permute_qk and stem.endswith((".attn_q", ".attn_k")):
            return permute_qk(rows, self.n_head if stem.endswith(".attn_q") else self.n_head_kv)
        return rows

    def fix_values(self, gguf_name: str, values: np.ndarray) -> np.ndarray:
        if self.norm_offset and gguf_name.rsplit(".", 1)[0].endswith("norm"):
            return values + np.float32(self.norm_offset)  # Gemma: the converter stores 1 + w
        return values


# ------------------------------------------------------------------------------ metadata


def _add_value(writer: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))


def copy_gguf_metadata(writer: Any, origin: Path) -> None:
    """Every key of ``origin`` but the container and file-type ones, with its original value type."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(origin))
    for key, fld in reader.fields.items():
        if key.startswith(_SKIP_KEYS):
            continue
        vtype = GGUFValueType(fld.types[0])
        sub = GGUFValueType(fld.types[-1]) if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, fld.contents(), vtype, sub_type=sub)


def config_metadata(config: Any, arch_name: str) -> dict[str, Any]:
    """Hyperparameter keys from a transformers config: the reverse of transformers' GGUF_CONFIG_MAPPING."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    rope = getattr(config, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope)  # Gemma3: per layer type; global layers carry the model's theta
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    values = {"rope_theta": rope.get("rope_theta", getattr(config, "rope_theta", None)), "head_dim": head_dim}
    meta: dict[str, Any] = {}
    for key, attr in GGUF_CONFIG_MAPPING.get(arch_name, {}).items():
        value = values.get(attr) if attr in values else getattr(config, attr, None) if attr else None
        if value is not None:
            meta[f"{arch_name}.{key}"] = float(value) if key in ("rope.freq_base", "attention.layer_norm_rms_epsilon") else int(value)
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and scalar != head_dim:
        log.warning("query_pre_attn_scalar %s != head_dim %s: llama.cpp scales attention by 1/sqrt(head_dim), "
                    "so this GGUF will not reproduce the model", scalar, head_dim)
    meta[f"{arch_name}.rope.dimension_count"] = int(head_dim)
    meta[f"{arch_name}.attention.key_length"] = meta[f"{arch_name}.attention.value_length"] = int(head_dim)
    return meta


def write_tokenizer(writer: Any, folder: Path, model_type: str, n_vocab: int) -> None:
    """tokenizer.ggml.* from Hugging Face tokenizer files, through gguf-py's vocab readers:
    byte-level BPE -> "gpt2" with merges, byte-fallback BPE -> "llama" (SentencePiece-style);
    any other tokenizer -> "gpt2" with its tokens and no merges (llama.cpp then tokenizes badly:
    such a file is for tensors and tests, a warning says so). One entry per embedding row."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab

    vocab: Any = None
    for cls in (BpeVocab, LlamaHfVocab):
        try:
            vocab = cls(folder)
            break
        except (FileNotFoundError, TypeError):
            continue
    if vocab is not None:
        tokens, scores, types = (list(x) for x in zip(*vocab.all_tokens()))
        model = vocab.tokenizer_model
    else:
        from transformers import AutoTokenizer

        log.warning("%s: tokenizer is neither byte-level nor byte-fallback BPE; writing its tokens without merges", folder)
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        special = set(tok.all_special_tokens)
        tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
        types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
        scores, model = [], "gpt2"
    if model == "gpt2":
        scores = [-float(i) for i in range(len(tokens))]  # ranks: readers rebuild merges when there are none
    # pad as llama.cpp's converter does, or cut tokens added past the embedding (no vector to look up)
    pad = range(len(tokens), n_vocab)
    tokens = [t.encode() if isinstance(t, str) else t for t in tokens][:n_vocab] + [f"[PAD{i}]".encode() for i in pad]
    types = [int(t) for t in types][:n_vocab] + [int(gguf.TokenType.UNUSED)] * len(pad)
    scores = [float(x) for x in scores][:n_vocab] + [-1000.0] * len(pad)
    writer.add_tokenizer_model(model)
    if model == "gpt2":
        writer.add_tokenizer_pre(PRE_TOKENIZER.get(model_type, "default") if vocab is not None else "default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    SpecialVocab(folder, load_merges=model == "gpt2" and vocab is not None, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)


def gguf_origin(source: Any, report: dict) -> Path | None:
    """The GGUF file the model came from, if any: its metadata is the faithful one to copy."""
    if source.kind == "gguf":
        return Path(source.path)
    origin = report.get("source")
    if origin and str(origin).endswith(".gguf") and Path(origin).is_file():
        return Path(origin)
    return None


# ------------------------------------------------------------------------------ importance


def activation_importance(model: str | Path, tokens: int = 4096, seq_len: int = 512) -> dict[str, np.ndarray]:
    """llama.cpp's imatrix: per linear layer (HF weight name), the mean squared input activation of
    each input channel over ``tokens`` tokens of the shipped calibration text (State of the Union)."""
    return calibration_statistics(model, tokens, seq_len)[0]


def calibration_statistics(model: str | Path, tokens: int = 4096, seq_len: int = 512, hessians: bool = False,
                           ) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """One forward pass over ``tokens`` tokens of the shipped calibration text (State of the Union):
    (imatrix: HF weight name -> mean squared input activation per input channel,
     hessians: HF weight name -> X^T X / tokens (float32 [in, in]) of the decoder blocks' linears,
     empty unless ``hessians``). The imatrix is the Hessian's diagonal."""
    from importlib.resources import files

    from bitsmith.runtime.load import load_model

    loaded = load_model(model)
    text = files("bitsmith.data").joinpath("sotu_calibration.txt").read_text(encoding="utf-8")
    ids = torch.tensor(loaded.tokenizer(text).input_ids[:tokens])  # [T]
    sums: dict[str, torch.Tensor] = {}
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    same_input: dict[str, str] = {}  # q/k/v (gate/up) read one tensor: one Gram matrix serves them all
    # this window's inputs -> (first module that read it, the input kept alive so that no later tensor reuses its address)
    seen: dict[tuple[int, tuple[int, ...]], tuple[str, torch.Tensor]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            key = (args[0].data_ptr(), tuple(args[0].shape))
            first = same_input.setdefault(name, seen.setdefault(key, (name, args[0]))[0])
            if first != name:
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1])  # [tokens, in]
            sums[name] = sums.get(name, 0) + (x.double() ** 2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
            if hessians and ".layers." in name:
                xf = x.float()
                grams[name] = grams.get(name, 0) + xf.T @ xf
        return record

    handles = [m.register_forward_pre_hook(hook(f"{n}.weight")) for n, m in loaded.model.named_modules()
               if isinstance(m, torch.nn.Linear) or type(m).__name__ == "QuantLinear"]
    try:
        with torch.inference_mode():
            for start in range(0, max(len(ids) - 1, 1), seq_len):
                seen.clear()
                loaded.model(ids[start:start + seq_len].unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    imat = {n: (sums[f] / counts[f]).float().numpy() for n, f in same_input.items()}
    mean = {f: g / counts[f] for f, g in grams.items()}
    return imat, {n: mean[f] for n, f in same_input.items() if f in mean}


def gptq_encode(weights: np.ndarray, hessian: torch.Tensor, qtype: str, importance: np.ndarray | None = None,
                damp: float = 0.01, block: int = 128) -> np.ndarray:
    """GGUF blocks of ``qtype`` for weights (rows, cols), with GPTQ error feedback on llama.cpp's own grid.

    Columns are quantized left to right; the rounding error of each is spread over the columns not
    yet quantized through the inverse Hessian ``hessian`` (cols, cols) = E[x x^T] of the layer's
    input, as GPTQ does. The grid (block scales and mins) of each GGUF block is chosen when the
    sweep reaches it, by the type's own (importance-weighted) encoder run on the weights as the
    feedback has updated them; the levels are then GPTQ's and are written into those blocks
    (:mod:`bitsmith.formats.ggml_grid`), so the file is plain ``qtype`` for every reader."""
    from bitsmith.formats.ggml_grid import grid, with_levels

    t = get_type(qtype)
    rows, cols = weights.shape
    size = t.block_size
    w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)).clone()  # [R, C]
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()  # [C, C]
    out = np.empty((rows, cols // size, t.type_size), np.uint8)
    levels = np.empty((rows, cols), np.int32)
    step = size * max(1, block // size)
    g = None
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % size == 0:  # a new GGUF block: fit its scales to the weights as updated so far
                data = encode(w1[:, i:i + size].numpy(), qtype, None if importance is None else importance[col:col + size])
                out[:, col // size] = data
                g = grid(data, qtype)
            q, val = g.quantize(w1[:, i].numpy(), col % size)
            levels[:, col] = q
            e = (w1[:, i] - torch.from_numpy(val)) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    for b in range(cols // size):
        out[:, b] = with_levels(out[:, b], qtype, levels[:, b * size:(b + 1) * size])
    return out.reshape(rows, -1)


# ------------------------------------------------------------------------------ the exporter


@dataclass(frozen=True)
class TensorExport:
    name: str  # GGUF name
    qtype: str
    route: str  # "exact" (codes kept) | "requantized" (from the checkpoint) | "quantized" | "copied"
    sqnr_db: float | None  # against what the input model computes with (inf: identical)
    max_abs_error: float


@dataclass(frozen=True)
class GGUFExport:
    path: Path
    file_type: str
    tensors: tuple[TensorExport, ...]
    metadata_from: str  # the GGUF file whose metadata was copied, or "config"


def _encode_tensor(gname: str, values: np.ndarray, qtype: str, imp: np.ndarray | None, naming: Naming,
                   reference: np.ndarray | None = None, hessian: torch.Tensor | None = None,
                   ) -> tuple[np.ndarray, TensorExport, str]:
    """Encode float values (HF layout) as ``qtype`` in GGUF layout, with the error it adds."""
    values = naming.fix_rows(gname, naming.fix_values(gname, values.astype(np.float32)))
    ref = values if reference is None else naming.fix_rows(gname, reference)
    if values.ndim < 2 or qtype == "F32":
        return values, TensorExport(gname, "F32", "copied", math.inf, 0.0), "F32"
    if hessian is not None and qtype not in ("F16", "F32", "BF16"):
        data = gptq_encode(values, hessian, qtype, imp)
    else:
        data = encode(values, qtype, imp)
    back = decode(data, qtype, values.shape)
    route = "copied" if qtype in ("F16", "F32") else "quantized" if reference is None else "requantized"
    err = TensorExport(gname, qtype, route, sqnr_db(torch.from_numpy(ref), torch.from_numpy(back)),
                       float(np.abs(back - ref).max(initial=0.0)))
    return data, err, qtype


def export_gguf(model: str | Path, out: str | Path, qtype: str | None = None, *, importance: bool = True,
                calibration_tokens: int = 4096, error_feedback: bool = False, overwrite: bool = False,
                calibration: tuple[dict[str, np.ndarray], dict[str, torch.Tensor]] | None = None,
                progress: Callable[[str, int, int], None] | None = None) -> GGUFExport:
    """Write ``model`` (a bitsmith checkpoint, HF folder, GGUF file or alias) as a GGUF file at ``out``.

    qtype: a llama.cpp type or mix (:data:`MIXES`). For a checkpoint, None keeps every layer whose
    spec has an exact GGUF type (:data:`EXACT_TYPES`) as it is; for other models it is required.
    error_feedback (route (b) only): GPTQ on the GGUF grid for the decoder blocks' matrices
    (:func:`gptq_encode`), with Hessians from the same calibration tokens as the importance.
    calibration: precomputed :func:`calibration_statistics` of ``model`` (to export several mixes
    from one forward pass); computed here when needed and not given."""
    import gguf

    from bitsmith.io.checkpoint import read_info
    from bitsmith.io.packed import quantized_tensors
    from bitsmith.models import open_source

    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; choose another --out or pass --overwrite")
    source = open_source(model)
    info = read_info(source.path) if source.kind == "bitsmith" else None
    if qtype is not None:
        qtype = qtype.upper()
        mix_for(qtype)
    naming = Naming.for_config(source.config)
    quantized = quantized_tensors(source.path, info) if info else imported_layers(source, model)
    from_quantized = info is not None or bool(quantized)  # route (a): a checkpoint, or an imported GPTQ/GGUF model
    if not from_quantized and qtype is None:
        raise ExportError(f"{model} is not quantized (not a bitsmith checkpoint, GPTQ folder or GGUF file), so it "
                          "needs a target type: pass --type (e.g. Q4_K_M or Q8_0)")
    if qtype is None:
        missing = sorted({str(qt.spec) for qt in quantized.values() if exact_type(qt.spec) is None})
        if missing:
            raise ExportError(f"{', '.join(missing)} has no exact GGUF type (exact: {', '.join(EXACT_TYPES)}); "
                              "pass --type (e.g. Q4_K_M or Q8_0) to re-quantize into a GGUF type")
    imat: dict[str, np.ndarray] = {}
    hess: dict[str, torch.Tensor] = {}
    if error_feedback and from_quantized:
        raise ExportError("error feedback (GPTQ) applies when quantizing from unquantized weights; "
                          f"{model} is already quantized: export it without it, or quantize it with --method gptq")
    if not from_quantized and qtype not in ("F16", "F32") and (error_feedback or (importance and qtype != "Q8_0")):
        imat, hess = calibration if calibration is not None else calibration_statistics(
            model, calibration_tokens, hessians=error_feedback)
        if not error_feedback:
            hess = {}
        if not importance:
            imat = {}
    names = source.tensor_names()
    tied = "lm_head.weight" not in names and "lm_head" not in quantized
    n_layers = source.config.num_hidden_layers
    n_gqa = source.config.num_attention_heads // (getattr(source.config, "num_key_value_heads", None) or source.config.num_attention_heads)
    origin = gguf_origin(source, info.report if info else {})

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(str(tmp), naming.arch_name)
        if origin is not None:
            copy_gguf_metadata(writer, origin)
        else:
            writer.add_name(Path(str(model)).name)
            for key, value in config_metadata(source.config, naming.arch_name).items():
                _add_value(writer, key, value)
            folder = source.tokenizer_dir or source.path
            write_tokenizer(writer, Path(folder), source.config.model_type, source.config.vocab_size)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        results: list[TensorExport] = []
        types: dict[str, int] = {}
        for i, name in enumerate(names):
            module, _, part = name.rpartition(".")
            if module in quantized and part in ("scale", "zero", "grid", "qzeros", "scales", "g_idx"):
                continue
            is_quantized = module in quantized and part in ("qweight", "weight")
            if is_quantized:
                name = f"{module}.weight"
            gname = naming.gguf_name(name)
            if gname is None:
                log.warning("%s has no GGUF name in %s; left out", name, naming.arch_name)
                continue
            if is_quantized:
                data, res, used = _export_quantized(gname, quantized[module], qtype, naming, n_layers, tied, n_gqa)
            else:
                values = source.load_tensor(name).numpy()
                if values.ndim < 2:
                    used = "F32"
                elif from_quantized:  # a tensor the input kept unquantized (or in a type without group codes): as stored
                    stored = source.source_dtype(name)
                    used = ("F16" if stored.lower() in ("f16", "bf16") else stored if source.kind == "gguf" and stored != "BF16"
                            else "F32")
                else:
                    used = pick_type(qtype, gname, values.shape[-1], n_layers, tied, n_gqa)
                data, res, used = _encode_tensor(gname, values, used, imat.get(name) if used not in ("F16", "F32") else None,
                                                 naming, hessian=hess.get(name))
            _add_tensor(writer, gname, data, used)
            results.append(res)
            types[used] = types.get(used, 0) + (data.size if data.ndim > 1 else 0)
            if progress:
                progress(gname, i + 1, len(names))
        file_type = qtype or max(types, key=types.get)
        ftype = getattr(gguf.LlamaFileType, f"MOSTLY_{file_type}", gguf.LlamaFileType.GUESSED)
        writer.add_file_type(int(ftype) if file_type != "F32" else int(gguf.LlamaFileType.ALL_F32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return GGUFExport(out, file_type, tuple(results), str(origin) if origin else "config")


def imported_layers(source: Any, model: str | Path) -> dict[str, QuantizedTensor]:
    """The quantized layers of a GPTQ folder or of a GGUF file given by path (its matrices whose type maps
    onto bitsmith group codes, :mod:`bitsmith.io.import_gguf`); empty for unquantized models and aliases."""
    if source.kind == "hf":
        from bitsmith.io.import_gptq import load_gptq_folder, read_gptq_config

        if read_gptq_config(source.path) is None:
            return {}
        _, layers, _ = load_gptq_folder(source.path)
        if any(perm is not None for _, perm in layers.values()):
            raise ExportError(f"{source.path} uses GPTQ act-order (a permuted g_idx), whose groups are not contiguous "
                              "channel ranges as GGUF blocks are; load it with bitsmith (eval, generate) instead")
        return {name: qt for name, (qt, _) in layers.items()}
    if source.kind == "gguf" and Path(str(model)).expanduser().is_file():
        from bitsmith.io.import_gguf import gguf_quantized_tensors

        return gguf_quantized_tensors(source.path)[0]
    return {}


def _export_quantized(gname: str, qt: QuantizedTensor, qtype: str | None, naming: Naming, n_layers: int,
                      tied: bool, n_gqa: int = 1) -> tuple[np.ndarray, TensorExport, str]:
    """A checkpoint layer: its codes as they are when a GGUF type holds them, else re-quantized."""
    exact = exact_type(qt.spec)
    target = exact if qtype is None else pick_type(qtype, gname, qt.shape[1], n_layers, tied, n_gqa)
    if exact is not None and exact == target:
        rows = naming.fix_rows(gname, np.arange(qt.shape[0]))  # permute codes, scales and zeros alike
        idx = torch.from_numpy(rows)
        permuted = QuantizedTensor(qt.codes[idx], qt.scale[idx], None if qt.zero is None else qt.zero[idx], qt.spec)
        _, data, err = encode_exact(permuted)
        ref = permuted.dequantize().numpy()
        back = decode(data, exact, qt.shape)
        return data, TensorExport(gname, exact, "exact", sqnr_db(torch.from_numpy(ref), torch.from_numpy(back)), err), exact
    dq = qt.dequantize().numpy()
    return _encode_tensor(gname, dq, target, None, naming, reference=dq)


def _add_tensor(writer: Any, gname: str, data: np.ndarray, qtype: str) -> None:
    from gguf import GGMLQuantizationType

    if qtype == "F32":
        writer.add_tensor(gname, np.ascontiguousarray(data, dtype=np.float32))
    elif qtype == "F16":
        writer.add_tensor(gname, np.ascontiguousarray(data).view(np.float16))
    else:
        writer.add_tensor(gname, np.ascontiguousarray(data), raw_dtype=GGMLQuantizationType[qtype])
