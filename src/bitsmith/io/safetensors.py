"""The one safetensors reader: a file's header (names, dtypes, shapes, byte ranges, metadata)
checked against the file before any tensor is touched, a folder's shards (one file, or the shards a
``model.safetensors.index.json`` lists), and small tensors read straight from their byte range.

A safetensors file is ``u64 n`` (little endian), ``n`` bytes of JSON ({name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {str: str}}), then the data; offsets count from the
end of the JSON. Every problem raises :class:`SafetensorsError`, whose message names the file and
the fix; callers with their own error type (model sources, inspect) re-raise it as theirs."""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np
    import torch

INDEX_FILE = "model.safetensors.index.json"
DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F4": 4,
              "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8}
_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
          "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
MAX_HEADER = 100_000_000  # the safetensors library's own limit
MAX_SMALL_READ = 64 * 1024**2

# Names and values from a header go into messages through this: a corrupt header can hold a name
# of megabytes, or a list nested a thousand deep, and the message must stay one readable line.
_BRIEF = reprlib.Repr()
_BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlist = 120, 120, 8


class SafetensorsError(ValueError):
    """A safetensors file, or a folder's shard index, that cannot be read; the message names the
    file and what to do."""


def mb(n: int) -> str:
    """Bytes as the messages print them (always MB, so sizes in one message compare at a glance)."""
    return f"{n / 1e6:.1f} MB"


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
    """A safetensors file's header: its tensors by name, its ``__metadata__`` and the file size."""

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


def _read_json_header(path: Path, size: int) -> tuple[dict, int]:
    """(the parsed JSON header, its length n): the length prefix checked against the file size."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path.name} is truncated ({size} bytes); download it again")
        n = int.from_bytes(prefix, "little")
        if n < 2 or n > MAX_HEADER:
            raise SafetensorsError(f"{path.name} is not a safetensors file (it does not start with a valid header "
                                   f"length); download it again or check that it is the file you meant")
        if 8 + n > size:
            raise SafetensorsError(f"{path.name} is truncated (its header alone says {mb(n)}, the file has "
                                   f"{mb(size - 8)}); download it again")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # ValueError: not UTF-8, not JSON, or an integer of more than 4,300 digits (Python's own
        # limit on int(str)); RecursionError: nesting deeper than the interpreter's recursion limit
        raise SafetensorsError(f"{path.name} has a corrupt safetensors header ({_short(exc)}); "
                               "download it again") from exc
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path.name} has a corrupt safetensors header (not a JSON object); download it again")
    return header, n


def _short(exc: BaseException) -> str:
    """An exception as a message clause: its text, cut where a fuzzed header could make it huge."""
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _ints(value: object, what: str) -> tuple[int, ...]:
    """A JSON list of integers in [0, 2**64), exactly: ``true``, ``1.0``, ``"4"`` or ``Infinity``
    are refused, as the safetensors library itself (unsigned 64-bit integers) refuses them."""
    if not isinstance(value, list) or not all(type(v) is int and 0 <= v < 2**64 for v in value):
        # reprlib: a bounded picture of a value that may be nested 1,000 deep or hold a million items
        raise ValueError(f"{what} {_BRIEF.repr(value)} is not a list of integers from 0 to 2**64 - 1")
    return tuple(value)


def _fills(shape: tuple[int, ...], bits: int, nbytes: int) -> bool:
    """Whether ``shape`` elements of ``bits`` bits take exactly ``nbytes`` bytes. The product is
    built one factor at a time and given up once it passes the bytes there are, so a fuzzed shape of
    a million huge dimensions costs a loop, not a million-digit integer."""
    if 0 in shape:
        return nbytes == 0
    n, limit = 1, nbytes * 8 // bits
    for d in shape:
        n *= d
        if n > limit:
            return False
    return n * bits == nbytes * 8


def _entry(path: Path, name: str, entry: object, data_start: int) -> StTensor:
    """One header entry, checked: offsets are two integers, begin <= end, dimensions >= 0, and a
    known dtype's bytes match its shape (unknown dtypes are kept, so inspect can list them)."""
    try:
        if not isinstance(entry, dict):
            raise TypeError(f"the entry is a JSON {type(entry).__name__}, not an object")
        offsets = _ints(entry["data_offsets"], "data_offsets")
        shape = _ints(entry["shape"], "shape")
        dtype = entry["dtype"]
        if not isinstance(dtype, str):
            raise TypeError(f"dtype {_BRIEF.repr(dtype)} is not a string")
        if len(offsets) != 2 or offsets[0] > offsets[1]:
            raise ValueError(f"data_offsets {_BRIEF.repr(list(offsets))}, shape {_BRIEF.repr(list(shape))}")
        begin, end = offsets
        if dtype in DTYPE_BITS and not _fills(shape, DTYPE_BITS[dtype], end - begin):
            raise ValueError(f"{dtype} {_BRIEF.repr(list(shape))} does not fill data_offsets {[begin, end]}")
    except (KeyError, TypeError, ValueError) as exc:
        raise SafetensorsError(f"{path.name}: the header entry for tensor {_BRIEF.repr(name)} is malformed ({_short(repr(exc))}); "
                               "download the file again") from exc
    return StTensor(path, name, dtype, shape, data_start + begin, data_start + end)


