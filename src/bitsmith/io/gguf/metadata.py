"""What the GGUF writer puts in a file's key-value header, besides the tokenizer.

Two routes: when the model came from a GGUF file (an alias, or a checkpoint whose report names a
``.gguf`` source), that file's ``general.*``, ``tokenizer.*`` and hyperparameter keys are copied
verbatim with their original value types, the most faithful route (:func:`copy_gguf_metadata`);
otherwise hyperparameters come from the transformers config (:func:`config_metadata`, the reverse
of transformers' ``GGUF_CONFIG_MAPPING``) and the vocabulary from :mod:`bitsmith.io.gguf.tokenizer`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# keys the writer sets itself (container, file type) and so never copies from the source file
SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version", "general.alignment")


def add_value(writer: Any, key: str, value: Any) -> None:
    """One key with the GGUF type its Python type implies (int -> uint32, float -> float32)."""
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
    from gguf import GGUFValueType

    from bitsmith.io.gguf.header import ARRAY, read_header

    header = read_header(origin, arrays=True)
    for key, value in header.metadata.items():
        if key.startswith(SKIP_KEYS):
            continue
        types = header.value_types[key]
        sub = GGUFValueType(types[-1]) if types[0] == ARRAY else None
        writer.add_key_value(key, value, GGUFValueType(types[0]), sub_type=sub)


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


def gguf_origin(source: Any, report: dict) -> Path | None:
    """The GGUF file the model came from, if any: its metadata is the faithful one to copy."""
    if source.kind == "gguf":
        return Path(source.path)
    origin = report.get("source")
    if origin and str(origin).endswith(".gguf") and Path(origin).is_file():
        return Path(origin)
    return None
