"""Quantized Hugging Face safetensors layouts for `bitsmith inspect`, recognised from the tensors
themselves (names, dtypes, shapes) and refined by config.json's ``quantization_config``:

- GPTQ (AutoGPTQ / GPTQModel): ``M.qweight`` int32 [in*bits/32, out], ``M.qzeros`` int32
  [groups, out*bits/32], ``M.scales`` fp16 [groups, out], optional ``M.g_idx`` int32 [in]
  (act-order when it is not monotone).
- AWQ (AutoAWQ GEMM): the same names, but ``M.qweight`` is [in, out*bits/32].
- compressed-tensors (llm-compressor): ``M.weight_packed`` int32 [out, in*bits/32] ("pack-quantized")
  or ``M.weight`` int8/fp8 ("int-", "float-", "naive-quantized"), ``M.weight_scale``,
  optional ``M.weight_zero_point``, ``M.weight_shape``, ``M.weight_g_idx``.
- bitsandbytes: 4-bit ``M.weight`` uint8 (two codes a byte) with ``M.weight.absmax`` per block,
  ``M.weight.quant_map``, ``M.weight.quant_state.bitsandbytes__nf4|fp4`` (JSON) and, with double
  quantization, ``M.weight.nested_absmax`` / ``nested_quant_map``; 8-bit ``M.weight`` int8 + ``M.SCB``.

A quantized module is one row whose bits per weight count every stored tensor of the module
(codes, scales, zeros, indices, quant maps) except its bias."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field

from bitsmith.io.inspect_report import InspectError, TensorInfo, spec_text
from bitsmith.io.safetensors import DTYPE_BITS, StTensor, read_small

Entries = dict[str, StTensor]
_QUANT_STATE = re.compile(r"^(?P<module>.+)\.weight\.quant_state\.bitsandbytes__(?P<type>\w+)$")


@dataclass(frozen=True)
class Layout:
    """What one quantized layout reader found: one row per quantized module, and which stored
    tensors those rows fold together (the rest are listed as stored)."""

    format: str
    tensors: list[TensorInfo]
    consumed: frozenset[str]
    details: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def detect_layout(entries: Entries) -> str | None:
    """The quantized layout the tensor names show, or None for plain tensors."""
    names = entries.keys()
    if any(n.endswith(".qweight") and n[: -len("qweight")] + "scales" in entries for n in names):
        return "gptq/awq"
    if any(n.endswith(".weight_packed") or n.endswith(".weight_scale") for n in names):
        return "compressed-tensors"
    if any(n.endswith(".weight.absmax") or ".weight.quant_state.bitsandbytes__" in n or n.endswith(".SCB") for n in names):
        return "bitsandbytes"
    return None


def _children(entries: Entries) -> dict[str, list[str]]:
    """Every dotted prefix -> the stored names under it."""
    out: dict[str, list[str]] = defaultdict(list)
    for name in entries:
        parts = name.split(".")
        for i in range(1, len(parts)):
            out[".".join(parts[:i])].append(name)
    return out


def _fold(entries: Entries, children: dict[str, list[str]], module: str) -> list[str]:
    return [n for n in children.get(module, []) if n != module + ".bias"]


def _stored_bits(entries: Entries, names: list[str]) -> int:
    return sum(entries[n].nbytes * 8 for n in names)


def _settings(qc: dict, keys: tuple[str, ...]) -> dict[str, str]:
    return {k: json.dumps(qc[k]) if isinstance(qc[k], (dict, list)) else str(qc[k]) for k in keys if k in qc}


# ----------------------------------------------------------------------------------- GPTQ / AWQ


def gptq_awq(entries: Entries, qc: dict) -> Layout:
    """GPTQ or AWQ packed int32 tensors; which one comes from the config when it says, else from
    the qweight layout (packed along the input dim: GPTQ; along the output dim: AWQ)."""
    children = _children(entries)
    named = str(qc.get("quant_method", "")).lower()
    cfg_bits = qc.get("bits", qc.get("w_bit"))
    sym = bool(qc.get("sym", not qc.get("zero_point", True)))
    rows, consumed, warnings, methods = [], set(), [], set()
    for qname in sorted(n for n in entries if n.endswith(".qweight")):
        module = qname[: -len(".qweight")]
        qw, sc, qz, gi = (entries.get(f"{module}.{p}") for p in ("qweight", "scales", "qzeros", "g_idx"))
        if sc is None or len(sc.shape) != 2 or len(qw.shape) != 2:
            warnings.append(f"{module} has a qweight but no 2-D scales; listed as stored")
            continue
        groups, out = sc.shape
        bits = round(32 * qz.shape[1] / out) if qz is not None and len(qz.shape) == 2 else cfg_bits
        awq_layout = qw.shape[1] != out
        if awq_layout and bits is None:
            bits = round(32 * qw.shape[1] / out)
        if not bits:
            warnings.append(f"{module}: cannot tell the code width (no qzeros and no bits in config.json); listed as stored")
            continue
        if cfg_bits and bits != cfg_bits:
            warnings.append(f"{module} stores {bits}-bit codes but config.json says bits={cfg_bits}; trusting the tensors")
        method = named if named in ("gptq", "awq") else ("awq" if awq_layout else "gptq")
        methods.add(method)
        in_features = qw.shape[0] if awq_layout else qw.shape[0] * 32 // bits
        group = in_features // groups if groups > 1 else None
        notes = ("act-order",) if gi is not None and _not_monotone(gi) else ()
        parts = _fold(entries, children, module)
        consumed.update(parts)
        rows.append(TensorInfo(f"{module}.weight", f"{method} {spec_text(bits, group, sym)}", (out, in_features),
                               _stored_bits(entries, parts) / (out * in_features), bits, group, notes))
    fmt = methods.pop() if len(methods) == 1 else (named or "gptq")
    details = _settings(qc, ("quant_method", "bits", "w_bit", "group_size", "q_group_size", "desc_act", "sym",
                             "zero_point", "true_sequential", "static_groups", "checkpoint_format", "version"))
    if named in ("gptq", "awq") and fmt != named:
        warnings.append(f"config.json says quant_method={named} but the tensors are laid out as {fmt}")
    if fmt == "gptq" and qc.get("desc_act") and any("act-order" in t.notes for t in rows):
        details["act-order"] = "yes (g_idx not monotone)"
    return Layout(fmt, rows, frozenset(consumed), details, warnings)


def _not_monotone(g_idx: StTensor) -> bool:
    import numpy as np

    values = read_small(g_idx).reshape(-1)
    return bool(values.size > 1 and np.any(np.diff(values.astype(np.int64)) < 0))


# --------------------------------------------------------------------------- compressed-tensors


def compressed_tensors(entries: Entries, qc: dict) -> Layout:
    """llm-compressor's layouts; settings per module from the matching config group."""
    children = _children(entries)
    groups = qc.get("config_groups") or {}
    rows, consumed, warnings = [], set(), []
    modules = sorted({n.rsplit(".", 1)[0] for n in entries if n.endswith((".weight_packed", ".weight_scale"))})
    for module in modules:
        packed = entries.get(module + ".weight_packed")
        weight = packed if packed is not None else entries.get(module + ".weight")
        scale = entries.get(module + ".weight_scale")
        if weight is None or len(weight.shape) != 2:
            warnings.append(f"{module} has quantization scales but no 2-D weight; listed as stored")
            continue
        wcfg = (_group_for(module, groups).get("weights") or {})
        bits = wcfg.get("num_bits")
        shape = _ct_shape(entries.get(module + ".weight_shape"), weight, packed is not None, bits)
        out, in_features = shape
        if bits is None:
            bits = round(packed.numel * 32 / (out * in_features)) if packed is not None else DTYPE_BITS.get(weight.dtype, 8)
        group, notes = _ct_group(scale, in_features, wcfg)
        sym = bool(wcfg.get("symmetric", module + ".weight_zero_point" not in entries))
        wtype = wcfg.get("type") or ("float" if weight.dtype.startswith("F8") else "int")
        parts = _fold(entries, children, module)
        consumed.update(parts)
        rows.append(TensorInfo(f"{module}.weight", f"ct-{wtype} {spec_text(bits, group, sym)}", shape,
                               _stored_bits(entries, parts) / (out * in_features), bits, group, notes))
    details = _settings(qc, ("quant_method", "format", "quantization_status", "ignore"))
    for gname, g in groups.items():
        w = g.get("weights") or {}
        details[f"config_groups.{gname}"] = (f"targets={g.get('targets')} num_bits={w.get('num_bits')} type={w.get('type')} "
                                             f"strategy={w.get('strategy')} group_size={w.get('group_size')} "
                                             f"symmetric={w.get('symmetric')} activations={'yes' if g.get('input_activations') else 'no'}")
    return Layout("compressed-tensors", rows, frozenset(consumed), details, warnings)


