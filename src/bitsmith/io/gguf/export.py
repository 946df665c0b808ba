"""Export to GGUF, the file format of llama.cpp: ``export_gguf(model, out, qtype)``.

Two routes, chosen by what ``model`` is:

(a) A bitsmith checkpoint (or an imported GPTQ folder or GGUF file): each quantized layer whose grid
    a GGUF type stores exactly is re-encoded from its codes (:func:`bitsmith.io.gguf.encode.encode_exact`),
    its one rounding step reported per tensor as ``max_abs_error``. Any other spec, or a ``qtype``
    other than the exact one, re-quantizes the dequantized weights into ``qtype`` and reports the
    extra error (SQNR, dB) against the checkpoint's own weights. Tensors the checkpoint kept
    unquantized are written as stored (F16 matrices, F32 vectors).
(b) Any other model (Hugging Face folder, GGUF file, alias): every matrix is quantized straight to
    the llama.cpp mix named by ``qtype`` (:mod:`bitsmith.io.gguf.mixes`), with importance weights
    (llama.cpp's imatrix) from a forward pass over calibration text
    (:mod:`bitsmith.io.gguf.calibration`), optionally with GPTQ error feedback.

The steps: check the request, gather calibration statistics, then write: metadata
(:mod:`.metadata`, :mod:`.tokenizer`), each tensor renamed (:mod:`.names`), typed and encoded
(:mod:`.encode`), and the file type. The file is written under a temporary name and renamed when
complete.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitsmith.formats.ggml_types import decode
from bitsmith.io.gguf.encode import EXACT_TYPES, encode_exact, encode_matrix, exact_type
from bitsmith.io.gguf.mixes import ExportError, mix_for, pick_type
from bitsmith.io.gguf.names import Naming
from bitsmith.primitives import sqnr_db
from bitsmith.tensor import QuantizedTensor

log = logging.getLogger(__name__)

# parts of a quantized module other than its codes: written as part of the module's one GGUF tensor
CODE_PARTS = ("scale", "zero", "grid", "qzeros", "scales", "g_idx", "weight_scale", "weight_zero_point", "weight_shape")


@dataclass(frozen=True)
class TensorExport:
    name: str  # GGUF name
    qtype: str
    route: str  # "exact" (codes kept) | "requantized" (from the checkpoint) | "quantized" | "copied"
    sqnr_db: float | None  # against what the input model computes with (inf: identical)
    max_abs_error: float


@dataclass(frozen=True)
class GGUFExport:
    path: Path
    file_type: str
    tensors: tuple[TensorExport, ...]
    metadata_from: str  # the GGUF file whose metadata was copied, or "config"


@dataclass(frozen=True)
class ExportJob:
    """Everything the writing loop needs about the model, decided before the file is opened."""

    model: str | Path
    source: Any  # a bitsmith.models ModelSource
    naming: Naming
    qtype: str | None  # the mix, upper case; None: keep exact types
    quantized: dict[str, QuantizedTensor]  # HF module name -> codes (route (a))
    from_quantized: bool
    importance: dict[str, np.ndarray]  # HF weight name -> imatrix
    hessians: dict[str, torch.Tensor]  # HF weight name -> X^T X / tokens (error feedback only)
    origin: Path | None  # the GGUF file to copy metadata from

    @property
    def tied(self) -> bool:
        return "lm_head.weight" not in self.source.tensor_names() and "lm_head" not in self.quantized

    @property
    def n_layers(self) -> int:
        return self.source.config.num_hidden_layers

    @property
    def n_gqa(self) -> int:
        config = self.source.config
        return config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def export_gguf(model: str | Path, out: str | Path, qtype: str | None = None, *, importance: bool = True,
                calibration_tokens: int = 4096, error_feedback: bool = False, overwrite: bool = False,
                calibration: tuple[dict[str, np.ndarray], dict[str, torch.Tensor]] | None = None,
                progress: Callable[[str, int, int], None] | None = None) -> GGUFExport:
    """Write ``model`` (a bitsmith checkpoint, HF folder, GGUF file or alias) as a GGUF file at ``out``.

    qtype: a llama.cpp type or mix (:data:`~bitsmith.io.gguf.mixes.MIXES`). For a checkpoint, None
    keeps every layer whose spec has an exact GGUF type (:data:`~bitsmith.io.gguf.encode.EXACT_TYPES`)
    as it is; for other models it is required.
    error_feedback (route (b) only): GPTQ on the GGUF grid for the decoder blocks' matrices
    (:func:`~bitsmith.io.gguf.encode.gptq_encode`), with Hessians from the same calibration tokens.
    calibration: precomputed :func:`~bitsmith.io.gguf.calibration.calibration_statistics` of
    ``model`` (to export several mixes from one forward pass); computed here when needed and not given."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; choose another --out or pass --overwrite")
    job = prepare_export(model, qtype, importance, calibration_tokens, error_feedback, calibration)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        file_type, results = write_gguf(job, tmp, progress)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return GGUFExport(out, file_type, tuple(results), str(job.origin) if job.origin else "config")


