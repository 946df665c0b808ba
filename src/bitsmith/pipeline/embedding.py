"""The input embedding table during a calibrated run: quantized by RTN a slice of rows at a time, and
released from the model while the blocks run (it is needed again only for the head's statistics)."""

from __future__ import annotations

import torch
from torch import nn

from bitsmith.kernels.alloc import trim_heap
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

# RTN search slices (4M weights each, methods.rtn.SEARCH_CHUNK) per heap trim in rtn_by_rows: 64 MB of
# a 1536-wide float32 table, 14 trims for the 1.5B's embedding (each costs a few ms and refaults a slice)
RTN_SLICES = 4


def rtn_by_rows(weight: torch.Tensor, spec: QuantSpec, options: dict) -> QuantizedTensor:
    """``rtn(weight, spec, None, options)``, the same codes, scales and zeros, computed a slice of
    ``RTN_SLICES`` of RTN's own search slices at a time with the heap trimmed after each.

    Why: on Qwen2.5-1.5B the w8 embedding table (151,936 x 1,536) is the run's largest RTN, and its
    range search's freed temporaries (16 MB each, below glibc's dynamic mmap threshold, so served
    from the heap) piled up as ~0.8 GB of freed but resident heap on top of the 0.93 GB fp32 table:
    that was the whole run's peak (2.85-2.91 GB at one thread, over the issue's 2.84 GB bound).
    Rows are independent in RTN and each slice is a whole number of its search slices (the same
    tensors go through the same operations), so the result is bit-identical. Per-tensor grids
    (``fit``, ``vq``) go whole."""
    from bitsmith.methods.rtn import row_slices, rtn
    from bitsmith.primitives import to_groups

    step = row_slices(to_groups(weight[:1], spec))[0].stop * RTN_SLICES  # rows (one row grouped: no padded copy)
    out_features = weight.shape[0]
    if spec.grid in ("fit", "vq") or out_features <= step:
        return rtn(weight, spec, None, options)
    whole = None
    for start in range(0, out_features, step):
        rows = slice(start, min(start + step, out_features))
        part = rtn(weight[rows], spec, None, options)
        if whole is None:
            whole = QuantizedTensor(torch.empty(out_features, part.codes.shape[1], dtype=part.codes.dtype),
                                    torch.empty(out_features, *part.scale.shape[1:], dtype=part.scale.dtype),
                                    None if part.zero is None else torch.empty(out_features, *part.zero.shape[1:],
                                                                               dtype=part.zero.dtype),
                                    spec, part.grid)
        whole.codes[rows], whole.scale[rows] = part.codes, part.scale
        if part.zero is not None:
            whole.zero[rows] = part.zero
        del part
        trim_heap()
    return whole


def release_embedding(net: nn.Module) -> str:
    """Put the input embedding on the meta device (block 0's inputs are captured; on a 1.5B model
    with a 152k vocabulary that frees ~0.5 GB for the whole run). Returns its module name."""
    from bitsmith.models import embedding_and_head_names

    name = embedding_and_head_names(net)[0].removesuffix(".weight")
    module = net.get_submodule(name)
    # buffers that are not in the state dict cannot be reloaded from the source (Gemma-3's embed_scale,
    # sqrt(hidden) computed at build time): they stay, only the table goes
    kept = {n: b for n, b in module.named_buffers(recurse=False) if n in module._non_persistent_buffers_set}
    module.to("meta")
    for n, b in kept.items():
        module.register_buffer(n, b, persistent=False)
    return name
