"""The one GGUF header reader: metadata and tensor table, with the file's size checked against them.

Used by model sources, ``inspect``, the fit catalog and the exporter (which copies a source file's
metadata). The header is scanned with ``struct`` over a memory map rather than through
``gguf.GGUFReader``: the reader builds a numpy view per vocabulary string and takes 10+ s on a
262k-token vocabulary, the scan takes well under a second. Arrays (vocabularies, merges) are skipped
and recorded by type and length unless the caller asks for their items (``arrays=True``).

Every failure is a :class:`GGUFError` whose message names the file and the fix.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitsmith.io.safetensors import mb  # file sizes in messages: one spelling for every reader

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types (gguf.GGUFValueType): fixed-size scalars, then string and array
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
MAX_ARRAY_DEPTH = 8  # arrays of arrays: llama.cpp reads none; deeper nesting is a corrupt file, not recursion
MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp refuses a tensor of more dimensions


class GGUFError(ValueError):
    """A GGUF file that cannot be read; the message names the file and what to do."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor entry of a GGUF header."""

    name: str
    qtype: int  # ggml type id (gguf.GGMLQuantizationType)
    shape: tuple[int, ...]  # torch order (the reverse of GGUF's ne order)
    offset: int  # absolute byte offset in the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array, recorded by type and length only (vocabularies are large)."""

    item_type: int
    count: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]  # scalars and strings; arrays are GGUFArray, or lists with arrays=True
    tensors: list[GGUFTensorInfo]
    data_end: int  # bytes the file must have to hold every tensor
    # key -> its value type, then for arrays the item type(s): what a writer needs to copy the key
    value_types: dict[str, tuple[int, ...]] = field(default_factory=dict)


