"""Architecture shapes of popular open-weight decoder-only LLMs, as data.

An :class:`ArchShape` holds the handful of numbers that decide memory use: depth, widths, attention
heads (with grouped-query attention, GQA, the KV cache scales with ``kv_heads``, not ``heads``),
vocabulary, MLP width and whether the input embedding and the output head share one matrix.
The parameter count is *computed* from these shapes, never typed in, so a wrong shape shows up as a
wrong count against the model card.

Numbers come from each model's public ``config.json``. Multimodal models (Gemma 3 4B and up) are
described by their text decoder only; their vision tower (~0.4B parameters) is not counted.
Sliding-window layers (Gemma 2/3) are treated like global ones, so their KV cache is an upper bound.

Shapes of models not in the catalog come from :func:`shape_from_config` (an HF ``config.json`` dict
or GGUF metadata) or :func:`shape_from_path` (a model folder or a ``.gguf`` file).
"""
from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitsmith.io.gguf.header import GGUFArray
from bitsmith.models.family import family_of

__all__ = [
    "ArchShape",
    "CATALOG",
    "get_shape",
    "shape_from_config",
    "shape_from_gguf",
    "shape_from_path",
]

# Family facts (tied head by default, norms per block, q/k/v bias, q/k norm) come from the one
# family table, looked up by HF ``model_type`` or by GGUF architecture name.