def prepare_export(model: str | Path, qtype: str | None, importance: bool, calibration_tokens: int,
                   error_feedback: bool, calibration: tuple[dict, dict] | None) -> ExportJob:
    """Open the model, refuse what cannot be exported (in this order), gather calibration statistics."""
    from bitsmith.io.checkpoint import read_info
    from bitsmith.io.gguf.metadata import gguf_origin
    from bitsmith.io.packed import quantized_tensors
    from bitsmith.models import open_source

    source = open_source(model)
    info = read_info(source.path) if source.kind == "bitsmith" else None
    if qtype is not None:
        qtype = qtype.upper()
        mix_for(qtype)
    naming = Naming.for_config(source.config)
    quantized = quantized_tensors(source.path, info) if info else imported_layers(source, model)
    from_quantized = info is not None or bool(quantized)  # route (a): a checkpoint, or an imported GPTQ/GGUF model
    if not from_quantized and qtype is None:
        raise ExportError(f"{model} is not quantized (not a bitsmith checkpoint, GPTQ folder or GGUF file), so it "
                          "needs a target type: pass --type (e.g. Q4_K_M or Q8_0)")
    if qtype is None:
        missing = sorted({str(qt.spec) for m, qt in quantized.items()
                          if exact_type(qt.spec) is None and not is_output_layer(naming, m)})
        if missing:
            raise ExportError(f"{', '.join(missing)} has no exact GGUF type (exact: {', '.join(EXACT_TYPES)}); "
                              "pass --type (e.g. Q4_K_M or Q8_0) to re-quantize into a GGUF type")
    if error_feedback and from_quantized:
        raise ExportError("error feedback (GPTQ) applies when quantizing from unquantized weights; "
                          f"{model} is already quantized: export it without it, or quantize it with --method gptq")
    imat: dict[str, np.ndarray] = {}
    hess: dict[str, torch.Tensor] = {}
    if not from_quantized and qtype not in ("F16", "F32") and (error_feedback or (importance and qtype != "Q8_0")):
        from bitsmith.io.gguf.calibration import calibration_statistics

        imat, hess = calibration if calibration is not None else calibration_statistics(
            model, calibration_tokens, hessians=error_feedback)
        if not error_feedback:
            hess = {}
        if not importance:
            imat = {}
    origin = gguf_origin(source, info.report if info else {})
    return ExportJob(model, source, naming, qtype, quantized, from_quantized, imat, hess, origin)