def _check_tiling(path: Path, tensors: dict[str, StTensor], data_start: int, size: int) -> None:
    """The tensors' byte ranges must follow each other from the end of the header to the end of
    the file, without gap or overlap: what the safetensors library itself requires before it maps
    a file, so a file this reader accepts is one that loads."""
    expected = data_start
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin != expected:
            raise SafetensorsError(f"{path.name} has a corrupt safetensors header (the data of tensor {_BRIEF.repr(t.name)} "
                                   f"starts at byte {t.begin - data_start}, expected {expected - data_start}); "
                                   "download it again")
        expected = t.end
    if expected != size:
        raise SafetensorsError(f"{path.name} has {size - expected} bytes after its last tensor, which a safetensors "
                               "file never has (corrupt, or not a safetensors file); download it again")


def read_header(path: Path) -> StHeader:
    """The header of one safetensors file, after checking that the file holds all the data it
    promises; raises SafetensorsError when the file is cut short, corrupt or no safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    header, n = _read_json_header(path, size)
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise SafetensorsError(f"{path.name} has a corrupt safetensors header (__metadata__ is not a JSON object); "
                               "download it again")
    if not all(isinstance(v, str) for v in metadata.values()):  # what the safetensors library requires too
        raise SafetensorsError(f"{path.name} has a corrupt safetensors header (a __metadata__ value is not a "
                               "string); download it again")
    data_start = 8 + n
    tensors = {name: _entry(path, name, entry, data_start) for name, entry in header.items()}
    data = max((t.end for t in tensors.values()), default=data_start) - data_start
    if data_start + data > size:
        raise SafetensorsError(f"{path.name} is truncated (header says {mb(data)} of data, file has "
                               f"{mb(size - data_start)}); download it again")
    _check_tiling(path, tensors, data_start, size)
    return StHeader(path, tensors, dict(metadata), size)


def _plain_relative(name: object) -> bool:
    """A non-empty relative name without ``..``, drive or leading slash (either slash counts, so a
    Windows-made index cannot smuggle ``..\\..\\x`` past the check)."""
    if not isinstance(name, str) or not name.strip():
        return False
    parts = name.replace("\\", "/").split("/")
    return parts[0] != "" and ":" not in parts[0] and ".." not in parts


def confined_path(folder: Path, name: object, listed_in: str) -> Path:
    """The file that ``listed_in`` (a file of ``folder``, e.g. the shard index) calls ``name``, or a
    SafetensorsError when that name could reach outside ``folder``; nothing is opened either way.

    The rule: a name is relative (not absolute, no drive), has no ``..`` component, and its parent
    directory resolves inside the folder (after the folder's own symlinks are resolved). Its last
    component may be a symlink to anywhere, because the Hugging Face cache lays out
    ``snapshots/<rev>/model.safetensors`` as links into ``blobs/``: a link that the folder itself
    holds is trusted like the folder, a name that by itself points elsewhere (``/etc/passwd``,
    ``../../other/model.safetensors``) is refused."""
    folder = Path(folder)
    if _plain_relative(name):
        path = folder / str(name)
        root, parent = folder.resolve(), path.parent.resolve()
        if parent == root or root in parent.parents:
            return path
    raise SafetensorsError(f"{listed_in} in {folder} names {name!r}, which is outside the model folder; bitsmith "
                           "reads only files inside the folder (symlinks the folder holds are fine); fix "
                           f"{listed_in} or download the model again")


def shard_files(folder: Path, *, sniff: bool = False) -> list[Path]:
    """The safetensors files of a model folder, in name order: those ``model.safetensors.index.json``
    lists (the index must parse and every shard must exist), else every ``*.safetensors`` file.
    ``sniff``: without an index, also files of any name whose contents start like safetensors
    (inspect uses it, so a weight file saved without its suffix is still read)."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
            if not all(isinstance(n, str) for n in names):
                raise TypeError("weight_map values must be file names")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise SafetensorsError(f"{index} is not a valid safetensors index ({exc!r}); download it again") from exc
        paths = [confined_path(folder, name, INDEX_FILE) for name in names]  # all checked before any is touched
        for name, path in zip(names, paths):
            if not path.is_file():
                raise SafetensorsError(f"{INDEX_FILE} lists {name} but it is missing from {folder}; download it again")
        return paths
    if not sniff:
        return sorted(folder.glob("*.safetensors"))
    files = sorted(f for f in folder.iterdir() if f.is_file())
    return [f for f in files if f.suffix == ".safetensors" or looks_like_safetensors(f)]


def read_small(t: StTensor) -> "np.ndarray":
    """The values of a small tensor (g_idx, a stored shape, a quant-state blob), read from its byte
    range. Raises SafetensorsError for dtypes numpy cannot hold or tensors too large to read here."""
    import numpy as np

    if t.dtype not in _NUMPY:
        raise SafetensorsError(f"{t.path.name}: cannot read tensor {t.name} of dtype {t.dtype} as numbers")
    if t.nbytes > MAX_SMALL_READ:
        raise SafetensorsError(f"{t.path.name}: tensor {t.name} is {mb(t.nbytes)}, larger than inspect reads")
    with open(t.path, "rb") as f:
        f.seek(t.begin)
        raw = f.read(t.nbytes)
    return np.frombuffer(raw, dtype=np.dtype(_NUMPY[t.dtype])).reshape(t.shape)


# ----------------------------------------------------------------------------- whole tensors, no mmap

READ_CHUNK = 64 * 1024**2  # bytes per read call of read_tensor

_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def can_read_tensor(t: StTensor) -> bool:
    """Whether :func:`read_tensor` reads this dtype (others go through the safetensors library)."""
    return t.dtype in _TORCH_DTYPES


def read_tensor(t: StTensor) -> "torch.Tensor":
    """The tensor ``t`` read from its byte range into a fresh torch tensor with plain reads.

    No memory map: the safetensors library maps the shard, and every page a read touches then counts
    in the process's resident memory (RssFile) for as long as the map lives, so streaming a 26 GB
    checkpoint through it grew the resident set towards the whole file. Here nothing stays mapped once
    the call returns: resident memory is the tensor itself. (Little-endian hosts, as safetensors.)"""
    from collections.abc import Callable

    import torch

    out = torch.empty(t.shape, dtype=getattr(torch, _TORCH_DTYPES[t.dtype]))
    if t.nbytes:
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        with open(t.path, "rb", buffering=0) as f:
            f.seek(t.begin)
            done = 0
            while done < t.nbytes:
                n = f.readinto(view[done : done + READ_CHUNK])  # bounded reads: no multi-GB syscall buffers
                if not n:
                    raise SafetensorsError(f"{t.path.name} ended inside tensor {t.name}; download it again")
                done += n
    return out


def split_parts(folder: Path, is_part: "Callable[[str], bool]", error: type[Exception],
                ) -> tuple[dict[str, dict[str, "torch.Tensor"]], dict[str, "torch.Tensor"]]:
    """Every tensor of a folder's shards, split by name: (module -> {part: tensor}) where
    ``is_part(part)`` holds for the name's last component, and every other tensor by name. Each
    shard passes bitsmith's header checks first; what the safetensors library still refuses raises
    ``error`` naming the shard. (The GPTQ and compressed-tensors importers read folders this way.)"""
    from safetensors import SafetensorError, safe_open

    parts: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for shard in shard_files(folder):
        read_header(shard)  # bitsmith's checks and message first; then the library maps the file
        try:
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():
                    module, _, part = key.rpartition(".")
                    if is_part(part):
                        parts.setdefault(module, {})[part] = f.get_tensor(key)
                    else:
                        others[key] = f.get_tensor(key)
        except SafetensorError as exc:  # what our reader lets through, e.g. a dtype it does not know
            raise error(f"{shard} cannot be read ({exc}); download it again") from exc
    return parts, others
