"""bitsmith checkpoints: a self-contained Hugging Face-style folder.

Layout (format version 1; 2 where a layer is rotated or vector-coded)::

    config.json, tokenizer files          copied from the source, so the folder stands alone
    model-00001-of-0000N.safetensors      tensors; every shard's header carries __metadata__:
        format = "bitsmith", format_version = "1",
        quantization = JSON {"method", "options",
                             "tensors": {module name: {"spec": "w4g128", "shape": [out, in]}}}
    model.safetensors.index.json          weight map (when there is more than one shard)
    config.json's quantization_config     quant_method "bitsmith" and the per-layer specs, so transformers
                                          finds bitsmith's quantizer (:mod:`bitsmith.io.quant_config`)
    bitsmith.json                         the same metadata for the whole model plus the quantization
                                          report (per-layer error, bits/weight, timings)

A quantized linear layer ``L`` is stored as ``L.qweight`` (uint8, packed codes, see
:mod:`bitsmith.formats.packing`), ``L.scale`` (fp16 [out, G]) and, when asymmetric, ``L.zero``
(fp16 [out, G]). Every other tensor keeps its name; so does a layer whose scales would overflow fp16
(a weight far beyond the fp16 range), which the pipeline keeps unquantized at fp32. No stored tensor holds
inf/NaN: the writer refuses them, and the loader refuses a checkpoint that has them. The folder is written under a temporary name
and renamed only when complete, so a crash or a full disk never leaves a folder that looks finished.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from bitsmith.io import quant_config
from bitsmith.io.destination import Destination, Staging
from bitsmith.io.ledger import ShardLedger
from bitsmith.io.safetensors import read_header, shard_files
from bitsmith.primitives import abs_max
from bitsmith.spec import QuantSpec, SpecError
from bitsmith.tensor import QuantizedTensor

FORMAT = "bitsmith"
FORMAT_VERSION = "2"  # the newest this bitsmith writes
READABLE_VERSIONS = ("1", "2")
# Version 2 marks shards whose layers a version-1 reader would load silently wrong: rotated codes
# ("rotate" entries; a v1 reader would skip the inverse rotation) and vector-codebook (vq) specs.
# A shard without them stays version 1, so older bitsmith keeps reading plain checkpoints.
DEFAULT_SHARD_BYTES = 2 * 1024**3
REPORT_FILE = "bitsmith.json"

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message says why and what to do."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's metadata says."""

    method: str
    options: dict
    specs: dict[str, QuantSpec]  # module name -> spec
    shapes: dict[str, tuple[int, int]]  # module name -> (out, in) of the unpacked weight
    format_version: str
    report: dict = field(default_factory=dict)
    rotations: dict[str, int] = field(default_factory=dict)  # rotated module -> Hadamard block (quantize --rotate)


@contextmanager
def _disk_full_as_error(path: Path):
    """A full disk while writing ``path`` becomes a CheckpointError that says so."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CheckpointError(
                f"no space left on the device while writing {path}; free some space or choose another --out ({exc.strerror})"
            ) from exc
        raise


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _safetensors_entry(name: str, t: torch.Tensor, offset: int) -> dict:
    if t.dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"cannot store tensor {name} of dtype {t.dtype} in safetensors")
    return {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.numel() * t.element_size()]}


def _write_tensor_bytes(f, t: torch.Tensor) -> None:
    if t.numel():
        # the tensor's own bytes (no copy for a contiguous CPU tensor)
        f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _write_safetensors_header(f, header: dict[str, dict], metadata: dict[str, str] | None) -> None:
    import struct

    if metadata:
        header = {**header, "__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # padded to 8 bytes, as the reference writer does
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as one safetensors file, streaming each tensor's bytes from its own memory.

    The format (8-byte little-endian header length, a JSON header of dtype, shape and byte offsets
    per tensor, an optional ``__metadata__`` map of strings, then the raw little-endian data) is
    written directly because ``safetensors.torch.save_file`` first copies every tensor into a Python
    bytes object: a 256 MB shard cost 512 MB of memory, and a 152k-vocabulary head 0.9 GB."""
    header, offset = {}, 0
    for name, t in tensors.items():
        header[name] = _safetensors_entry(name, t, offset)
        offset = header[name]["data_offsets"][1]
    with open(path, "wb") as f:
        _write_safetensors_header(f, header, metadata)
        for t in tensors.values():
            _write_tensor_bytes(f, t)


