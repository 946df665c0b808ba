"""Say what quantization a file or folder carries, tensor by tensor: bitsmith checkpoints, GGUF
files, GPTQ / AWQ / compressed-tensors / bitsandbytes safetensors folders and plain fp32/fp16/bf16
safetensors. The format is read from the contents (magic bytes, safetensors headers and metadata,
tensor names and dtypes, config.json's ``quantization_config``), never from a file name.

Nothing here loads a tensor: headers are read and a few small tensors (g_idx, stored shapes,
quantization states) are read from their byte ranges, so inspecting a large model is instant."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from bitsmith.io.inspect_report import InspectError, InspectReport, TensorInfo, quality_warnings
from bitsmith.io.safetensors import (DTYPE_BITS, SafetensorsError, StHeader, StTensor, looks_like_safetensors,
                                     read_header, shard_files)

__all__ = ["InspectError", "InspectReport", "TensorInfo", "inspect_path"]

_GGUF_MAGIC = b"GGUF"
_OLD_GGML = {b"lmgg", b"fmgg", b"tjgg"}  # GGML, GGMF, GGJT: llama.cpp's formats before GGUF
_BITSMITH_VERSIONS = ("1", "2")  # io.checkpoint.READABLE_VERSIONS (not imported: this reader stays torch-free)
_KNOWN_METHODS = {"gptq": "gptq/awq", "awq": "gptq/awq", "compressed-tensors": "compressed-tensors",
                  "bitsandbytes": "bitsandbytes"}


def inspect_path(path: str | Path) -> InspectReport:
    """The quantization a bitsmith checkpoint, GGUF file, safetensors file or model folder carries."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    try:
        return _inspect_file(p) if p.is_file() else _inspect_folder(p)
    except SafetensorsError as exc:  # the shared reader's error, in inspect's own type
        raise InspectError(str(exc)) from exc


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def _inspect_file(p: Path) -> InspectReport:
    from bitsmith.io.gguf.inspect import inspect_gguf

    magic = _magic(p)
    if magic == _GGUF_MAGIC:
        return inspect_gguf(p)
    if looks_like_safetensors(p):
        return _inspect_safetensors([read_header(p)], p, {})
    if p.stat().st_size == 0:
        raise InspectError(f"{p} is empty (0 bytes); download it again")
    if magic in _OLD_GGML:
        raise InspectError(f"{p.name} is an old GGML/GGJT file from before GGUF; convert it to GGUF with llama.cpp's "
                           "convert scripts, or download a GGUF version")
    raise InspectError(f"{p.name} is neither a GGUF file (it does not start with the GGUF magic bytes, it starts with "
                       f"{magic!r}) nor a safetensors file; check the path, or download the file again if it should be one")


def _inspect_folder(p: Path) -> InspectReport:
    from bitsmith.io.gguf.inspect import inspect_gguf

    files = sorted(f for f in p.iterdir() if f.is_file())
    if not files:
        raise InspectError(f"{p} is an empty folder; point inspect at a model folder (config.json + *.safetensors) "
                           "or a .gguf file")
    headers = [read_header(f) for f in shard_files(p, sniff=True)]
    if not headers:
        ggufs = [f for f in files if _magic(f) == _GGUF_MAGIC]
        if len(ggufs) == 1:
            return inspect_gguf(ggufs[0])
        if ggufs:
            names = ", ".join(f.name for f in ggufs[:4])
            raise InspectError(f"{p} holds {len(ggufs)} GGUF files ({names}); point inspect at one of them")
        raise InspectError(f"{p} holds no safetensors or GGUF file; point inspect at a model folder or file")
    return _inspect_safetensors(headers, p, _quantization_config(p))


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InspectError(f"{path} is not valid JSON ({exc}); fix it or download it again") from exc
    if not isinstance(value, dict):
        raise InspectError(f"{path} does not hold a JSON object; fix it or download it again")
    return value


def _quantization_config(folder: Path) -> dict:
    """config.json's quantization_config (or compression_config); older AutoGPTQ and AutoAWQ
    folders keep it in quantize_config.json / quant_config.json instead."""
    config = folder / "config.json"
    if config.exists():
        cfg = _read_json(config)
        qc = cfg.get("quantization_config") or cfg.get("compression_config")
        if isinstance(qc, dict):
            return qc
    for name, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
        if (folder / name).exists():
            qc = _read_json(folder / name)
            return {"quant_method": method, **qc}
    return {}


def _inspect_safetensors(headers: list[StHeader], root: Path, qc: dict) -> InspectReport:
    from bitsmith.io import inspect_hf

    size = sum(h.size for h in headers)
    if any(h.metadata.get("format") == "bitsmith" for h in headers):
        return _inspect_bitsmith(headers, root, size)
    entries: dict[str, StTensor] = {}
    for h in headers:
        entries.update(h.tensors)
    method = str(qc.get("quant_method", "")).lower()
    layout = inspect_hf.detect_layout(entries)
    warnings: list[str] = []
    if method and method not in _KNOWN_METHODS:
        warnings.append(f"config.json names quant_method {method!r}, which inspect does not know; tensors are listed as stored")
    elif method and layout != _KNOWN_METHODS[method]:
        warnings.append(f"config.json says quant_method {method!r} but the tensors do not have its layout; "
                        "tensors are listed as stored")
    readers = {"gptq/awq": inspect_hf.gptq_awq, "compressed-tensors": inspect_hf.compressed_tensors,
               "bitsandbytes": inspect_hf.bitsandbytes}
    if layout is None:
        tensors = sorted(_plain_rows(entries, set()), key=lambda t: _natural(t.name))
        summary = f"unknown quantization {method!r}" if method and method not in _KNOWN_METHODS else _dtype_summary(tensors)
        details = {k: str(v) for k, v in qc.items() if not isinstance(v, (dict, list))}
        return InspectReport(str(root), "safetensors", summary, tensors, warnings + quality_warnings(tensors), size, details)
    found = readers[layout](entries, qc if method in _KNOWN_METHODS else {})
    tensors = sorted(found.tensors + _plain_rows(entries, found.consumed), key=lambda t: _natural(t.name))
    return InspectReport(str(root), found.format, _layout_summary(found.tensors), tensors,
                         warnings + found.warnings + quality_warnings(tensors), size, found.details)