def write_gguf(job: ExportJob, path: Path, progress: Callable[[str, int, int], None] | None) -> tuple[str, list[TensorExport]]:
    """Write the whole file at ``path``: metadata, every tensor, the file type. (file type, per-tensor results)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), job.naming.arch_name)
    write_metadata(writer, job)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    results: list[TensorExport] = []
    types: dict[str, int] = {}  # GGUF type -> bytes of matrices written in it
    names = job.source.tensor_names()
    tied, n_layers, n_gqa = job.tied, job.n_layers, job.n_gqa
    for i, name in enumerate(names):
        entry = export_tensor(job, name, tied, n_layers, n_gqa)
        if entry is None:
            continue
        gname, data, res, used = entry
        add_tensor(writer, gname, data, used)
        results.append(res)
        types[used] = types.get(used, 0) + (data.size if data.ndim > 1 else 0)
        if progress:
            progress(gname, i + 1, len(names))
    file_type = job.qtype or max(types, key=types.get)
    ftype = getattr(gguf.LlamaFileType, f"MOSTLY_{file_type}", gguf.LlamaFileType.GUESSED)
    writer.add_file_type(int(ftype) if file_type != "F32" else int(gguf.LlamaFileType.ALL_F32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file_type, results


def write_metadata(writer: Any, job: ExportJob) -> None:
    """The source GGUF's keys when there is one, else the config's hyperparameters and the tokenizer."""
    from bitsmith.io.gguf.metadata import add_value, config_metadata, copy_gguf_metadata
    from bitsmith.io.gguf.tokenizer import write_tokenizer

    if job.origin is not None:
        copy_gguf_metadata(writer, job.origin)
        return
    source = job.source
    writer.add_name(Path(str(job.model)).name)
    for key, value in config_metadata(source.config, job.naming.arch_name).items():
        add_value(writer, key, value)
    folder = source.tokenizer_dir or source.path
    write_tokenizer(writer, Path(folder), source.config.model_type, source.config.vocab_size)


def export_tensor(job: ExportJob, name: str, tied: bool, n_layers: int, n_gqa: int,
                  ) -> tuple[str, np.ndarray, TensorExport, str] | None:
    """(GGUF name, data, result, GGUF type) of the model tensor ``name``; None when it is not written
    (a quantized module's scales or zeros, or a tensor the architecture has no GGUF name for)."""
    module, _, part = name.rpartition(".")
    if module in job.quantized and part in CODE_PARTS:
        return None
    is_quantized = module in job.quantized and part in ("qweight", "weight", "weight_packed")
    if is_quantized:
        name = f"{module}.weight"
    gname = job.naming.gguf_name(name)
    if gname is None:
        log.warning("%s has no GGUF name in %s; left out", name, job.naming.arch_name)
        return None
    if is_quantized and job.qtype is None and exact_type(job.quantized[module].spec) is None:
        # an embedding or head at a spec with no exact GGUF type (bitsmith's default w8: one scale per
        # row) goes to Q8_0, the 8-bit type llama.cpp itself uses for them; the error it adds is reported
        values = job.quantized[module].dequantize().numpy()
        data, res, used = encode_tensor(gname, values, OUTPUT_REQUANT_TYPE, None, job.naming)
        return gname, data, res, used
    if is_quantized:
        data, res, used = export_quantized(gname, job.quantized[module], job.qtype, job.naming, n_layers, tied, n_gqa)
        return gname, data, res, used
    values = job.source.load_tensor(name).numpy()
    if values.ndim < 2:
        used = "F32"
    elif job.from_quantized:  # a tensor the input kept unquantized (or in a type without group codes): as stored
        used = stored_type(job.source, name)
    else:
        used = pick_type(job.qtype, gname, values.shape[-1], n_layers, tied, n_gqa)
    imp = job.importance.get(name) if used not in ("F16", "F32") else None
    data, res, used = encode_tensor(gname, values, used, imp, job.naming, hessian=job.hessians.get(name))
    return gname, data, res, used


OUTPUT_REQUANT_TYPE = "Q8_0"
OUTPUT_GGUF_NAMES = ("token_embd.weight", "output.weight")


def is_output_layer(naming: Naming, module: str) -> bool:
    """Whether ``module`` is the embedding table or the head (GGUF's token_embd / output)."""
    return naming.gguf_name(f"{module}.weight") in OUTPUT_GGUF_NAMES


def stored_type(source: Any, name: str) -> str:
    """The GGUF type that writes an unquantized tensor of a quantized model as its source stores it."""
    stored = source.source_dtype(name)
    if stored.lower() in ("f16", "bf16"):
        return "F16"
    return stored if source.kind == "gguf" and stored != "BF16" else "F32"


def encode_tensor(gname: str, values: np.ndarray, qtype: str, imp: np.ndarray | None, naming: Naming,
                  reference: np.ndarray | None = None, hessian: torch.Tensor | None = None,
                  ) -> tuple[np.ndarray, TensorExport, str]:
    """Encode float values (HF layout) as ``qtype`` in GGUF layout, with the error it adds."""
    values = naming.fix_rows(gname, naming.fix_values(gname, values.astype(np.float32)))
    ref = values if reference is None else naming.fix_rows(gname, reference)
    if values.ndim < 2 or qtype == "F32":
        return values, TensorExport(gname, "F32", "copied", math.inf, 0.0), "F32"
    data = encode_matrix(values, qtype, imp, hessian)
    back = decode(data, qtype, values.shape)
    route = "copied" if qtype in ("F16", "F32") else "quantized" if reference is None else "requantized"
    err = TensorExport(gname, qtype, route, sqnr_db(torch.from_numpy(ref), torch.from_numpy(back)),
                       float(np.abs(back - ref).max(initial=0.0)))
    return data, err, qtype


def export_quantized(gname: str, qt: QuantizedTensor, qtype: str | None, naming: Naming, n_layers: int,
                     tied: bool, n_gqa: int = 1) -> tuple[np.ndarray, TensorExport, str]:
    """A checkpoint layer: its codes as they are when a GGUF type holds them, else re-quantized."""
    exact = exact_type(qt.spec)
    target = exact if qtype is None else pick_type(qtype, gname, qt.shape[1], n_layers, tied, n_gqa)
    if exact is not None and exact == target:
        rows = naming.fix_rows(gname, np.arange(qt.shape[0]))  # permute codes, scales and zeros alike
        idx = torch.from_numpy(rows)
        permuted = QuantizedTensor(qt.codes[idx], qt.scale[idx], None if qt.zero is None else qt.zero[idx], qt.spec)
        _, data, err = encode_exact(permuted)
        ref = permuted.dequantize().numpy()
        back = decode(data, exact, qt.shape)
        return data, TensorExport(gname, exact, "exact", sqnr_db(torch.from_numpy(ref), torch.from_numpy(back)), err), exact
    dq = qt.dequantize().numpy()
    return encode_tensor(gname, dq, target, None, naming, reference=dq)


def imported_layers(source: Any, model: str | Path) -> dict[str, QuantizedTensor]:
    """The quantized layers of a GPTQ folder or of a GGUF file given by path (its matrices whose type maps
    onto bitsmith group codes, :mod:`bitsmith.io.gguf.quantized`); empty for unquantized models and aliases."""
    if source.kind == "hf":
        from bitsmith.io.import_gptq import load_gptq_folder, read_gptq_config

        if read_gptq_config(source.path) is None:
            from bitsmith.io.import_ct import load_ct_folder, read_ct_config

            return load_ct_folder(source.path)[1] if read_ct_config(source.path) is not None else {}
        _, layers, _ = load_gptq_folder(source.path)
        if any(perm is not None for _, perm in layers.values()):
            raise ExportError(f"{source.path} uses GPTQ act-order (a permuted g_idx), whose groups are not contiguous "
                              "channel ranges as GGUF blocks are; load it with bitsmith (eval, generate) instead")
        return {name: qt for name, (qt, _) in layers.items()}
    if source.kind == "gguf" and Path(str(model)).expanduser().is_file():
        from bitsmith.io.gguf.quantized import gguf_quantized_tensors

        return gguf_quantized_tensors(source.path)[0]
    return {}


def add_tensor(writer: Any, gname: str, data: np.ndarray, qtype: str) -> None:
    """Hand ``data`` to the writer: floats as numpy floats, quantized types as raw bytes with their type."""
    from gguf import GGMLQuantizationType

    if qtype == "F32":
        writer.add_tensor(gname, np.ascontiguousarray(data, dtype=np.float32))
    elif qtype == "F16":
        writer.add_tensor(gname, np.ascontiguousarray(data).view(np.float16))
    else:
        writer.add_tensor(gname, np.ascontiguousarray(data), raw_dtype=GGMLQuantizationType[qtype])