def write_safetensors_stream(path: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                             pieces: "Callable[[str], Iterable[torch.Tensor]]", metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors are produced piece by piece: ``layout`` gives each
    tensor's dtype and shape (in file order), ``pieces(name)`` yields its data as consecutive flat
    chunks. Only one piece is in memory at a time, so a 4 GB shard costs a chunk, not 4 GB; a tensor
    whose pieces do not add up to its shape is refused (the file would lie about its contents)."""
    header, offset = {}, 0
    for name, (dtype, shape) in layout.items():
        header[name] = _safetensors_entry(name, torch.empty(shape, dtype=dtype, device="meta"), offset)
        offset = header[name]["data_offsets"][1]
    try:
        with open(path, "wb") as f:
            _write_safetensors_header(f, header, metadata)
            for name, (dtype, _) in layout.items():
                begin, end = header[name]["data_offsets"]
                written = 0
                for piece in pieces(name):
                    if piece.dtype != dtype:
                        raise CheckpointError(f"a piece of tensor {name} is {piece.dtype}, the layout says {dtype}")
                    _write_tensor_bytes(f, piece)
                    written += piece.numel() * piece.element_size()
                if written != end - begin:
                    raise CheckpointError(f"tensor {name} got {written} bytes, its shape needs {end - begin}")
    except BaseException:
        Path(path).unlink(missing_ok=True)  # never a file whose header promises data it lacks
        raise


class _ShardStream:
    """One shard being written: tensor bytes go to ``<shard>.data`` as they arrive (nothing is held
    in memory); :meth:`close` writes the header, then copies the data behind it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data_path = path.with_suffix(".data")
        self.file = open(self.data_path, "wb")
        self.header: dict[str, dict] = {}
        self.size = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        self.header[name] = _safetensors_entry(name, t, self.size)
        _write_tensor_bytes(self.file, t)
        self.size = self.header[name]["data_offsets"][1]

    def close(self, metadata: dict[str, str]) -> None:
        self.file.close()
        with open(self.path, "wb") as out, open(self.data_path, "rb") as data:
            _write_safetensors_header(out, self.header, metadata)
            out.flush()
            _append_file(data, out, self.size)
        self.data_path.unlink()


def _append_file(src, dst, size: int) -> None:
    """Copy ``size`` bytes of ``src`` after what ``dst`` holds: in the kernel (copy_file_range) where
    it can, else through a 16 MB buffer. A closed 2 GB shard used to pass through Python twice."""
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src.fileno(), dst.fileno(), size - done)
            if n == 0:
                break
            done += n
    except (OSError, AttributeError):  # another filesystem, an old kernel, no os.copy_file_range
        pass
    if done < size:
        src.seek(done)
        dst.seek(0, os.SEEK_END)
        shutil.copyfileobj(src, dst, 16 * 1024**2)


