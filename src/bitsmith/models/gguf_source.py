"""GGUF files as model sources: tensors by Hugging Face name, dequantized to float32.

Three things the llama.cpp converter (``convert_hf_to_gguf.py``) does to weights are undone here:
names are renamed (``blk.N.attn_q.weight``), q/k projection rows of the llama family are permuted
(``w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2)``, interleaving rotary halves), and Gemma RMSNorm
weights are stored as ``1 + w``. Each is a field of the family table's GGUF layouts
(:data:`bitsmith.models.family.GGUF_ARCHES`), not code per model.

The header is read by :mod:`bitsmith.io.gguf.header`, the one GGUF header reader.
Dequantization is ``gguf.quants.dequantize`` on a memory-mapped slice. The config and tokenizer
come from transformers' own GGUF conversion, cached as a small Hugging Face folder next to the
model cache so that only the first open pays for it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitsmith.io.gguf.header import GGUFError, GGUFHeader, GGUFTensorInfo, read_header
from bitsmith.models.aliases import cache_dir
from bitsmith.models.errors import ModelSourceError
from bitsmith.models.family import GGUF_ARCHES, HEAD_WEIGHT, GGUFArch
from bitsmith.models.hf import causal_lm_class, set_offline
from bitsmith.models.sources import ModelSource

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

DEQUANT_CHUNK = 1 << 22  # values per dequantization slice (16 MB of float32)


# ------------------------------------------------------------------------------ header scanning


def read_gguf_header(path: Path) -> GGUFHeader:
    """The file's header (:func:`bitsmith.io.gguf.header.read_header`), its errors as ModelSourceError."""
    try:
        return read_header(path)
    except GGUFError as exc:
        raise ModelSourceError(str(exc)) from exc


# ------------------------------------------------------------------------------- tensor store


