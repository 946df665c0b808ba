"""Write a distilled checkpoint: the input checkpoint's tensors with the tuned scales, zeros and norm
weights in place of the stored ones, the same codes, method and options (plus a ``distill`` entry),
its config and tokenizer files, through the checkpoint writer (staged, published only when complete)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from bitsmith.io.checkpoint import REPORT_FILE, CheckpointError, CheckpointWriter, read_info, shard_files
from bitsmith.recover.tunable import TunableLinear, trainable

_WEIGHT_FILES = ("model.safetensors.index.json", REPORT_FILE)


def write_distilled(checkpoint: Path, out: Path, net: nn.Module, tunable: dict[str, TunableLinear], report: dict,
                    overwrite: bool) -> Path:
    from safetensors import safe_open

    info = read_info(checkpoint)
    if info is None:
        raise CheckpointError(f"{checkpoint} is no longer a bitsmith checkpoint; it changed during distillation")
    tuned = {n: p.detach().float() for n, p in trainable(net).items() if n.rpartition(".")[0] not in tunable}
    short = {k: v for k, v in report.items() if k != "curve"}
    options = {**info.options, "distill": short}
    from bitsmith.io.packed import quantized_tensors

    # quantized modules that are not tuned (the w8 embedding of the default output policy) keep their
    # codes and scales, and go through add_quantized so the new checkpoint records their spec
    untouched = quantized_tensors(checkpoint, info, exclude=frozenset(tunable), rotated=True)
    with CheckpointWriter(out, info.method, options, overwrite=overwrite) as writer:
        for path in shard_files(checkpoint):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    module, _, leaf = key.rpartition(".")
                    if (module in tunable or module in untouched) and leaf != "bias":
                        continue  # written once below, from the tuned layer or as the quantized tensor it is
                    # a quantized layer's bias (Qwen2's q/k/v) is frozen and is not part of its QuantizedTensor
                    writer.add_tensor(key, tuned[key] if key in tuned else f.get_tensor(key))
        for module, layer in tunable.items():
            writer.add_quantized(module, layer.quantized())
        for module, qt in untouched.items():
            writer.add_quantized(module, qt)
        for item in Path(checkpoint).iterdir():
            if item.is_file() and item.suffix != ".safetensors" and item.name not in _WEIGHT_FILES:
                shutil.copy2(item, writer.tmp_dir / item.name)
        return writer.finish({**info.report, "distill": report})


def stored_norms(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The norm weights as a checkpoint stores them (for tests and comparisons)."""
    from safetensors import safe_open

    found = {}
    for path in shard_files(checkpoint):
        with safe_open(str(path), framework="pt") as f:
            found.update({k: f.get_tensor(k) for k in f.keys() if "norm" in k and k.endswith(".weight")})
    return found