class CheckpointWriter:
    """Writes a checkpoint tensor by tensor, shard by shard, into a temporary folder that
    :meth:`finish` renames to ``out_dir``. Use as a context manager: an exception removes the
    temporary folder.

    With ``resume_key`` every closed shard is also committed to a :class:`ShardLedger` in
    ``<out>.partial/`` (which survives a crash), and with ``resume`` the writer starts from an earlier
    run's committed shards: :meth:`has` says which tensors it need not be given again."""

    def __init__(self, out_dir: Path, method: str, options: dict, *, overwrite: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 staging: Staging | None = None, resume_key: dict | None = None, resume: bool = False) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise CheckpointError(f"{self.out_dir} already exists; choose another --out or pass --overwrite")
        # locked, checked (--overwrite replaces only an earlier checkpoint) and staged in a temp folder;
        # a caller that had to hold the lock earlier (the resumable calibrated run) hands its staging in
        self.staging = staging or Destination(self.out_dir, "checkpoint", overwrite, CheckpointError).stage()
        self.tmp_dir = self.staging.tmp
        self.method, self.options, self.shard_bytes = method, options, shard_bytes
        self.specs: dict[str, dict] = {}
        self._stream: _ShardStream | None = None  # the shard being written
        self._pending_specs: dict[str, dict] = {}
        self._names: set[str] = set()  # every tensor written so far, all shards
        self._shards: list[tuple[Path, list[str]]] = []  # closed shard file, tensor names
        self._pending_reports: list[dict] = []
        self.resumed_reports: list[dict] = []  # the report lines of the shards an earlier run committed
        self.ledger = None
        if resume_key is not None:
            try:
                self._resume(ShardLedger.open(self.out_dir, resume_key, resume))
            except BaseException:
                self.staging.discard()  # the lock too: nothing was written
                raise

    def _resume(self, ledger: ShardLedger) -> None:
        self.ledger = ledger
        for shard in ledger.shards:
            self._shards.append((ledger.path / shard["file"], shard["tensors"]))
            self._names.update(shard["tensors"])
            self.specs.update(shard["specs"])
            self.resumed_reports.extend(shard["reports"])

    def has(self, name: str) -> bool:
        """Whether tensor ``name`` is written already (by this run, or committed by the run resumed)."""
        return name in self._names

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def abort(self) -> None:
        if self._stream is not None:
            self._stream.file.close()
        self.staging.discard()

    def add_tensor(self, name: str, tensor: torch.Tensor, report: dict | None = None) -> None:
        """Write a tensor as it is; ``report``: its line in the quantization report (a layer kept at
        fp32), committed with its shard so a resumed run reports it too."""
        self._add({name: tensor}, None, report)

    def add_quantized(self, module_name: str, qt: QuantizedTensor, report: dict | None = None) -> None:
        self._add(qt.to_state(module_name), {module_name: qt.entry()}, report)

    def _add(self, tensors: dict[str, torch.Tensor], specs: dict[str, dict] | None = None, report: dict | None = None) -> None:
        """Write ``tensors`` to the current shard at once (the writer keeps no tensor); a shard is
        closed when the next tensors would take it past ``shard_bytes``, or when it is full."""
        twice = self._names.intersection(tensors)
        if twice:
            raise CheckpointError(f"tensor {sorted(twice)[0]} was written twice")
        for name, t in tensors.items():  # the last line of defence: no checkpoint carries inf/NaN
            if t.is_floating_point() and t.numel() and not math.isfinite(abs_max(t)):
                raise CheckpointError(f"tensor {name} holds inf/NaN values; the checkpoint was not written "
                                      "(a weight beyond the fp16 range should have been kept at fp32: please report this)")
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._stream is not None and self._stream.size and self._stream.size + size > self.shard_bytes:
            self._flush()
        stream = self._open_stream()
        with _disk_full_as_error(stream.path):
            for name, t in tensors.items():
                stream.add(name, t)
        self._names.update(tensors)
        self._pending_specs.update(specs or {})
        self._pending_reports += [report] if report is not None else []
        if stream.size >= self.shard_bytes:  # full: close it now, not when the next tensor comes
            self._flush()

    def _open_stream(self) -> _ShardStream:
        if self._stream is None:
            self._stream = _ShardStream(self.tmp_dir / f"shard-{len(self._shards):05d}.safetensors")
        return self._stream

    def _flush(self, commit: bool = True) -> None:
        """Close the current shard; ``commit``: also to the ledger (not the last shard: ``finish``
        publishes it at once, so a crash then loses nothing a resume could use)."""
        stream, self._stream = self._open_stream(), None
        meta = {"format": FORMAT, "format_version": shard_version(self._pending_specs),
                "quantization": json.dumps({"method": self.method, "options": self.options, "tensors": self._pending_specs})}
        with _disk_full_as_error(stream.path):
            stream.close(meta)
            path = stream.path if self.ledger is None or not commit else self.ledger.commit(
                stream.path, list(stream.header), self._pending_specs, self._pending_reports)
        self._shards.append((path, list(stream.header)))
        self.specs.update(self._pending_specs)
        self._pending_specs, self._pending_reports = {}, []

    def write_file(self, name: str, text: str) -> None:
        (self.tmp_dir / name).write_text(text)

    def finish(self, report: dict | None = None) -> Path:
        """Flush, name the shards, write the index and report, then rename into place."""
        if self._stream is not None or not self._shards:
            self._flush(commit=False)
        total = len(self._shards)
        weight_map = {}
        for i, (path, names) in enumerate(self._shards):
            final = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(path, self.tmp_dir / final)  # committed shards come from the ledger's folder
            weight_map.update({n: final for n in names})
        if total > 1:
            self.write_file("model.safetensors.index.json", json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
        info = {"format": FORMAT, "format_version": shard_version(self.specs), "method": self.method,
                "options": self.options, "tensors": self.specs, "report": report or {}}
        self.write_file(REPORT_FILE, json.dumps(info, indent=1))
        # config.json (written by the caller) declares the quantization to transformers; last, so a
        # config saved over it earlier (an untied head) still gets it
        quant_config.write_into(self.tmp_dir, {n: e["spec"] for n, e in self.specs.items()}, self.method)
        path = self.staging.publish()  # never clobbers; --overwrite swaps the old checkpoint out only now
        if self.ledger is not None:
            self.ledger.remove()
        return path


def shard_version(entries: dict[str, dict]) -> str:
    """The format version a shard holding these layer entries is written as: "2" when a version-1
    reader would misread one of them (see READABLE_VERSIONS), else "1"."""
    for entry in entries.values():
        if "rotate" in entry or str(entry.get("spec", "")).endswith("vq"):
            return FORMAT_VERSION
    return "1"


def _corrupt(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} has corrupt bitsmith metadata ({what}); quantize again or download the "
                           "checkpoint again")


