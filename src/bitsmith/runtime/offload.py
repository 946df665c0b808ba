"""Offloaded execution: run a bitsmith checkpoint whose decoder blocks do not all fit a memory budget.

As many blocks as fit stay resident (the first ones); every other block keeps only its small
tensors (norms, biases) in memory. Its quantized linears are placeholders until the block is
called: a forward pre-hook reads the packed tensors from the checkpoint through safetensors'
``safe_open`` (memory-mapped; the file is opened for that read and closed again, so no mapping
stays alive) and builds the QuantLinears; a forward hook puts the placeholders back as soon as the
block has run, releasing the tensors. Peak memory for the blocks is the resident ones plus the
largest streamed block, which is the budget :func:`plan_offload` keeps within.

The computation is unchanged: a streamed block's QuantLinears are built from the very tensors the
resident loader would use, so logits are bit-identical (tested). Each token then re-reads the
streamed blocks from the page cache or the disk: slower, but it runs in the memory given.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bitsmith.io.checkpoint import CheckpointInfo, shard_files
from bitsmith.io.packed import PACKED_PARTS
from bitsmith.nn.qlinear import QuantLinear, set_submodule
from bitsmith.runtime.install import QuantizedLayer, loaded_bias
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.spec import QuantSpec

log = logging.getLogger(__name__)

_DTYPE_BYTES = {"U8": 1, "I8": 1, "BOOL": 1, "F16": 2, "BF16": 2, "I16": 2, "F32": 4, "I32": 4, "F64": 8, "I64": 8}


class OffloadError(ValueError):
    """The memory budget cannot run the model; the message names the smallest workable budget."""


@dataclass(frozen=True)
class OffloadPlan:
    """Which decoder blocks stay resident and which are streamed from the checkpoint per call."""

    resident: tuple[int, ...]
    streamed: tuple[int, ...]
    block_bytes: tuple[int, ...]  # packed quantized bytes of each block
    max_memory: int

    @property
    def resident_bytes(self) -> int:
        return sum(self.block_bytes[i] for i in self.resident)

    @property
    def peak_bytes(self) -> int:
        """Block bytes alive at most: the resident blocks plus the largest streamed one."""
        return self.resident_bytes + max((self.block_bytes[i] for i in self.streamed), default=0)


def plan_offload(block_bytes: list[int], max_memory: int) -> OffloadPlan:
    """Keep the longest prefix of blocks resident such that it, plus one streamed block, fits."""
    if sum(block_bytes) <= max_memory:
        return OffloadPlan(tuple(range(len(block_bytes))), (), tuple(block_bytes), max_memory)
    largest = max(block_bytes)
    if largest > max_memory:
        raise OffloadError(f"a memory budget of {_size(max_memory)} cannot hold even one decoder block "
                           f"({_size(largest)} of quantized weights); give --max-memory of at least {_size(largest, up=True)}")
    resident, used = [], 0
    for i, size in enumerate(block_bytes):
        rest = [block_bytes[j] for j in range(i + 1, len(block_bytes))]
        if used + size + max(rest, default=0) > max_memory:
            break
        resident.append(i)
        used += size
    streamed = tuple(i for i in range(len(block_bytes)) if i not in resident)
    return OffloadPlan(tuple(resident), streamed, tuple(block_bytes), max_memory)


def _size(n: int, up: bool = False) -> str:
    """Bytes in the largest decimal unit that keeps the number >= 1 (rounded up when ``up``)."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{math.ceil(n / scale * 10) / 10:g}{unit}" if up else f"{n / scale:.1f} {unit}"
    return f"{n}B" if up else f"{n} B"


def tensor_index(folder: Path) -> dict[str, tuple[Path, int]]:
    """Tensor name -> (shard, stored bytes), from the shard headers alone."""
    from bitsmith.io.safetensors import read_header

    index = {}
    for path in shard_files(folder):
        for name, entry in read_header(path).tensors.items():
            index[name] = (path, math.prod(entry.shape) * _DTYPE_BYTES.get(entry.dtype, 4))
    return index