def _group_for(module: str, groups: dict) -> dict:
    """The config group whose targets name this module: a ``re:`` pattern or the module's name;
    class-name targets ("Linear") match every quantized module."""
    fallback = {}
    for g in groups.values():
        for target in g.get("targets") or []:
            if target.startswith("re:") and re.match(target[3:], module):
                return g
            if target == module or module.endswith("." + target):
                return g
            if not target.startswith("re:") and "." not in target and target[:1].isupper():
                fallback = fallback or g
    return fallback


def _ct_shape(shape_t: StTensor | None, weight: StTensor, packed: bool, bits: int | None) -> tuple[int, int]:
    if shape_t is not None:
        values = [int(v) for v in read_small(shape_t).reshape(-1)]
        if len(values) == 2:
            return values[0], values[1]
    if not packed:
        return weight.shape[0], weight.shape[1]
    if not bits:
        raise InspectError(f"{weight.name} is packed but neither a weight_shape tensor nor config.json's "
                           "config_groups give its width; add the config.json that came with the model")
    return weight.shape[0], weight.shape[1] * 32 // bits


def _ct_group(scale: StTensor | None, in_features: int, wcfg: dict) -> tuple[int | None, tuple[str, ...]]:
    if scale is None or scale.numel <= 1:
        return None, ("per-tensor",)
    if len(scale.shape) == 2 and scale.shape[1] > 1:
        return int(wcfg.get("group_size") or -(-in_features // scale.shape[1])), ()
    return None, ()


# ------------------------------------------------------------------------------- bitsandbytes


def bitsandbytes(entries: Entries, qc: dict) -> Layout:
    children = _children(entries)
    rows, consumed = [], set()
    four = {n[: -len(".weight.absmax")] for n in entries if n.endswith(".weight.absmax")}
    four |= {m["module"] for m in map(_QUANT_STATE.match, entries) if m}
    for module in sorted(four):
        weight = entries.get(module + ".weight")
        if weight is None:
            continue
        parts = _fold(entries, children, module)
        state = _quant_state(entries, children, module)
        qtype = (state.get("quant_type") or qc.get("bnb_4bit_quant_type") or "nf4").lower()
        shape = tuple(int(d) for d in state.get("shape") or (weight.numel * 2,))
        numel = 1
        for d in shape:
            numel *= d
        absmax = entries.get(module + ".weight.absmax")
        blocksize = int(state.get("blocksize") or (round(numel / absmax.numel) if absmax is not None else 64))
        dq = module + ".weight.nested_absmax" in entries or (absmax is not None and absmax.dtype == "U8")
        grid = "nf" if qtype == "nf4" else qtype
        consumed.update(parts)
        rows.append(TensorInfo(module + ".weight", f"bnb {spec_text(4, blocksize, grid=grid)}", shape,
                               _stored_bits(entries, parts) / numel, 4, blocksize, ("double quant",) if dq else ()))
    for scb in sorted(n for n in entries if n.endswith(".SCB")):
        module = scb[: -len(".SCB")]
        weight = entries.get(module + ".weight")
        if weight is None or weight.dtype != "I8" or module in four:
            continue
        parts = _fold(entries, children, module)
        consumed.update(parts)
        rows.append(TensorInfo(module + ".weight", "bnb w8s", weight.shape, _stored_bits(entries, parts) / weight.numel,
                               8, None, ("LLM.int8",)))
    details = _settings(qc, ("quant_method", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type",
                             "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage",
                             "llm_int8_skip_modules", "llm_int8_threshold"))
    return Layout("bitsandbytes", rows, frozenset(consumed), details)


def _quant_state(entries: Entries, children: dict[str, list[str]], module: str) -> dict:
    """The JSON quant state bitsandbytes stores as a uint8 tensor (shape, blocksize, quant_type)."""
    for name in children.get(module + ".weight.quant_state", []):
        try:
            state = json.loads(read_small(entries[name]).tobytes())
        except (ValueError, InspectError):
            return {"quant_type": name.rsplit("__", 1)[-1]}
        state.setdefault("quant_type", name.rsplit("__", 1)[-1])
        return state if isinstance(state, dict) else {}
    return {}
