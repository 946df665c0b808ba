"""Export a bitsmith checkpoint as a compressed-tensors folder (``quant_method:
"compressed-tensors"``, ``format: "pack-quantized"``): what llm-compressor writes, vLLM serves and
transformers loads. The layout itself (packing, the zero convention, what it cannot hold) is
:mod:`bitsmith.formats.ct_layout`.

Layers that share (bits, group, symmetry) form one config group whose ``targets`` name them exactly,
so mixed-precision checkpoints map too (but transformers' dequantizing loader applies one scheme to
every layer, so only single-spec folders load there); every layer of a spec is written with one
group size that divides all its rows (:func:`~bitsmith.formats.ct_layout.shared_group`), so a
single-spec checkpoint is a single config group; everything left unquantized is copied and named in
``ignore`` when it is a linear layer (lm_head). Everything that cannot map is refused before a byte
is written: non-uniform grids. A quantized input embedding (bitsmith's default stores it at w8) is
written dequantized in float32, since compressed-tensors loaders (vLLM) expect a float embedding:
float32 holds every fp16-scale x int8-code product exactly (fp16 would round them, and a tied head's
logits would move by ~1e-2), so transformers' logits equal bitsmith's; a loader running in fp16/bf16
rounds it as it rounds every other float tensor. The folder is written under a temporary name and renamed when complete
(:mod:`bitsmith.io.destination`).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from bitsmith.formats.ct_layout import SCALE_DTYPES, CTError, CTTensors, shared_group, to_ct, weight_args
from bitsmith.io.packed import other_tensors, quantized_embedding
from bitsmith.io.quant_config import strip
from bitsmith.primitives import sqnr_db

log = logging.getLogger(__name__)

CT_VERSION = "0.20.1"  # the compressed-tensors release whose layout this writes (checked in the tests)


def _refusals(folder: Path, info) -> None:
    """CTError, before any work, for a checkpoint that does not map onto compressed-tensors."""
    grids = sorted({str(s) for s in info.specs.values() if s.grid != "uniform"})
    if grids:
        raise CTError(f"the checkpoint uses non-uniform grids ({', '.join(grids)}), which compressed-tensors cannot "
                      "hold (it stores uniform integer codes); re-quantize with a uniform spec (e.g. w4g128), or "
                      "export to GGUF instead")


def _config_groups(layers: dict[str, CTTensors]) -> dict[str, dict]:
    """One config group per (bits, group, symmetric), targeting its layers by exact name."""
    by_scheme: dict[tuple, list[str]] = {}
    for name, layer in layers.items():
        by_scheme.setdefault(layer.scheme_key, []).append(name)
    return {f"group_{i}": {"targets": sorted(names), "weights": weight_args(*key), "input_activations": None,
                           "output_activations": None, "format": "pack-quantized"}
            for i, (key, names) in enumerate(sorted(by_scheme.items(), key=lambda kv: str(kv[0])))}


def quantization_config(layers: dict[str, CTTensors], ignore: list[str]) -> dict:
    """config.json's ``quantization_config`` for these layers (compressed-tensors' QuantizationConfig)."""
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": _config_groups(layers), "ignore": sorted(ignore), "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}, "version": CT_VERSION}


def export_ct(checkpoint: str | Path, out: str | Path, scale_dtype: str = "float32", *, overwrite: bool = False) -> dict:
    """Write a bitsmith checkpoint as a compressed-tensors folder at ``out``; returns the per-layer
    report (zero rounding, the group size written, and the extra error where zeros were rounded)."""
    from safetensors.torch import save_file

    from bitsmith.io.checkpoint import read_info
    from bitsmith.io.destination import Destination
    from bitsmith.io.packed import quantized_tensors

    folder, out = Path(checkpoint), Path(out)
    info = read_info(folder) if folder.is_dir() else None
    if info is None:
        raise CTError(f"{checkpoint} is not a bitsmith checkpoint; quantize it first (bitsmith quantize MODEL --spec w4g128 --out DIR)")
    if scale_dtype not in SCALE_DTYPES:
        raise CTError(f"scale dtype {scale_dtype!r} is not one of {', '.join(SCALE_DTYPES)} (both hold bitsmith's fp16 scales exactly)")
    destination = Destination(out, "ct-export", overwrite, CTError)
    destination.check()  # refuse a taken --out before reading any weights
    _refusals(folder, info)
    layers: dict[str, CTTensors] = {}
    report: dict[str, dict] = {}
    state: dict[str, torch.Tensor] = {}
    embedding = quantized_embedding(folder, info)
    packed = {m: s for m, s in info.specs.items() if m != embedding}
    groups = {spec: shared_group(spec, [info.shapes[m][1] for m, s in packed.items() if s == spec])
              for spec in set(packed.values())}
    for module, qt in quantized_tensors(folder, info).items():
        if module == embedding:  # a float table in the export: the quantized values, exactly
            state[f"{module}.weight"] = qt.dequantize().to(torch.float32)
            report[module] = {"spec": str(qt.spec), "written": "dequantized float32, exact (compressed-tensors keeps embeddings float)", "max_zero_rounding": 0.0}
            continue
        layer = layers[module] = to_ct(qt, SCALE_DTYPES[scale_dtype], groups[qt.spec])
        state.update(layer.state(module))
        entry = {"spec": str(qt.spec), "group_size": layer.group_size, "max_zero_rounding": layer.max_zero_rounding}
        if layer.max_zero_rounding:
            from bitsmith.formats.ct_layout import from_ct

            back = from_ct(layer.parts(), weight_args(*layer.scheme_key))
            entry["sqnr_db"] = sqnr_db(qt.dequantize(), back.dequantize())
            log.warning("%s: fractional zeros rounded (max %.3f code); extra error %.1f dB", module, layer.max_zero_rounding, entry["sqnr_db"])
        report[module] = entry
    state.update(other_tensors(folder, set(layers) | ({embedding} if embedding else set())))
    ignore = [] if "lm_head" in layers else ["lm_head"]  # as llm-compressor writes it, tied or not
    config = strip(json.loads((folder / "config.json").read_text()))  # bitsmith's own fields would stop transformers
    config["quantization_config"] = quantization_config(layers, ignore)
    staging = destination.stage()  # locked; refuses foreign folders
    try:
        save_file(state, str(staging.tmp / "model.safetensors"), metadata={"format": "pt"})
        for item in folder.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and item.name not in ("bitsmith.json", "model.safetensors.index.json", "config.json"):
                shutil.copyfile(item, staging.tmp / item.name)
        (staging.tmp / "config.json").write_text(json.dumps(config, indent=2))
        staging.publish()  # never clobbers; --overwrite swaps an earlier export out only now
    except BaseException:
        staging.discard()
        raise
    return report
