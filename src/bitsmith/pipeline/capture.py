"""Block inputs for the layer-wise pipeline: capture them without computing any block, and keep
them in memory or in a memory-mapped file on disk.

Capture replaces every decoder block by a :class:`Recorder` that stores the hidden states and the
keyword arguments it is called with and returns the hidden states unchanged. One forward of the
model over the calibration batches then costs only the embedding (and the masks and rotary tables
the model builds for its blocks): block 0's recorded hidden states are the true embedding output,
and every block's recorded kwargs are exactly those the model gives it (Gemma-3 gives sliding and
full-attention layers different masks and rotary tables).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bitsmith.nn.qlinear import set_submodule

log = logging.getLogger(__name__)

BlockCall = tuple[tuple, dict[str, Any]]  # positional args after the hidden states, keyword args


class Recorder(nn.Module):
    """Stands in for a block during capture: records (hidden, args, kwargs), returns hidden."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.calls: list[tuple[torch.Tensor, tuple, dict[str, Any]]] = []

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls.append((hidden_states, args, kwargs))
        return hidden_states

    def __getattr__(self, name: str) -> Any:  # noqa: D105
        # Model code may read block attributes (e.g. ``attention_type``): answer for the block.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


class Replay(Recorder):
    """Stands in for a block when replaying stored hidden states through the model's tail:
    returns ``self.value`` (set per batch) when given, else its input unchanged."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        self.value: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states if self.value is None else self.value


class ActivationStore:
    """Activations [N, L, H] of one dtype, in memory or in a raw file (a numpy memmap)."""

    def __init__(self, tensor: torch.Tensor, path: Path | None = None, mmap: np.memmap | None = None) -> None:
        self.tensor = tensor  # [N, L, H]
        self.path = path  # the backing file when memory-mapped
        self._mmap = mmap

    @staticmethod
    def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def create(cls, shape: tuple[int, ...], dtype: torch.dtype, path: Path, spill_bytes: int) -> "ActivationStore":
        """In memory when it fits ``spill_bytes``, else a new memory-mapped file at ``path``."""
        size = cls.nbytes(shape, dtype)
        if size <= spill_bytes:
            return cls(torch.empty(shape, dtype=dtype))
        log.info("activations (%.0f MB) spill to %s", size / 1e6, path)
        return cls._mapped(path, shape, dtype, "w+")

    @classmethod
    def open(cls, path: Path, shape: tuple[int, ...], dtype: torch.dtype, spill_bytes: int) -> "ActivationStore":
        """Activations saved by :meth:`save` (or written as a memmap): read into memory when they fit."""
        size = cls.nbytes(shape, dtype)
        if path.stat().st_size != size:
            raise ValueError(f"{path} has {path.stat().st_size:,} bytes, expected {size:,}; delete its folder and start over")
        if size <= spill_bytes:
            raw = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
            return cls(raw.view(dtype).view(shape))
        return cls._mapped(path, shape, dtype, "r+")

    @classmethod
    def _mapped(cls, path: Path, shape: tuple[int, ...], dtype: torch.dtype, mode: str) -> "ActivationStore":
        mm = np.memmap(path, dtype=np.uint8, mode=mode, shape=(cls.nbytes(shape, dtype),))
        return cls(torch.from_numpy(mm).view(dtype).view(shape), path, mm)

    @property
    def spilled(self) -> bool:
        return self._mmap is not None

    def save(self, path: Path) -> None:
        """Make the activations durable at ``path`` (atomically: a temp file, then a rename)."""
        if self._mmap is not None and self.path == path:
            self._mmap.flush()
            return
        tmp = path.with_name(path.name + ".tmp")
        self.tensor.contiguous().view(-1).view(torch.uint8).numpy().tofile(tmp)
        tmp.replace(path)

    def close(self) -> None:
        if self._mmap is not None:
            self._mmap.flush()
        self.tensor, self._mmap = torch.empty(0), None


def batch_slices(samples: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, samples)) for i in range(0, samples, batch_size)]


def capture_block_calls(
    model: nn.Module, blocks: nn.ModuleList, calib: torch.Tensor, batch_size: int, store: ActivationStore | None
) -> list[list[BlockCall]]:
    """Run the model on ``calib`` [N, L] batch by batch with recorders in place of the blocks.

    Writes block 0's inputs into ``store`` (when given) and returns, per block, the (args, kwargs)
    of each batch's call. The blocks and the output head are restored afterwards.
    """
    originals = list(blocks)
    recorders = [Recorder(b) for b in originals]
    head_name = output_head_name(model)
    head = model.get_submodule(head_name) if head_name else None
    calls: list[list[BlockCall]] = [[] for _ in originals]
    try:
        for i, rec in enumerate(recorders):
            blocks[i] = rec
        if head is not None:  # the logits are never needed: skip the largest matmul
            set_submodule(model, head_name, nn.Identity())
        with torch.no_grad():
            for sl in batch_slices(calib.shape[0], batch_size):
                model(input_ids=calib[sl], use_cache=False)
                for i, rec in enumerate(recorders):
                    if len(rec.calls) != 1:
                        raise RuntimeError(
                            f"decoder block {i} was called {len(rec.calls)} times in one forward; "
                            "the layer-wise pipeline needs each block called once"
                        )
                    hidden, args, kwargs = rec.calls.pop()
                    calls[i].append((args, kwargs))
                    if i == 0 and store is not None:
                        store.tensor[sl] = hidden
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
        if head is not None:
            set_submodule(model, head_name, head)
    return calls


def output_head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)