class _Cursor:
    """Little-endian reads from a memory map, with a clear error past the end."""

    def __init__(self, buf: Any, path: Path, arrays: bool) -> None:
        self.buf, self.pos, self.path, self.arrays = buf, 0, path, arrays
        self.depth = 0  # arrays being read inside each other

    def need(self, size: int) -> None:
        """The truncation error unless ``size`` more bytes follow: checked before a length read from
        the file is used (to skip, slice or allocate), so a corrupt length of 2**64 costs nothing."""
        if self.pos + size > len(self.buf):
            raise GGUFError(
                f"{self.path.name} is truncated (its header is cut short at {mb(len(self.buf))}); "
                "download it again"
            )

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        self.need(n)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, types: list[int]) -> Any:
        """One metadata value; ``types`` collects its type chain (array, item type, ...)."""
        types.append(vtype)
        if vtype in SCALARS:
            return self.unpack(SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if self.depth >= MAX_ARRAY_DEPTH:
                raise GGUFError(f"{self.path.name} has metadata arrays nested more than {MAX_ARRAY_DEPTH} deep; "
                                "the file is corrupt, download it again")
            self.depth += 1
            try:
                if self.arrays:
                    return self.array_items(item_type, count, types)
                types.append(item_type)
                self.skip_array(item_type, count)
                return GGUFArray(item_type, count)
            finally:
                self.depth -= 1
        raise GGUFError(f"{self.path.name} has an unknown metadata type {vtype}; the file is corrupt")

    def skip_array(self, item_type: int, count: int) -> None:
        if item_type in SCALARS:  # fixed size: skip in one step
            self.need(count * struct.calcsize(SCALARS[item_type]))
            self.pos += count * struct.calcsize(SCALARS[item_type])
        elif item_type == STRING:
            for _ in range(count):  # each item takes 8 bytes at least: the file ends the loop
                length = self.unpack("<Q")  # (not `pos += unpack()`: unpack moves pos)
                self.need(length)
                self.pos += length
        else:
            for _ in range(count):
                self.value(item_type, [])

    def array_items(self, item_type: int, count: int, types: list[int]) -> list[Any]:
        if item_type in SCALARS:  # one numpy read: Python ints, floats and bools of the stored values
            import numpy as np

            fmt = SCALARS[item_type]
            size = count * struct.calcsize(fmt)
            self.need(size)
            items = np.frombuffer(self.buf, np.dtype(fmt), count, self.pos).tolist()
            self.pos += size
            types.append(item_type)
            return items
        if count == 0:
            types.append(item_type)
            return []
        inner: list[int] = []
        items = [self.value(item_type, inner if i == 0 else []) for i in range(count)]
        types.extend(inner)
        return items


def read_header(path: str | Path, arrays: bool = False) -> GGUFHeader:
    """Scan a GGUF header (metadata and tensor table) and check the file holds every tensor.
    ``arrays``: read metadata arrays' items too (to copy them), not only their type and length."""
    import mmap

    path = Path(path)
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise GGUFError(
                f"{path.name} is not a GGUF file (it does not start with the GGUF magic bytes); "
                "check the path or download the file again"
            )
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        cur = _Cursor(buf, path, arrays)  # mmap slices are bytes copies: no exported buffers to release
        cur.pos = 4
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise GGUFError(f"{path.name} is GGUF version {version}; only versions 2 and 3 are supported")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        metadata: dict[str, Any] = {}
        value_types: dict[str, tuple[int, ...]] = {}
        for _ in range(n_kv):
            key = cur.string()
            types: list[int] = []
            metadata[key] = cur.value(cur.unpack("<I"), types)
            value_types[key] = tuple(types)
        raw = [_tensor_entry(cur) for _ in range(n_tensors)]
        header_end = cur.pos
    finally:
        buf.close()
    align = _alignment(path, metadata)
    data_start = -(-header_end // align) * align
    tensors = [_tensor_info(path, data_start, *entry) for entry in raw]
    data_end = max((t.offset + t.n_bytes for t in tensors), default=data_start)
    size = path.stat().st_size
    if data_end > size:
        raise GGUFError(
            f"{path.name} is truncated (header says {mb(data_end - data_start)} of tensor data, "
            f"file has {mb(max(size - data_start, 0))}); download it again"
        )
    return GGUFHeader(version, metadata, tensors, data_end, value_types)


def _alignment(path: Path, metadata: dict[str, Any]) -> int:
    """``general.alignment``: a power of two, as llama.cpp requires (0 would divide by zero, and a
    float, string or array is no alignment at all)."""
    align = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(align) is not int or align <= 0 or align & (align - 1):
        raise GGUFError(f"{path.name} has general.alignment {str(align)[:40]!r}, not a power of two; "
                        "the file is corrupt, download or convert it again")
    return align


def _tensor_entry(cur: _Cursor) -> tuple[str, int, tuple[int, ...], int]:
    """(name, ggml type, dims in GGUF's ne order, offset from the data start) of one tensor."""
    name = cur.string()
    n_dims = cur.unpack("<I")
    if n_dims > MAX_DIMS:
        raise GGUFError(f"{cur.path.name}: tensor {name[:120]!r} has {n_dims} dimensions, more than GGUF's "
                        f"{MAX_DIMS}; the file is corrupt, download it again")
    dims = tuple(cur.unpack("<Q") for _ in range(n_dims))
    return name, cur.unpack("<I"), dims, cur.unpack("<Q")


def _tensor_info(path: Path, data_start: int, name: str, qtype: int, dims: tuple[int, ...], offset: int) -> GGUFTensorInfo:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    except (ValueError, KeyError):
        raise GGUFError(
            f"{path.name}: tensor {name[:120]} has ggml type {qtype}, unknown to this gguf package; upgrade gguf"
        ) from None
    if dims and dims[0] % block:  # llama.cpp refuses it too: a row must be whole blocks
        raise GGUFError(f"{path.name}: tensor {name[:120]} has rows of {dims[0]} values, not whole blocks of "
                        f"{block}; the file is corrupt, download or convert it again")
    n = 1
    for d in dims:
        n *= d
    return GGUFTensorInfo(name, qtype, tuple(reversed(dims)), data_start + offset, n * type_size // block)