@dataclass(frozen=True)
class ArchShape:
    """The shape of a decoder-only transformer with a gated (SwiGLU/GeGLU) MLP.

    Attributes:
        name: catalog name, lower case with dashes (``llama-3-70b``).
        layers: number of decoder blocks.
        hidden: model width (embedding size).
        heads: query heads.
        kv_heads: key/value heads (``< heads`` with grouped-query attention).
        head_dim: width of one attention head.
        vocab: vocabulary size (rows of the embedding matrix).
        intermediate: MLP width (gate and up project ``hidden -> intermediate``).
        tied_embeddings: the output head reuses the input embedding matrix.
        qkv_bias: q, k and v projections have a bias vector (Qwen2).
        norms_per_layer: RMSNorm weight vectors of size ``hidden`` per block (2, or 4 for Gemma 2/3).
        qk_norm: each block also norms its query and key heads (two vectors of ``head_dim``; Gemma 3).
    """

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int
    tied_embeddings: bool
    qkv_bias: bool = False
    norms_per_layer: int = 2
    qk_norm: bool = False

    def __post_init__(self) -> None:
        for field in ("layers", "hidden", "heads", "kv_heads", "head_dim", "vocab", "intermediate"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{self.name}: {field} must be positive, got {getattr(self, field)}")
        if self.heads % self.kv_heads:
            raise ValueError(
                f"{self.name}: {self.heads} query heads cannot be shared by {self.kv_heads} KV heads; "
                "heads must be a multiple of kv_heads"
            )

    @property
    def layer_linear_params(self) -> int:
        """Weights of the linear layers of one block (the part that gets quantized)."""
        q_dim = self.heads * self.head_dim
        kv_dim = self.kv_heads * self.head_dim
        attention = self.hidden * q_dim + 2 * self.hidden * kv_dim + q_dim * self.hidden  # q, k, v, o
        mlp = 3 * self.hidden * self.intermediate  # gate, up: hidden->inter; down: inter->hidden
        return attention + mlp

    @property
    def layer_other_params(self) -> int:
        """Small vectors of one block kept in full precision: norm weights and q/k/v biases."""
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        qk_norm = 2 * self.head_dim if self.qk_norm else 0
        return self.norms_per_layer * self.hidden + bias + qk_norm

    @property
    def block_linear_params(self) -> int:
        """Linear-layer weights of all decoder blocks together."""
        return self.layers * self.layer_linear_params

    @property
    def embedding_params(self) -> int:
        """Input embedding plus output head; a tied pair is one matrix, counted once."""
        matrices = 1 if self.tied_embeddings else 2
        return matrices * self.vocab * self.hidden

    @property
    def norm_params(self) -> int:
        """Norm weights and biases of all blocks plus the final norm."""
        return self.layers * self.layer_other_params + self.hidden

    @property
    def n_params(self) -> int:
        """Total parameter count, from the shapes."""
        return self.block_linear_params + self.embedding_params + self.norm_params


def _s(name: str, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, vocab: int,
       intermediate: int, tied: bool, qkv_bias: bool = False, norms: int = 2,
       qk_norm: bool = False) -> ArchShape:
    return ArchShape(name, layers, hidden, heads, kv_heads, head_dim, vocab, intermediate, tied,
                     qkv_bias, norms, qk_norm)


# name, layers, hidden, heads, kv_heads, head_dim, vocab, intermediate, tied embeddings
_SHAPES: tuple[ArchShape, ...] = (
    # Meta Llama 3 / 3.1 / 3.2
    _s("llama-3-8b", 32, 4096, 32, 8, 128, 128256, 14336, False),
    _s("llama-3-70b", 80, 8192, 64, 8, 128, 128256, 28672, False),
    _s("llama-3.1-8b", 32, 4096, 32, 8, 128, 128256, 14336, False),
    _s("llama-3.1-70b", 80, 8192, 64, 8, 128, 128256, 28672, False),
    _s("llama-3.1-405b", 126, 16384, 128, 8, 128, 128256, 53248, False),
    _s("llama-3.2-1b", 16, 2048, 32, 8, 64, 128256, 8192, True),
    _s("llama-3.2-3b", 28, 3072, 24, 8, 128, 128256, 8192, True),
    # Qwen 2.5 (q/k/v carry biases)
    _s("qwen2.5-0.5b", 24, 896, 14, 2, 64, 151936, 4864, True, qkv_bias=True),
    _s("qwen2.5-1.5b", 28, 1536, 12, 2, 128, 151936, 8960, True, qkv_bias=True),
    _s("qwen2.5-3b", 36, 2048, 16, 2, 128, 151936, 11008, True, qkv_bias=True),
    _s("qwen2.5-7b", 28, 3584, 28, 4, 128, 152064, 18944, False, qkv_bias=True),
    _s("qwen2.5-14b", 48, 5120, 40, 8, 128, 152064, 13824, False, qkv_bias=True),
    _s("qwen2.5-32b", 64, 5120, 40, 8, 128, 152064, 27648, False, qkv_bias=True),
    _s("qwen2.5-72b", 80, 8192, 64, 8, 128, 152064, 29568, False, qkv_bias=True),
    _s("qwen2.5-coder-1.5b", 28, 1536, 12, 2, 128, 151936, 8960, True, qkv_bias=True),
    # Mistral 7B (v0.1/v0.2 vocabulary 32000; v0.3 extended it to 32768)
    _s("mistral-7b", 32, 4096, 32, 8, 128, 32000, 14336, False),
    _s("mistral-7b-v0.3", 32, 4096, 32, 8, 128, 32768, 14336, False),
    # Google Gemma 2 and Gemma 3 (four norms per block; Gemma 3 also norms q and k; text decoder only)
    _s("gemma-2-2b", 26, 2304, 8, 4, 256, 256000, 9216, True, norms=4),
    _s("gemma-2-9b", 42, 3584, 16, 8, 256, 256000, 14336, True, norms=4),
    _s("gemma-2-27b", 46, 4608, 32, 16, 128, 256000, 36864, True, norms=4),
    _s("gemma-3-270m", 18, 640, 4, 1, 256, 262144, 2048, True, norms=4, qk_norm=True),
    _s("gemma-3-1b", 26, 1152, 4, 1, 256, 262144, 6912, True, norms=4, qk_norm=True),
    _s("gemma-3-4b", 34, 2560, 8, 4, 256, 262208, 10240, True, norms=4, qk_norm=True),
    _s("gemma-3-12b", 48, 3840, 16, 8, 256, 262208, 15360, True, norms=4, qk_norm=True),
    _s("gemma-3-27b", 62, 5376, 32, 16, 128, 262208, 21504, True, norms=4, qk_norm=True),
    # Microsoft Phi-3-mini (4k and 128k context share the shape)
    _s("phi-3-mini", 32, 3072, 32, 32, 96, 32064, 8192, False),
    # Hugging Face SmolLM2
    _s("smollm2-135m", 30, 576, 9, 3, 64, 49152, 1536, True),
    _s("smollm2-360m", 32, 960, 15, 5, 64, 49152, 2560, True),
    _s("smollm2-1.7b", 24, 2048, 32, 32, 64, 49152, 8192, True),
)

CATALOG: Mapping[str, ArchShape] = {shape.name: shape for shape in _SHAPES}

# Suffixes that name a fine-tune of the same shape (``Llama-3-70B-Instruct`` is ``llama-3-70b``).
_VARIANT_SUFFIXES = ("-instruct", "-chat", "-base", "-it", "-pt", "-hf")


def _normalize(name: str) -> str:
    key = name.strip().lower().replace("_", "-").rsplit("/", 1)[-1]
    if key.startswith("meta-llama-"):
        key = key[len("meta-"):]
    stripped = True
    while stripped:
        stripped = False
        for suffix in _VARIANT_SUFFIXES:
            if key.endswith(suffix):
                key, stripped = key[: -len(suffix)], True
    return key


def get_shape(name: str) -> ArchShape:
    """Look a model up in the catalog by name (case-insensitive; ``-instruct`` etc. ignored).

    Raises:
        KeyError: the name is unknown; the message lists the closest catalog names.
    """
    key = _normalize(name)
    if key in CATALOG:
        return CATALOG[key]
    close = difflib.get_close_matches(key, list(CATALOG), n=4, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else f"known models: {', '.join(CATALOG)}."
    raise KeyError(
        f"unknown model '{name}'; {hint} Or pass a model folder with config.json or a .gguf file."
    )


def _int(config: Mapping[str, Any], key: str, source: str, default: int | None = None) -> int:
    value = config.get(key)
    if value is None:
        if default is not None:
            return default
        raise ValueError(f"{source} has no '{key}'; cannot size this model without it")
    if isinstance(value, (list, tuple, GGUFArray)):
        raise ValueError(f"{source} gives '{key}' per layer; models whose layers differ in shape "
                         "are not supported by the planner")
    return int(value)


def _from_hf(config: Mapping[str, Any], name: str | None) -> ArchShape:
    text = config.get("text_config")  # multimodal configs nest the decoder (Gemma 3 4B+)
    if isinstance(text, Mapping):
        config = {**config, **text}
    model_type = str(config.get("model_type", "")).lower()
    src = "config.json"
    hidden = _int(config, "hidden_size", src)
    heads = _int(config, "num_attention_heads", src)
    kv_heads = _int(config, "num_key_value_heads", src, default=heads)
    head_dim = _int(config, "head_dim", src, default=hidden // heads)
    fam = family_of(model_type)
    tied = bool(config.get("tie_word_embeddings", fam.tied_by_default))
    qkv_bias = bool(config.get("attention_bias", fam.qkv_bias))
    label = name or str(config.get("_name_or_path") or model_type or "model")
    return ArchShape(
        name=label, layers=_int(config, "num_hidden_layers", src), hidden=hidden, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, vocab=_int(config, "vocab_size", src),
        intermediate=_int(config, "intermediate_size", src), tied_embeddings=tied,
        qkv_bias=qkv_bias, norms_per_layer=fam.norms_per_layer, qk_norm=fam.qk_norm,
    )


def _from_gguf_metadata(meta: Mapping[str, Any], name: str | None) -> ArchShape:
    arch = str(meta["general.architecture"])
    src = f"GGUF metadata (architecture '{arch}')"
    hidden = _int(meta, f"{arch}.embedding_length", src)
    heads = _int(meta, f"{arch}.attention.head_count", src)
    kv_heads = _int(meta, f"{arch}.attention.head_count_kv", src, default=heads)
    head_dim = _int(meta, f"{arch}.attention.key_length", src, default=hidden // heads)
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError(f"{src} has neither '{arch}.vocab_size' nor 'tokenizer.ggml.tokens'")
        vocab = len(tokens)
    # GGUF has no "tied" key: a file without an 'output.weight' tensor reuses the embedding.
    fam = family_of(arch)
    tied = bool(meta.get("tied_embeddings", fam.tied_by_default))
    label = name or str(meta.get("general.name") or arch)
    return ArchShape(
        name=label, layers=_int(meta, f"{arch}.block_count", src), hidden=hidden, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, vocab=int(vocab),
        intermediate=_int(meta, f"{arch}.feed_forward_length", src), tied_embeddings=tied,
        qkv_bias=bool(meta.get("qkv_bias", fam.qkv_bias)), norms_per_layer=fam.norms_per_layer,
        qk_norm=bool(meta.get("qk_norm", fam.qk_norm)),
    )


def shape_from_config(config: Mapping[str, Any], name: str | None = None) -> ArchShape:
    """Build an :class:`ArchShape` from an HF ``config.json`` dict or a GGUF metadata dict.

    GGUF metadata is recognised by its ``general.architecture`` key and read from
    ``{arch}.block_count``, ``{arch}.embedding_length``, ``{arch}.attention.head_count(_kv)``,
    ``{arch}.feed_forward_length`` and ``{arch}.vocab_size`` (or the length of
    ``tokenizer.ggml.tokens``). Two derived keys, ``tied_embeddings`` and ``qkv_bias``, may be added
    by the caller from the tensor list (see :func:`shape_from_gguf`), and ``qk_norm``.

    Raises:
        ValueError: a key needed for the shape is missing.
    """
    if "general.architecture" in config:
        return _from_gguf_metadata(config, name)
    return _from_hf(config, name)


def shape_from_gguf(path: str | Path, name: str | None = None) -> ArchShape:
    """Read the shape of a ``.gguf`` file from its metadata and tensor names (the header only).

    Raises:
        GGUFError (a ValueError): the file is not a GGUF file, or is truncated.
    """
    from bitsmith.io.gguf.header import read_header

    path = Path(path)
    header = read_header(path)
    meta: dict[str, Any] = {}
    for key, value in header.metadata.items():
        # tokenizer.ggml.tokens stays a GGUFArray: only its length (the vocabulary size) matters
        if key.startswith(("general.", "tokenizer.ggml.")) and key not in ("general.architecture", "tokenizer.ggml.tokens"):
            continue
        meta[key] = value
    if "general.architecture" not in meta:
        raise ValueError(f"{path} has no 'general.architecture' metadata; it is not a model GGUF")
    tensor_names = {tensor.name for tensor in header.tensors}
    meta["tied_embeddings"] = "output.weight" not in tensor_names
    meta["qkv_bias"] = "blk.0.attn_q.bias" in tensor_names
    meta["qk_norm"] = "blk.0.attn_q_norm.weight" in tensor_names
    if name is None:
        name = str(header.metadata["general.name"]) if "general.name" in header.metadata else path.stem
    return shape_from_config(meta, name=name)


def shape_from_path(path: str | Path) -> ArchShape:
    """Shape of a local model: a folder with ``config.json``, a ``config.json`` or a ``.gguf`` file."""
    path = Path(path)
    if path.is_dir():
        gguf_files = sorted(path.glob("*.gguf"))
        if (path / "config.json").is_file():
            path = path / "config.json"
        elif len(gguf_files) == 1:
            path = gguf_files[0]
        else:
            raise FileNotFoundError(
                f"{path} has no config.json and {len(gguf_files)} .gguf files; "
                "point at the config.json or at one .gguf file"
            )
    if path.suffix == ".gguf":
        return shape_from_gguf(path, name=path.stem)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; give a catalog name, a folder or a file")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); is it a config.json?") from err
    return shape_from_config(config, name=path.parent.name if path.name == "config.json" else path.stem)
