"""Say what quantization a file or folder carries, tensor by tensor: bitsmith checkpoints, GGUF
files and plain safetensors folders. The format is read from the file's contents, never its name."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "I64": 64,
              "I32": 32, "I16": 16, "I8": 8, "U8": 8, "BOOL": 8}
_ATTENTION = re.compile(r"(attn|attention|q_proj|k_proj|v_proj|o_proj)", re.I)
_EMBED = re.compile(r"(embed|token_embd|wte|lm_head|output\.weight$)", re.I)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    kind: str  # spec string (w4g128), ggml type (Q4_K) or dtype (F16)
    shape: tuple[int, ...]
    bits_per_weight: float

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class InspectReport:
    path: str
    format: str  # "bitsmith" | "gguf" | "safetensors"
    summary: str  # e.g. "Q4_K_M", "w4g128 (rtn)", "F16"
    tensors: list[TensorInfo]
    warnings: list[str] = field(default_factory=list)

    def total_bits_per_weight(self, only_quantized: bool = False) -> float:
        rows = [t for t in self.tensors if not only_quantized or t.bits_per_weight < 16]
        weights = sum(t.numel for t in rows)
        return sum(t.numel * t.bits_per_weight for t in rows) / max(weights, 1)

    def as_dict(self) -> dict:
        return {"path": self.path, "format": self.format, "summary": self.summary,
                "bits_per_weight": self.total_bits_per_weight(),
                "quantized_bits_per_weight": self.total_bits_per_weight(True),
                "warnings": self.warnings,
                "tensors": [{"name": t.name, "kind": t.kind, "shape": list(t.shape), "bits_per_weight": t.bits_per_weight} for t in self.tensors]}


def _flags(tensors: list[TensorInfo], bits_of) -> list[str]:
    """What commonly hurts quality: attention or embeddings at <= 3 bits, no groups at low bits."""
    warnings = []
    low_attn = [t.name for t in tensors if _ATTENTION.search(t.name) and (bits_of(t) or 99) <= 3]
    low_emb = [t.name for t in tensors if _EMBED.search(t.name) and (bits_of(t) or 99) <= 3]
    if low_attn:
        warnings.append(f"{len(low_attn)} attention tensors at 3 bits or fewer (e.g. {low_attn[0]}): attention is sensitive; expect quality loss")
    if low_emb:
        warnings.append(f"embeddings/output at 3 bits or fewer ({low_emb[0]}): this often hurts quality noticeably")
    return warnings


def inspect_path(path: str | Path) -> InspectReport:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return _inspect_gguf(p)
        if p.suffix == ".safetensors":
            return _inspect_safetensors([p], p)
        raise ValueError(f"{p} is neither a GGUF file nor safetensors; point inspect at a .gguf file or a model folder")
    from bitsmith.io.checkpoint import read_info, shard_files

    shards = shard_files(p)
    ggufs = sorted(p.glob("*.gguf"))
    if not shards and len(ggufs) == 1:
        return _inspect_gguf(ggufs[0])
    if not shards:
        raise ValueError(f"{p} holds no .safetensors or .gguf file; point inspect at a model folder or file")
    info = read_info(p)
    if info is not None:
        return _inspect_bitsmith(p, info, shards)
    return _inspect_safetensors(shards, p)


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or n > 100_000_000:
            raise ValueError(f"{path} is not a valid safetensors file (header length {n}); download or write it again")
        return json.loads(f.read(n))


def _inspect_safetensors(shards: list[Path], root: Path) -> InspectReport:
    tensors = []
    for shard in shards:
        for name, meta in _header(shard).items():
            if name == "__metadata__":
                continue
            tensors.append(TensorInfo(name, meta["dtype"], tuple(meta["shape"]), DTYPE_BITS.get(meta["dtype"], 0)))
    kinds = sorted({t.kind for t in tensors if len(t.shape) == 2})
    return InspectReport(str(root), "safetensors", "/".join(kinds) or "-", tensors)


def _inspect_bitsmith(root: Path, info, shards: list[Path]) -> InspectReport:
    tensors = []
    quant_parts = {f"{m}.{part}" for m in info.specs for part in ("qweight", "scale", "zero", "grid")}
    for module, spec in info.specs.items():
        shape = info.shapes[module]
        tensors.append(TensorInfo(module + ".weight", str(spec), shape, spec.bits_per_weight(*shape)))
    for shard in shards:
        for name, meta in _header(shard).items():
            if name != "__metadata__" and name not in quant_parts:
                tensors.append(TensorInfo(name, meta["dtype"], tuple(meta["shape"]), DTYPE_BITS.get(meta["dtype"], 0)))
    specs = sorted({str(s) for s in info.specs.values()})
    warnings = _flags(tensors, lambda t: info.specs[t.name.removesuffix(".weight")].bits if t.name.removesuffix(".weight") in info.specs else None)
    return InspectReport(str(root), "bitsmith", f"{'+'.join(specs)} ({info.method})", tensors, warnings)


def _inspect_gguf(path: Path) -> InspectReport:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path} is not a readable GGUF file ({exc}); it may be truncated: download it again") from exc
    tensors = []
    for t in reader.tensors:
        block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        tensors.append(TensorInfo(t.name, t.tensor_type.name, shape, type_size * 8 / block))
    ftype = reader.get_field("general.file_type")
    summary = "unknown"
    if ftype is not None:
        value = int(ftype.contents())
        try:
            summary = gguf.LlamaFileType(value).name.removeprefix("MOSTLY_")
        except ValueError:
            summary = f"file type {value}"
    bits = {"Q2": 2, "Q3": 3, "IQ2": 2, "IQ3": 3, "IQ1": 1, "TQ1": 2, "TQ2": 2}
    bits_of = lambda t: next((b for k, b in bits.items() if t.kind.startswith(k + "_")), None)  # noqa: E731
    return InspectReport(str(path), "gguf", summary, tensors, _flags(tensors, bits_of))
