"""Hugging Face -> GGUF tensor names and the per-tensor layout fix-ups the llama.cpp converter applies.

The family table's GGUF layouts (:data:`bitsmith.models.family.GGUF_ARCHES`: GGUF stem -> HF name,
q/k row interleave, norm offset) are the one source of truth: this module applies them in both
directions (export here, import in :mod:`bitsmith.models.gguf_source`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bitsmith.io.gguf.mixes import ExportError

from bitsmith.models.family import GGUF_ARCHES
from bitsmith.models.family import MODEL_TYPE_TO_GGUF_ARCH as MODEL_TYPE_TO_ARCH  # HF model_type -> llama.cpp's arch name


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary row interleave (inverse of :func:`unpermute_qk`), rows of any array."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row interleave: rows (head, pair, half) -> (head, half, pair)."""
    rows = w.shape[0]
    # w: [n_head * (d/2) * 2, ...] in GGUF row order (pairs interleaved within each head)
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


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
        arch_name = MODEL_TYPE_TO_ARCH.get(config.model_type)
        if arch_name is None or arch_name not in GGUF_ARCHES:
            raise ExportError(f"GGUF export of {config.model_type!r} models is not supported yet (supported: "
                              f"{', '.join(sorted(MODEL_TYPE_TO_ARCH))}); add its entry to FAMILIES in bitsmith/models/family.py")
        arch = GGUF_ARCHES[arch_name]
        n_head = config.num_attention_heads
        return cls(arch_name, n_head, getattr(config, "num_key_value_heads", None) or n_head,
                   {v: k for k, v in arch.block.items()}, {v: k for k, v in arch.top.items()},
                   arch.permute_qk, arch.norm_offset)

    def gguf_name(self, hf_name: str) -> str | None:
        """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``; None when unmapped."""
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
        """Gemma's norms: the converter stores ``1 + w``."""
        if self.norm_offset and gguf_name.rsplit(".", 1)[0].endswith("norm"):
            return values + np.float32(self.norm_offset)  # Gemma: the converter stores 1 + w
        return values