def _layer(path: Path, name: str, entry: object) -> tuple[QuantSpec, tuple[int, int]]:
    """One layer's entry of the quantization metadata: its spec and its (out, in) shape."""
    if not isinstance(entry, dict) or not isinstance(entry.get("spec"), str):
        raise _corrupt(path, f"layer {name[:120]!r} has no spec")
    shape = entry.get("shape")
    if not isinstance(shape, list) or len(shape) != 2 or not all(type(d) is int and d >= 0 for d in shape):
        raise _corrupt(path, f"layer {name[:120]!r} has no [out, in] shape")
    try:
        return QuantSpec.parse(entry["spec"]), tuple(shape)  # type: ignore[return-value]
    except SpecError as exc:
        raise _corrupt(path, f"layer {name[:120]!r}: {exc}") from exc


def _rotation_block(path: Path, name: str, entry: dict, in_features: int) -> int | None:
    """A layer entry's Hadamard block (``{"rotate": {"block": b}}``), None when it is not rotated."""
    rotate = entry.get("rotate")
    if rotate is None:
        return None
    block = rotate.get("block") if isinstance(rotate, dict) else None
    if type(block) is not int or block < 2 or block & (block - 1) or in_features % block:
        raise _corrupt(path, f"layer {name[:120]!r} has a rotation block that is not a power of two dividing its width")
    return block


def _quantization(path: Path, meta: dict[str, str]) -> tuple[str, dict, dict[str, object]]:
    """(method, options, layer entries) from a shard's ``quantization`` metadata, each checked for type."""
    try:
        q = json.loads(meta["quantization"])
    except KeyError:
        raise _corrupt(path, "no quantization entry") from None
    except (ValueError, RecursionError) as exc:  # not JSON, a 4,300-digit integer, nesting too deep
        raise _corrupt(path, f"the quantization entry is not JSON: {str(exc)[:200]}") from exc
    if not isinstance(q, dict):
        raise _corrupt(path, "the quantization entry is not a JSON object")
    method, options, tensors = q.get("method"), q.get("options"), q.get("tensors")
    if not isinstance(method, str) or not isinstance(options, dict) or not isinstance(tensors, dict):
        raise _corrupt(path, "the quantization entry lacks its method, options or tensors")
    return method, options, tensors


def _report(folder: Path) -> dict:
    """The quantization report of bitsmith.json ({} without the file): only informative, so a
    corrupt file is named with the way out of deleting it."""
    path = Path(folder) / REPORT_FILE
    if not path.exists():
        return {}
    try:
        report = json.loads(path.read_text()).get("report", {})
        if not isinstance(report, dict):
            raise TypeError("its report is not a JSON object")
    except (ValueError, RecursionError, AttributeError, TypeError) as exc:
        raise CheckpointError(f"{path} is corrupt ({str(exc)[:200]}); it holds only the quantization report: "
                              "restore it from the checkpoint's source, or delete it to load the checkpoint "
                              "without its report") from exc
    return report


def read_info(folder: Path) -> CheckpointInfo | None:
    """The bitsmith metadata from the shard headers, or None when the folder is no bitsmith checkpoint.
    Corrupt metadata raises CheckpointError naming the file (a corrupt shard, SafetensorsError)."""
    specs: dict[str, QuantSpec] = {}
    shapes: dict[str, tuple[int, int]] = {}
    rotations: dict[str, int] = {}
    method, options, version = "", {}, ""
    for path in shard_files(Path(folder)):
        meta = read_header(path).metadata
        if not quant_config.is_bitsmith_shard(meta):
            return None
        shard = meta.get("format_version", "")
        if shard not in READABLE_VERSIONS:
            raise CheckpointError(f"{path} is bitsmith format {shard[:40]}; this bitsmith reads formats "
                                  f"{', '.join(READABLE_VERSIONS)}; upgrade bitsmith")
        version = max(version, shard)
        method, options, tensors = _quantization(path, meta)
        for name, entry in tensors.items():
            specs[name], shapes[name] = _layer(path, name, entry)
            block = _rotation_block(path, name, entry, shapes[name][1])
            if block is not None:
                rotations[name] = block
    if not version:
        return None
    return CheckpointInfo(method, options, specs, shapes, version, _report(folder), rotations)
