"""Safetensors headers read without loading a tensor: names, dtypes, shapes and byte ranges, with
clear errors for truncated or foreign files, and small tensors (g_idx, shapes, quant states) read
straight from their byte range.

A safetensors file is ``u64 n`` (little endian), ``n`` bytes of JSON ({name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {str: str}}), then the data; offsets count from the
end of the JSON."""

from __future__ import annotations

import math

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bitsmith.io.inspect_report import InspectError, mb

if TYPE_CHECKING:
    import numpy as np

DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F4": 4,
              "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8}
_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
          "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
MAX_HEADER = 100_000_000  # the safetensors library's own limit
MAX_SMALL_READ = 64 * 1024**2


@dataclass(frozen=True)
class StTensor:
    """One tensor entry of a safetensors header."""

    path: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class StHeader:
    path: Path
    tensors: dict[str, StTensor]
    metadata: dict[str, str]
    size: int  # file size in bytes


def looks_like_safetensors(path: Path) -> bool:
    """Whether the file starts like a safetensors file (a plausible header length, then '{')."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= MAX_HEADER and head[8:9] == b"{"


def read_header(path: Path) -> StHeader:
    """The header of one safetensors file; raises InspectError when the file is cut short or is
    no safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        if len(prefix) < 8 or n < 2 or n > MAX_HEADER:
            raise InspectError(f"{path.name} is not a safetensors file (it does not start with a valid header "
                               f"length); download it again or check that it is the file you meant")
        if 8 + n > size:
            raise InspectError(f"{path.name} is truncated (its header alone says {mb(n)}, the file has {mb(size - 8)}); "
                               "download it again")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InspectError(f"{path.name} has a corrupt safetensors header ({exc}); "
                           "download it again") from exc
    if not isinstance(header, dict):
        raise InspectError(f"{path.name} has a corrupt safetensors header (not a JSON object); download it again")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors = {}
    for name, entry in header.items():
        try:
            begin, end = (int(v) for v in entry["data_offsets"])
            tensors[name] = StTensor(path, name, str(entry["dtype"]), tuple(int(d) for d in entry["shape"]),
                                     data_start + begin, data_start + end)
        except (KeyError, TypeError, ValueError) as exc:
            raise InspectError(f"{path.name}: the header entry for tensor {name!r} is malformed ({exc!r}); "
                               "download the file again") from exc
    data = max((t.end for t in tensors.values()), default=data_start) - data_start
    if data_start + data > size:
        raise InspectError(f"{path.name} is truncated (header says {mb(data)} of data, file has {mb(size - data_start)}); "
                           "download it again")
    return StHeader(path, tensors, {str(k): str(v) for k, v in metadata.items()}, size)


def read_small(t: StTensor) -> "np.ndarray":
    """The values of a small tensor (g_idx, a stored shape, a quant-state blob), read from its byte
    range. Raises InspectError for dtypes numpy cannot hold or tensors too large to read here."""
    import numpy as np

    if t.dtype not in _NUMPY:
        raise InspectError(f"{t.path.name}: cannot read tensor {t.name} of dtype {t.dtype} as numbers")
    if t.nbytes > MAX_SMALL_READ:
        raise InspectError(f"{t.path.name}: tensor {t.name} is {mb(t.nbytes)}, larger than inspect reads")
    with open(t.path, "rb") as f:
        f.seek(t.begin)
        raw = f.read(t.nbytes)
    return np.frombuffer(raw, dtype=np.dtype(_NUMPY[t.dtype])).reshape(t.shape)