class GGUFStore:
    """Tensors of one GGUF file, by Hugging Face name, dequantized lazily from a memory map."""

    def __init__(self, path: Path, header: GGUFHeader) -> None:
        import numpy as np

        self.path = path
        arch_name = str(header.metadata.get("general.architecture", "?"))
        arch = GGUF_ARCHES.get(arch_name)
        if arch is None:
            raise ModelSourceError(
                f"{path.name} has GGUF architecture {arch_name!r}, not supported yet "
                f"(supported: {', '.join(sorted(GGUF_ARCHES))}); add its entry to "
                "FAMILIES in bitsmith/models/family.py"
            )
        self.arch: GGUFArch = arch
        n_head = header.metadata.get(f"{arch_name}.attention.head_count", 0)
        n_head_kv = header.metadata.get(f"{arch_name}.attention.head_count_kv", n_head)
        if not isinstance(n_head, int) or not isinstance(n_head_kv, int):
            raise ModelSourceError(
                f"{path.name} has per-layer head counts, which bitsmith does not support yet"
            )
        self.n_head, self.n_head_kv = n_head, n_head_kv
        if arch.permute_qk and self.n_head <= 0:
            raise ModelSourceError(
                f"{path.name} lacks {arch_name}.attention.head_count, needed to undo the q/k "
                "permutation; the file is incomplete, convert or download it again"
            )
        # Tensors are read with positional reads, not through a memory map: mapped pages that were
        # touched stay in the process's resident set, so streaming a 1 GB file block by block
        # would end with all of it counted (measured on Qwen2.5-1.5B's layer-wise GPTQ).
        self._size = path.stat().st_size
        self._infos: dict[str, GGUFTensorInfo] = {}
        for info in header.tensors:
            hf = self.hf_name(info.name)
            if hf is not None:
                self._infos[hf] = info

    def hf_name(self, gguf_name: str) -> str | None:
        """The Hugging Face name of a GGUF tensor, or None for GGUF-only tensors."""
        stem, _, suffix = gguf_name.rpartition(".")  # suffix: weight | bias
        parts = stem.split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[2] in self.arch.block:
            return f"model.layers.{parts[1]}.{self.arch.block[parts[2]]}.{suffix}"
        if stem in self.arch.top:
            return f"{self.arch.top[stem]}.{suffix}"
        if parts[-1] not in self.arch.ignore:
            log.warning("%s: tensor %s has no Hugging Face name; ignored", self.path.name, gguf_name)
        return None

    def names(self) -> list[str]:
        return list(self._infos)

    def _info(self, name: str) -> GGUFTensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a tensor of {self.path.name}; see tensor_names()") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def dtype(self, name: str) -> str:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self._info(name).qtype).name

    def gguf_name(self, name: str) -> str:
        return self._info(name).name

    def raw(self, name: str) -> np.ndarray:
        """Dequantized float32 values in the file's own convention (no fix-ups), torch shape."""
        import numpy as np
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize, quant_shape_to_byte_shape

        info = self._info(name)
        qtype = GGMLQuantizationType(info.qtype)
        if info.offset + info.n_bytes > self._size:
            raise ModelSourceError(
                f"{self.path.name} is truncated: tensor {info.name} ends at byte {info.offset + info.n_bytes:,} "
                f"but the file has {self._size:,}; download or assemble it again")
        data = np.fromfile(self.path, dtype=np.uint8, count=info.n_bytes, offset=info.offset)
        plain = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
        if qtype in plain:
            return np.array(data.view(plain[qtype]).reshape(info.shape), dtype=np.float32)  # a private, writable copy
        data = data.reshape(quant_shape_to_byte_shape(info.shape, qtype))  # [rows..., row bytes]
        out = np.empty(info.shape, dtype=np.float32)
        flat_in, flat_out = data.reshape(-1, data.shape[-1]), out.reshape(-1, info.shape[-1])
        # gguf's numpy dequantizers make several float temporaries of their input's size: in slices
        # of rows they stay small (a 151936 x 1536 Q6_K embedding otherwise peaks at ~3 GB)
        step = max(1, DEQUANT_CHUNK // max(1, info.shape[-1]))
        for r in range(0, flat_in.shape[0], step):
            try:
                flat_out[r : r + step] = dequantize(flat_in[r : r + step], qtype)
            except NotImplementedError as err:
                raise ModelSourceError(
                    f"{self.path.name}: tensor {info.name} is {qtype.name}, which gguf cannot dequantize "
                    "yet; upgrade gguf or convert the file to a supported type"
                ) from err
        return out

    def load(self, name: str) -> torch.Tensor:
        import torch

        from bitsmith.io.gguf.names import unpermute_qk  # here, not at the top: io.gguf.names imports bitsmith.models

        values = self.raw(name)
        stem = self._info(name).name.rsplit(".", 1)[0]
        if self.arch.norm_offset and stem.endswith("norm"):
            values -= self.arch.norm_offset  # converter stored offset + w
        if self.arch.permute_qk and stem.endswith((".attn_q", ".attn_k")):
            n_head = self.n_head if stem.endswith(".attn_q") else self.n_head_kv
            values = unpermute_qk(values, n_head)
        return torch.from_numpy(values)


# ----------------------------------------------------------------------- config and tokenizer


def open_gguf(path: Path) -> ModelSource:
    """Open a GGUF file: tensor table from the header, config and tokenizer via transformers."""
    path = Path(path)
    header = read_gguf_header(path)
    store = GGUFStore(path, header)
    meta_dir = _meta_folder(path)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(meta_dir), local_files_only=True, trust_remote_code=False)
    if HEAD_WEIGHT not in store.names():
        config.tie_word_embeddings = True  # the file has no output.weight: the head is the embedding
    return ModelSource(path=path, config=config, kind="gguf", store=store, tokenizer_dir=meta_dir)


def _meta_folder(path: Path) -> Path:
    """A cached HF folder with the config and tokenizer transformers derives from the GGUF."""
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_dir() / "gguf-meta" / f"{path.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    config, tokenizer = _convert_meta(path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    try:
        os.rename(tmp, folder)  # atomic; another process may have won the race
    except OSError:
        if not (folder / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert_meta(path: Path) -> tuple[PretrainedConfig, Any]:
    set_offline()
    from transformers import AutoConfig, AutoTokenizer

    log.info("reading config and tokenizer of %s (first use; cached afterwards)", path.name)
    kwargs = {"gguf_file": path.name, "local_files_only": True, "trust_remote_code": False}
    try:
        config = AutoConfig.from_pretrained(str(path.parent), **kwargs)
    except (ValueError, KeyError, OSError) as err:
        raise ModelSourceError(
            f"transformers cannot read the config of {path.name} ({err}); "
            "upgrade transformers or use a GGUF of a supported architecture"
        ) from err
    causal_lm_class(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    except (ValueError, KeyError, OSError) as err:
        raise ModelSourceError(
            f"transformers cannot build the tokenizer stored in {path.name} ({err}); "
            "the file lacks tokenizer metadata, use a GGUF that includes it"
        ) from err
    return config, tokenizer
