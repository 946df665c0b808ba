"""Export a bitsmith checkpoint as a GPTQ safetensors folder that transformers, vLLM and GPTQModel
load (``quant_method: "gptq"``). The layout itself (packing, the v1/v2 zero convention, what it
cannot hold) is :mod:`bitsmith.formats.gptq_layout`.

Every quantized layer is converted with :func:`~bitsmith.formats.gptq_layout.to_gptq`; fractional
zeros (HQQ) are rounded to integers and the extra error is reported. Tensors the checkpoint kept
unquantized are copied; config.json gains ``quantization_config``; the tokenizer files are copied.
The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from bitsmith.formats.gptq_layout import GPTQError, GPTQFormat, from_gptq, to_gptq
from bitsmith.io.packed import other_tensors, quantized_embedding
from bitsmith.io.quant_config import strip
from bitsmith.primitives import sqnr_db

log = logging.getLogger(__name__)


def float_outputs(folder: Path, info) -> set[str]:
    """The embedding (GPTQ has no quantized embeddings) and a head whose spec differs from the body's:
    written dequantized. Everything else must share one spec."""
    from bitsmith.models.family import HEAD_MODULE

    embedding = quantized_embedding(folder, info)
    body = {(s.bits, s.group_size, s.symmetric) for m, s in info.specs.items() if m not in (embedding, HEAD_MODULE)}
    head = info.specs.get(HEAD_MODULE)
    floats = {embedding} - {None}
    if head is not None and body and (head.bits, head.group_size, head.symmetric) not in body:
        floats.add(HEAD_MODULE)
    return floats


def body_spec(body: dict):
    """The one spec every packed layer shares (GPTQ's quantization_config holds one)."""
    if len({(s.bits, s.group_size, s.symmetric) for s in body.values()}) > 1:
        specs = sorted({str(s) for s in body.values()})
        raise GPTQError(f"the checkpoint mixes specs ({', '.join(specs)}); GPTQ's quantization_config holds one")
    return next(iter(body.values()))


def float_state(quantized: dict, floats: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """GPTQ folders keep the embedding (and a head at another spec) in fp16: their dequantized weights."""
    state = {f"{m}.weight": quantized[m].dequantize().to(torch.float16) for m in floats}
    return state, {m: {"written": "dequantized fp16", "max_zero_rounding": 0.0} for m in floats}


def export_gptq(checkpoint: str | Path, out: str | Path, fmt: GPTQFormat = GPTQFormat.V1, *,
                overwrite: bool = False) -> dict:
    """Write a bitsmith checkpoint as a GPTQ folder at ``out``; returns the per-layer report."""
    from safetensors.torch import save_file

    from bitsmith.io.checkpoint import read_info
    from bitsmith.io.packed import quantized_tensors

    folder, out = Path(checkpoint), Path(out)
    info = read_info(folder) if folder.is_dir() else None
    if info is None:
        raise GPTQError(f"{checkpoint} is not a bitsmith checkpoint; quantize it first (bitsmith quantize MODEL --spec w4g128 --out DIR)")
    if out.exists() and not overwrite:
        raise GPTQError(f"{out} already exists; choose another --out or pass --overwrite")
    floats = float_outputs(folder, info)
    spec = body_spec({m: s for m, s in info.specs.items() if m not in floats})
    quantized = quantized_tensors(folder, info)
    state, report = float_state(quantized, floats)
    for module, qt in quantized.items():
        if module in floats:
            continue
        g = to_gptq(qt, fmt)
        state.update({f"{module}.qweight": g.qweight, f"{module}.qzeros": g.qzeros,
                      f"{module}.scales": g.scales, f"{module}.g_idx": g.g_idx})
        entry = {"max_zero_rounding": g.max_zero_rounding}
        if g.max_zero_rounding:
            back = from_gptq(g, spec.bits, spec.group_size or -1, spec.symmetric, fmt)
            entry["sqnr_db"] = sqnr_db(qt.dequantize(), back.dequantize())
            log.warning("%s: fractional zeros rounded (max %.3f code); extra error %.1f dB", module, g.max_zero_rounding, entry["sqnr_db"])
        report[module] = entry
    state.update(other_tensors(folder, set(quantized)))
    from bitsmith.io.destination import Destination

    staging = Destination(out, "gptq-export", overwrite, GPTQError).stage()  # locked; refuses foreign folders
    tmp = staging.tmp
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for item in folder.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and item.name not in ("bitsmith.json", "model.safetensors.index.json"):
                shutil.copyfile(item, tmp / item.name)
        config = strip(json.loads((folder / "config.json").read_text()))  # bitsmith's own fields would stop transformers
        config["quantization_config"] = {
            "quant_method": "gptq", "bits": spec.bits, "group_size": spec.group_size or -1, "desc_act": False,
            "sym": spec.symmetric, "checkpoint_format": fmt.value, "lm_head": "lm_head" in quantized and "lm_head" not in floats,
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        staging.publish()  # never clobbers; --overwrite swaps an earlier export out only now
    except BaseException:
        staging.discard()
        raise
    return report