class _Offloaded(nn.Module):
    """Stands where a streamed block's QuantLinear goes while the block is not running."""

    def __init__(self, name: str, spec: QuantSpec, shape: tuple[int, int], bias: torch.Tensor | None,
                 rotation_block: int | None = None) -> None:
        super().__init__()
        self.name, self.spec, self.rotation_block = name, spec, rotation_block
        self.out_features, self.in_features = shape
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"{self.name} is offloaded and was called outside its block; call the whole block")

    def extra_repr(self) -> str:
        return f"{self.name}, spec={self.spec}, streamed from the checkpoint"


class BlockStreamer:
    """Forward hooks that build one block's QuantLinears before it runs and drop them after."""

    def __init__(self, block: nn.Module, prefix: str, placeholders: dict[str, _Offloaded], index: dict[str, tuple[Path, int]],
                 options: RuntimeOptions) -> None:
        self.block, self.prefix, self.placeholders, self.options = block, prefix, placeholders, options
        self.shards: dict[Path, list[str]] = {}
        for rel in placeholders:
            for part in PACKED_PARTS:
                key = f"{prefix}.{rel}.{part}"
                if key in index:
                    self.shards.setdefault(index[key][0], []).append(key)
        self.loads = 0

    def load(self, module: nn.Module, args: tuple) -> None:
        from safetensors import safe_open

        parts: dict[str, dict[str, torch.Tensor]] = {}
        for path, keys in self.shards.items():
            with safe_open(str(path), framework="pt") as f:  # memory-mapped; unmapped on close
                for key in keys:
                    module_name, _, part = key.rpartition(".")
                    parts.setdefault(module_name, {})[part] = f.get_tensor(key)
        for rel, ph in self.placeholders.items():
            p = parts[f"{self.prefix}.{rel}"]
            set_submodule(self.block, rel, _build(p, ph, self.options))
        self.loads += 1

    def release(self, module: nn.Module, args: tuple, output: object) -> None:
        for rel, ph in self.placeholders.items():
            set_submodule(self.block, rel, ph)


def _build(parts: dict[str, torch.Tensor], ph: _Offloaded, options: RuntimeOptions) -> QuantLinear:
    """The QuantLinear the resident loader builds from these checkpoint tensors (the same code:
    :class:`~bitsmith.runtime.install.QuantizedLayer`)."""
    bias = None if ph.bias is None else ph.bias.detach()
    return QuantizedLayer(ph.spec, ph.in_features, parts=parts, rotation_block=ph.rotation_block).linear(bias, options)


def offload_blocks(net: nn.Module, folder: Path, info: CheckpointInfo, max_memory: int,
                   options: RuntimeOptions = RuntimeOptions()) -> tuple[OffloadPlan, set[str]]:
    """Plan which blocks of ``net`` to stream under ``max_memory`` bytes of quantized block weights,
    install placeholders and hooks on the streamed ones, and return the plan and the module names now
    streamed (the caller loads every other quantized module as usual)."""
    from bitsmith.models.arch import find_blocks

    prefix, blocks = find_blocks(net)
    index = tensor_index(Path(folder))
    members: list[list[str]] = [[] for _ in blocks]
    for module in info.specs:
        head, _, rest = module.partition(f"{prefix}.")
        if head == "" and rest.split(".", 1)[0].isdigit():
            members[int(rest.split(".", 1)[0])].append(module)
    sizes = [sum(index.get(f"{m}.{part}", (None, 0))[1] for m in mods for part in PACKED_PARTS) for mods in members]
    plan = plan_offload(sizes, max_memory)
    streamed: set[str] = set()
    for i in plan.streamed:
        block_prefix = f"{prefix}.{i}"
        placeholders = {}
        for module in members[i]:
            rel = module[len(block_prefix) + 1:]
            bias = loaded_bias(net.get_submodule(module))
            placeholders[rel] = _Offloaded(module, info.specs[module], info.shapes[module], bias, info.rotations.get(module))
            set_submodule(blocks[i], rel, placeholders[rel])
        streamer = BlockStreamer(blocks[i], block_prefix, placeholders, index, options)
        blocks[i].register_forward_pre_hook(streamer.load)
        blocks[i].register_forward_hook(streamer.release, always_call=True)
        streamed.update(members[i])
    log.info("offload: %d of %d blocks resident (%s), %d streamed per forward; peak block memory %s",
             len(plan.resident), len(sizes), _size(plan.resident_bytes), len(plan.streamed), _size(plan.peak_bytes))
    return plan, streamed
