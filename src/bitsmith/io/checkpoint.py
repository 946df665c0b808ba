"""bitsmith checkpoints: a self-contained Hugging Face-style folder.

Layout (format version 1)::

    config.json, tokenizer files          copied from the source, so the folder stands alone
    model-00001-of-0000N.safetensors      tensors; every shard's header carries __metadata__:
        format = "bitsmith", format_version = "1",
        quantization = JSON {"method", "options",
                             "tensors": {module name: {"spec": "w4g128", "shape": [out, in]}}}
    model.safetensors.index.json          weight map (when there is more than one shard)
    bitsmith.json                         the same metadata for the whole model plus the quantization
                                          report (per-layer error, bits/weight, timings)

A quantized linear layer ``L`` is stored as ``L.qweight`` (uint8, packed codes, see
:mod:`bitsmith.formats.packing`), ``L.scale`` (fp16 [out, G]) and, when asymmetric, ``L.zero``
(fp16 [out, G]). Every other tensor keeps its name. The folder is written under a temporary name
and renamed only when complete, so a crash or a full disk never leaves a folder that looks finished.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

FORMAT = "bitsmith"
FORMAT_VERSION = "1"
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


def _disk_full_error(path: Path, exc: OSError) -> CheckpointError:
    return CheckpointError(f"no space left on the device while writing {path}; free some space or choose another --out ({exc.strerror})")


def distinct_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors, contiguous, none sharing memory with another (safetensors refuses shared
    storage): a tensor whose storage an earlier one uses is cloned. Shared storage arises legitimately,
    e.g. q/k/v quantized as one stacked GPTQ problem share one fitted or fixed grid."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[name] = t
    return out


class CheckpointWriter:
    """Writes a checkpoint tensor by tensor, shard by shard, into a temporary folder that
    :meth:`finish` renames to ``out_dir``. Use as a context manager: an exception removes the
    temporary folder."""

    def __init__(self, out_dir: Path, method: str, options: dict, *, overwrite: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise CheckpointError(f"{self.out_dir} already exists; choose another --out or pass --overwrite")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.partial-", dir=self.out_dir.parent))
        self.method, self.options, self.shard_bytes = method, options, shard_bytes
        self.specs: dict[str, dict] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_specs: dict[str, dict] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # temp file name, tensor names

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self._add({name: tensor.contiguous()})

    def add_quantized(self, module_name: str, qt: QuantizedTensor) -> None:
        self._pending_specs[module_name] = {"spec": str(qt.spec), "shape": list(qt.shape)}
        self._add(qt.to_state(module_name))

    def _add(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._pending and self._pending_bytes + size > self.shard_bytes:
            self._flush()
        self._pending.update(tensors)
        self._pending_bytes += size
        if self._pending_bytes >= self.shard_bytes:  # full: write it now, not when the next tensor comes
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        self._pending = distinct_storage(self._pending)
        name = f"shard-{len(self._shards):05d}.safetensors"
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "quantization": json.dumps({"method": self.method, "options": self.options, "tensors": self._pending_specs})}
        path = self.tmp_dir / name
        try:
            save_file(self._pending, str(path), metadata=meta)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _disk_full_error(path, exc) from exc
            raise
        self._shards.append((name, list(self._pending)))
        self.specs.update(self._pending_specs)
        self._pending, self._pending_specs, self._pending_bytes = {}, {}, 0

    def write_file(self, name: str, text: str) -> None:
        (self.tmp_dir / name).write_text(text)

    def finish(self, report: dict | None = None) -> Path:
        """Flush, name the shards, write the index and report, then rename into place."""
        if self._pending or not self._shards:
            self._flush()
        total = len(self._shards)
        weight_map = {}
        for i, (tmp_name, names) in enumerate(self._shards):
            final = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(self.tmp_dir / tmp_name, self.tmp_dir / final)
            weight_map.update({n: final for n in names})
        if total > 1:
            self.write_file("model.safetensors.index.json", json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
        info = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": self.method,
                "options": self.options, "tensors": self.specs, "report": report or {}}
        self.write_file(REPORT_FILE, json.dumps(info, indent=1))
        if self.out_dir.exists():  # --overwrite: replace only now that the new folder is complete
            shutil.rmtree(self.out_dir)
        os.replace(self.tmp_dir, self.out_dir)
        return self.out_dir


def shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


def read_info(folder: Path) -> CheckpointInfo | None:
    """The bitsmith metadata from the shard headers, or None when the folder is no bitsmith checkpoint."""
    from safetensors import safe_open

    specs: dict[str, QuantSpec] = {}
    shapes: dict[str, tuple[int, int]] = {}
    method, options, version = "", {}, ""
    for path in shard_files(Path(folder)):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            return None
        version = meta.get("format_version", "")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{path} is bitsmith format {version}; this bitsmith reads format {FORMAT_VERSION}; upgrade bitsmith")
        q = json.loads(meta["quantization"])
        method, options = q["method"], q["options"]
        specs.update({k: QuantSpec.parse(v["spec"]) for k, v in q["tensors"].items()})
        shapes.update({k: tuple(v["shape"]) for k, v in q["tensors"].items()})
    if not version:
        return None
    report_path = Path(folder) / REPORT_FILE
    report = json.loads(report_path.read_text()).get("report", {}) if report_path.exists() else {}
    return CheckpointInfo(method, options, specs, shapes, version, report)