def _plain_rows(entries: dict[str, StTensor], consumed: set[str] | frozenset[str]) -> list[TensorInfo]:
    """Tensors stored as they are; fp8 ones count as 8-bit quantized, other dtypes as not quantized."""
    rows = []
    for name, t in entries.items():
        if name in consumed:
            continue
        bits = 8 if t.dtype.startswith("F8") else None
        rows.append(TensorInfo(name, t.dtype, t.shape, DTYPE_BITS.get(t.dtype, t.nbytes * 8 / max(t.numel, 1)), bits))
    return rows


def _natural(name: str) -> tuple:
    """Sort key that puts layers.9 before layers.10."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name))


def _dtype_summary(tensors: list[TensorInfo]) -> str:
    return "/".join(sorted({t.kind for t in tensors if len(t.shape) == 2})) or "-"


def _layout_summary(tensors: list[TensorInfo]) -> str:
    """The kinds of the quantized modules, most weights first, with their notes (act-order ...)."""
    weights: Counter[str] = Counter()
    notes: set[str] = set()
    for t in tensors:
        weights[t.kind] += t.numel
        notes.update(t.notes)
    text = " + ".join(k for k, _ in weights.most_common()) or "no quantized tensors"
    return f"{text} ({', '.join(sorted(notes))})" if notes else text


def _inspect_bitsmith(headers: list[StHeader], root: Path, size: int) -> InspectReport:
    """A bitsmith checkpoint: per-module specs from the shard metadata (each shard lists its own),
    bits per weight from the stored qweight/scale/zero/grid tensors."""
    from bitsmith.spec import QuantSpec

    specs: dict[str, QuantSpec] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    notes: dict[str, tuple[str, ...]] = {}  # rotated layers: ("hadamard <block>",)
    method = ""
    for h in headers:
        version = h.metadata.get("format_version", "")
        if version not in _BITSMITH_VERSIONS:
            raise InspectError(f"{h.path.name} is bitsmith format {version}; this bitsmith reads format "
                               f"{', '.join(_BITSMITH_VERSIONS)}; upgrade bitsmith")
        try:
            q = json.loads(h.metadata["quantization"])
            method = q.get("method", method)
            for module, entry in q["tensors"].items():
                specs[module], shapes[module] = QuantSpec.parse(entry["spec"]), tuple(entry["shape"])
                if entry.get("rotate"):
                    notes[module] = (f"hadamard {entry['rotate']['block']}",)
        except (KeyError, ValueError, TypeError) as exc:
            raise InspectError(f"{h.path.name} has damaged bitsmith metadata ({exc!r}); quantize the model again") from exc
    entries: dict[str, StTensor] = {}
    for h in headers:
        entries.update(h.tensors)
    stored_parts = ("qweight", "scale", "zero", "grid", "rot_signs")
    consumed = {f"{m}.{part}" for m in specs for part in stored_parts}
    tensors = []
    for module, spec in specs.items():
        parts = [entries[n] for n in (f"{module}.{p}" for p in stored_parts) if n in entries]
        out, in_features = shapes[module]
        stored = sum(t.nbytes * 8 for t in parts) or spec.stored_bits(out, in_features)
        tensors.append(TensorInfo(module + ".weight", str(spec), (out, in_features), stored / (out * in_features),
                                  spec.bits, spec.group_size, notes.get(module, ())))
    tensors = sorted(tensors + _plain_rows(entries, consumed), key=lambda t: _natural(t.name))
    counts = Counter(str(s) for s in specs.values())
    summary = " + ".join(f"{s} x{n}" if len(counts) > 1 else s for s, n in counts.most_common())
    details = {"method": method, "format_version": headers[0].metadata.get("format_version", ""),
               **({"rotated_layers": f"{len(notes)} (randomized Hadamard, online at run time)"} if notes else {}),
               **_codebook_details(specs.values())}
    return InspectReport(str(root), "bitsmith", f"{summary} ({method})", tensors, quality_warnings(tensors), size, details)


def _codebook_details(specs) -> dict[str, str]:
    """Vector-codebook layers (vq specs): each layer's codebook shape; its bits are in bits/weight."""
    vq = sorted({s for s in specs if s.grid == "vq"}, key=str)
    if not vq:
        return {}
    return {"codebooks": "; ".join(f"{s}: {s.levels} x {s.vq_dim} fp16 per layer, {s.index_bits}-bit index per "
                                   f"{s.vq_dim} weights (counted in bits/weight)" for s in vq)}
