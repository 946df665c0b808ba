"""GGUF files as model sources: tensors by Hugging Face name, dequantized to float32.

Three things the llama.cpp converter (``convert_hf_to_gguf.py``) does to weights are undone here:
names are renamed (``blk.N.attn_q.weight``), q/k projection rows of the llama family are permuted
(``w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2)``, interleaving rotary halves), and Gemma RMSNorm
weights are stored as ``1 + w``. Each is a field of the family table's GGUF layouts
(:data:`bitsmith.models.family.GGUF_ARCHES`), not code per model.

The header is scanned by :func:`read_gguf_header` rather than ``gguf.GGUFReader``: the reader
builds a numpy view per vocabulary string and takes 10+ s on a 262k-token vocabulary, the scan
takes well under a second. Dequantization is ``gguf.quants.dequantize`` on a memory-mapped slice.
The config and tokenizer come from transformers' own GGUF conversion, cached as a small Hugging
Face folder next to the model cache so that only the first open pays for it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitsmith.models.aliases import cache_dir
from bitsmith.models.errors import ModelSourceError
from bitsmith.models.errors import mb as _mb  # the name the header scan below uses
from bitsmith.models.family import GGUF_ARCHES, HEAD_WEIGHT, GGUFArch
from bitsmith.models.hf import causal_lm_class, set_offline
from bitsmith.models.sources import ModelSource

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

DEQUANT_CHUNK = 1 << 22  # values per dequantization slice (16 MB of float32)

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# ------------------------------------------------------------------------------ header scanning


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor entry of a GGUF header."""

    name: str
    qtype: int  # ggml type id (gguf.GGMLQuantizationType)
    shape: tuple[int, ...]  # torch order (the reverse of GGUF's ne order)
    offset: int  # absolute byte offset in the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]  # scalars and strings; arrays are recorded as GGUFArray (no items)
    tensors: list[GGUFTensorInfo]
    data_end: int  # bytes the file must have to hold every tensor


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array, recorded by type and length only (vocabularies are large)."""

    item_type: int
    count: int


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Little-endian reads from a memory map, with a clear error past the end."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ModelSourceError(
                f"{self.path.name} is truncated (its header is cut short at {_mb(len(self.buf))}); "
                "download it again"
            )
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            self.unpack(f"<{n}s")  # raises the truncation error
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        """One metadata value; arrays are walked over, not read (see GGUFArray)."""
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type in _SCALARS:  # fixed size: skip in one step
                self.pos += count * struct.calcsize(_SCALARS[item_type])
            elif item_type == _STRING:
                for _ in range(count):
                    length = self.unpack("<Q")  # (not `pos += unpack()`: unpack moves pos)
                    self.pos += length
            else:
                for _ in range(count):
                    self.value(item_type)
            return GGUFArray(item_type, count)
        raise ModelSourceError(f"{self.path.name} has an unknown metadata type {vtype}; the file is corrupt")


def read_gguf_header(path: Path) -> GGUFHeader:
    """Scan a GGUF header (metadata and tensor table) and check the file holds every tensor."""
    import mmap

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelSourceError(
                f"{path.name} is not a GGUF file (it does not start with the GGUF magic bytes); "
                "check the path or download the file again"
            )
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        cur = _Cursor(buf, path)  # mmap slices are bytes copies: no exported buffers to release
        cur.pos = 4
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise ModelSourceError(f"{path.name} is GGUF version {version}; only versions 2 and 3 are supported")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.unpack("<I"))
        raw: list[tuple[str, int, tuple[int, ...], int]] = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            dims = tuple(cur.unpack("<Q") for _ in range(n_dims))
            raw.append((name, cur.unpack("<I"), dims, cur.unpack("<Q")))
        header_end = cur.pos
    finally:
        buf.close()
    align = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-header_end // align) * align
    tensors = []
    for name, qtype, dims, offset in raw:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise ModelSourceError(
                f"{path.name}: tensor {name} has ggml type {qtype}, unknown to this gguf package; upgrade gguf"
            ) from None
        n = 1
        for d in dims:
            n *= d
        shape = tuple(reversed(dims))
        tensors.append(GGUFTensorInfo(name, qtype, shape, data_start + offset, n * type_size // block))
    data_end = max((t.offset + t.n_bytes for t in tensors), default=data_start)
    if data_end > size:
        raise ModelSourceError(
            f"{path.name} is truncated (header says {_mb(data_end - data_start)} of tensor data, "
            f"file has {_mb(max(size - data_start, 0))}); download it again"
        )
    return GGUFHeader(version, metadata, tensors, data_end)


# ------------------------------------------------------------------------------- tensor store


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row interleave: rows (head, pair, half) -> (head, half, pair)."""
    rows = w.shape[0]
    # w: [n_head * (d/2) * 2, ...] in GGUF row order (pairs interleaved within each head)
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


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
