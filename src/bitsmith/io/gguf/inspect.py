"""GGUF files for `bitsmith inspect`: every tensor's ggml type and its bits per weight (block bytes x
8 / block weights, from ``gguf.GGML_QUANT_SIZES``), and the file type named from
``general.file_type`` (``gguf.LlamaFileType``), or the dominant ggml type when the key is absent.

The header is read with :func:`bitsmith.io.gguf.header.read_header`, which checks the
magic, the version and that the file holds every tensor it lists (a truncated download fails with
the sizes it should and does have)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from bitsmith.io.inspect_report import InspectError, InspectReport, TensorInfo, quality_warnings

_NOMINAL = re.compile(r"^(?:I?Q|TQ)(\d)_")  # Q4_K -> 4, IQ2_XS -> 2, TQ1_0 -> 1
_FP4 = {"MXFP4", "NVFP4"}
_GUESSED = 1024  # llama.cpp ORs this into general.file_type when the converter guessed the type


def nominal_bits(type_name: str) -> int | None:
    """The code width a ggml type is named by (Q4_K -> 4, IQ3_S -> 3, Q8_0 -> 8); None for plain
    float and integer types."""
    if type_name in _FP4:
        return 4
    match = _NOMINAL.match(type_name)
    return int(match[1]) if match else None


def file_type_name(value: int) -> str:
    """general.file_type as llama.cpp spells it on the command line (Q4_K_M, Q8_0, F16)."""
    import gguf

    guessed = bool(value & _GUESSED)
    try:
        name = gguf.LlamaFileType(value & ~_GUESSED).name
    except ValueError:
        return f"file type {value} (unknown to this gguf package)"
    name = "F32" if name == "ALL_F32" else name.removeprefix("MOSTLY_")
    return f"{name} (guessed)" if guessed else name


def inspect_gguf(path: Path) -> InspectReport:
    """Types, bits per weight and file type of the GGUF file at ``path``."""
    import gguf

    from bitsmith.io.gguf.header import GGUFError, read_header

    try:
        header = read_header(path)
    except GGUFError as exc:  # truncated, bad magic, unknown version or type
        raise InspectError(str(exc)) from exc
    tensors = []
    for t in header.tensors:
        qtype = gguf.GGMLQuantizationType(t.qtype)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        bits = nominal_bits(qtype.name)
        tensors.append(TensorInfo(t.name, qtype.name, tuple(t.shape), type_size * 8 / block, bits,
                                  block if bits is not None else None))
    meta = header.metadata
    ftype = meta.get("general.file_type")
    if isinstance(ftype, int):
        summary = file_type_name(ftype)
    else:
        summary = f"mostly {_dominant_type(tensors)} (no general.file_type in the file)"
    details = {"gguf version": str(header.version)}
    for key in ("general.architecture", "general.name", "general.file_type", "general.quantization_version",
                "general.size_label"):
        if key in meta:
            details[key.removeprefix("general.")] = str(meta[key])
    if isinstance(ftype, int):
        details["file_type"] = f"{ftype} ({summary})"
    return InspectReport(str(path), "gguf", summary, tensors, quality_warnings(tensors), path.stat().st_size, details)


def _dominant_type(tensors: list[TensorInfo]) -> str:
    """The ggml type holding most weights among the matrices (the quantized ones when there are)."""
    weights: Counter[str] = Counter()
    pool = [t for t in tensors if len(t.shape) >= 2 and t.quantized] or [t for t in tensors if len(t.shape) >= 2] or tensors
    for t in pool:
        weights[t.kind] += t.numel
    if not weights:
        raise InspectError("the GGUF file lists no tensors; it is a vocabulary-only or empty file, not a model")
    return weights.most_common(1)[0][0]
