"""Replay of final sub-module outputs across the passes of true-sequential quantization.

The layer-wise pipeline runs a block once per stage (each pass stops at the stage's first linear,
so that stage sees the already quantized earlier stages) and once more for the next block's inputs.
Two facts make most of that recomputation avoidable, bit for bit:

- **Whatever completes in a pass is final.** A pass stops at its stage's first linear, and every
  linear that ran before that point belongs to an earlier, already quantized stage (stages are
  ordered by first call). So any sub-module whose forward *returns* during a pass -- the q/k/v
  projections, the whole attention, gate/up -- returns what it will return on every later pass.
  Outputs are recorded per batch and replayed; only the topmost are kept. Modules without linears
  (norms) get at most ``FREE_SHARE`` of the budget, so the tails below keep the rest.
- **A cut-short module is often just its last linear.** The pass that stops at ``o_proj`` has
  computed the attention core; the module that contains ``o_proj`` returns ``o_proj(that input)``.
  Once ``o_proj`` is quantized, the next pass computes ``o_proj(recorded input)`` instead of the
  attention again (the same for ``mlp`` = ``down_proj(recorded input)`` in the final pass). Whether
  a parent really returns its last linear's output (alone, or first in a tuple of Nones) is checked
  on the first batch by running it for real with a hook on the linear, so no table per
  architecture is needed; where the check fails the parent is simply recomputed.

A module called more than once per forward is never replayed (its recorded output would stand for
two different calls). Everything kept counts against ``budget`` bytes; what does not fit is
recomputed, which changes the time, never the result.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn


# Of the budget, at most this much for outputs of modules without linears. 0.15 of the default 1 GiB
# holds both norms of a SmolLM2 block (2 x 75 MB over 128 x 512 tokens, bf16) but not one of
# Qwen2.5-1.5B's (201 MB each), whose run is sized against the 40%-of-fp32 memory bound and where
# norms are a small part of a block's time next to its 6 TFLOP of linears.
FREE_SHARE = 0.15


class OutputReplay:
    def __init__(self, block: nn.Module, linears: dict[str, nn.Module], batches: int, budget: int) -> None:
        self.block, self.linears, self.batches, self.budget = block, linears, batches, budget
        self._local = threading.local()  # the batch each thread is running (pipeline.batches)
        self._lock = threading.Lock()  # the recording hooks' shared bookkeeping
        self._modules = {n: m for n, m in block.named_modules() if n}
        self._done: set[str] = set()
        self._cache: dict[str, list] = {}  # module name -> output per batch
        self._tails: dict[str, list] = {}  # linear name -> its input per batch
        self._tail_kind: dict[str, int | None] = {}  # parent name -> -1 (not a tail), 0 (returns y), n (returns (y, None...))
        self._skip: set[str] = set()  # too big, or called twice per forward

    @property
    def batch(self) -> int:
        """The batch the calling thread is running (set before each forward; batches may run in
        parallel threads, :mod:`bitsmith.pipeline.batches`)."""
        return getattr(self._local, "batch", 0)

    @batch.setter
    def batch(self, value: int) -> None:
        self._local.batch = value

    # -- bookkeeping -------------------------------------------------------------------------------
    def mark_done(self, rels: list[str]) -> None:
        """The stage's linears are quantized (their weights are final from now on)."""
        self._done.update(rels)

    def used(self) -> int:
        return sum(_held(outs) for outs in (*self._cache.values(), *self._tails.values()))

    def free_used(self) -> int:
        """Bytes of recorded outputs of modules without linears (norms)."""
        return sum(_nbytes(v) for n, outs in self._cache.items() if not self._has_linears(n) for v in outs)

    def tail_recorder(self, rel: str) -> "list | None":
        """A list for the input of linear ``rel`` per batch (filled by the stage's statistics pass),
        or None when it cannot serve as a tail: not alone in its stage is the caller's business;
        here, a parent that is already replayed, or one that failed the tail check."""
        parent = rel.rpartition(".")[0]
        if not parent or parent in self._cache or self._tail_kind.get(parent) == -1 or parent in self._skip:
            return None
        return []

    def keep_tail(self, rel: str, inputs: list) -> None:
        """Inputs of ``rel`` for every batch, recorded by the pass that stopped at it."""
        if len(inputs) == self.batches and self.used() + _held(inputs) <= self.budget:
            self._tails[rel] = inputs
        elif isinstance(inputs, SpilledTail):
            inputs.close()

    def clear(self) -> None:
        self._cache.clear()
        for inputs in self._tails.values():
            if isinstance(inputs, SpilledTail):
                inputs.close()
        self._tails.clear()

    def _ancestors(self, name: str) -> Iterator[str]:
        parent = name.rpartition(".")[0]
        while parent:
            yield parent
            parent = parent.rpartition(".")[0]

    def _covered(self, name: str) -> bool:
        return name in self._cache or any(a in self._cache for a in self._ancestors(name))

    def _has_linears(self, name: str) -> bool:
        return any(rel == name or rel.startswith(name + ".") for rel in self.linears)

    def _linears_done(self, name: str) -> bool:
        return all(rel in self._done for rel in self.linears if rel == name or rel.startswith(name + "."))

    # -- one pass ----------------------------------------------------------------------------------
    @contextmanager
    def active(self, record: bool = True, tail_of: str | None = None) -> Iterator[None]:
        """One pass over all batches (set ``self.batch`` before each). Replays what is cached,
        computes tails, and (``record``) records every module that contains linears and completes
        -- except inside ``tail_of``, the linear whose input this pass records as a tail: its
        parent will be computed from that input, so its other children's outputs would go unused."""
        tail_parent = tail_of.rpartition(".")[0] if tail_of else None
        patched = self._patch_forwards()
        state = _Pass(used=self.used(), free_used=self.free_used())
        hooks = self._recording_hooks(state, tail_parent) if record else []
        try:
            yield
        finally:
            for module in patched:
                del module.forward
            for h in hooks:
                h.remove()
            self._keep_recorded(state.recording)

    def _patch_forwards(self) -> list[nn.Module]:
        """Cached modules return their recorded output; finished tails compute from their recorded input."""
        patched: list[nn.Module] = []
        for name, module in self._modules.items():
            if name in self._cache and not any(a in self._cache for a in self._ancestors(name)):
                module.forward = (lambda *a, _n=name, **k: self._cache[_n][self.batch])
                patched.append(module)
        # one tail per parent, its last: the linear whose output it returns (a parent whose two linears are
        # stages of their own, e.g. q then o, records two, and patching it twice broke the pass's exit)
        last = {rel.rpartition(".")[0]: (rel, inputs) for rel, inputs in self._tails.items()}
        for parent, (rel, inputs) in last.items():
            if not self._covered(parent) and self._linears_done(parent):  # (failed tails are dropped after their pass)
                module = self._modules[parent]
                module.forward = self._tail_forward(parent, module, self._modules[rel], inputs)
                patched.append(module)
        return patched

    def _recording_hooks(self, state: "_Pass", tail_parent: str | None) -> list:
        hooks = []
        for name, module in self._modules.items():
            if (self._covered(name) or name in self._skip
                    or not self._linears_done(name) or (tail_parent and name.startswith(tail_parent + "."))
                    or any(self._linears_done(a) for a in self._ancestors(name))):
                # a finished ancestor is recorded instead of its children; the linears_done test
                # guards other callers. Modules without linears (norms) are recorded too, within
                # their own share of the budget (FREE_SHARE): the pipeline calls the block's first
                # norm in all five passes and its second in three, and each is ~8 elementwise
                # passes over the hidden states (a third of a bf16 SmolLM2 block forward)
                continue
            state.recording[name] = [None] * self.batches
            hooks.append(module.register_forward_hook(self._recorder(name, state)))
        return hooks

    def _recorder(self, name: str, state: "_Pass"):
        """The forward hook that records ``name``'s output per batch, within the budget."""

        def hook(_m: nn.Module, _args: Any, output: Any) -> None:
            with self._lock:  # batches may run in parallel threads
                record(output)

        def record(output: Any) -> None:
            outs = state.recording.get(name)
            if outs is None:
                return
            key = f"{name}@{self.batch}"
            state.calls[key] = state.calls.get(key, 0) + 1
            if state.calls[key] > 1 or not _replayable(output):  # called twice per forward, or a container
                freed = state.reserved.pop(name, 0)
                state.used -= freed
                state.free_used -= freed if not self._has_linears(name) else 0
                state.recording.pop(name)
                self._skip.add(name)
                return
            if name not in state.reserved:
                need = _nbytes(output) * self.batches
                free = not self._has_linears(name)
                if need + state.used > self.budget or (free and need + state.free_used > self.budget * FREE_SHARE):
                    state.recording.pop(name)
                    self._skip.add(name)
                    return
                state.reserved[name] = need
                state.used += need
                state.free_used += need if free else 0
            outs[self.batch] = output

        return hook

    def _keep_recorded(self, recording: dict[str, list]) -> None:
        """After a pass: keep the topmost completely recorded modules, drop what they cover."""
        complete = {n: outs for n, outs in recording.items() if all(o is not None for o in outs)}
        for name, outs in complete.items():
            if not any(a in complete for a in self._ancestors(name)):  # topmost only
                self._cache[name] = outs
        for name in list(self._cache):
            if any(a in self._cache for a in self._ancestors(name)):
                del self._cache[name]
        for rel in list(self._tails):  # a tail whose parent is now replayed is not needed
            if self._covered(rel.rpartition(".")[0]) or self._tail_kind.get(rel.rpartition(".")[0]) == -1:
                if isinstance(self._tails[rel], SpilledTail):
                    self._tails[rel].close()
                del self._tails[rel]

    def _tail_forward(self, name: str, parent: nn.Module, linear: nn.Module, inputs: list):
        original = parent.forward  # the class's bound forward (the instance attribute is set after this)

        def forward(*args: Any, **kwargs: Any) -> Any:
            kind = self._tail_kind.get(name)
            if kind is None:  # first use: run for real and check that the output is the linear's
                seen: list = []
                handle = linear.register_forward_hook(lambda _m, _a, out: seen.append(out))
                try:
                    out = original(*args, **kwargs)
                finally:
                    handle.remove()
                if len(seen) == 1 and out is seen[0]:
                    self._tail_kind[name] = 0
                elif (len(seen) == 1 and isinstance(out, tuple) and out and out[0] is seen[0]
                      and all(x is None for x in out[1:])):
                    self._tail_kind[name] = len(out)
                else:
                    self._tail_kind[name] = -1
                return out
            if kind == -1:
                return original(*args, **kwargs)
            y = linear(inputs[self.batch])
            return y if kind == 0 else (y,) + (None,) * (kind - 1)

        return forward


class SpilledTail:
    """A tail's inputs per batch in a file instead of memory: what :meth:`OutputReplay.keep_tail`
    holds when they exceed the replay budget. Qwen2.5-1.5B's down_proj input is 1.17 GB per block
    over 128 x 512 tokens (bf16): beyond the budget, so the final pass recomputed gate/up (3.6 TFLOP
    per block) to make it again. Written once by the stage's statistics pass, read back per batch
    (``os.pread``: the final pass's batch threads read concurrently) as the same bits. Counts 0 bytes
    against the budget; plain writes and reads, not a memory map, so the file's pages are not the
    process's resident set. Tensors on an accelerator (``--device``) are written from a CPU copy and
    read back onto the device they came from."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._items: list[tuple[int, tuple, torch.dtype, torch.device]] = []  # offset, shape, dtype, device per batch
        self._end = 0

    def append(self, x: torch.Tensor) -> None:
        raw = memoryview(x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())  # its bytes, any dtype
        done = 0
        while done < raw.nbytes:  # unbuffered: a later pread sees every byte
            done += os.pwrite(self._fd, raw[done:], self._end + done)
        self._items.append((self._end, tuple(x.shape), x.dtype, x.device))
        self._end += raw.nbytes

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> torch.Tensor:
        offset, shape, dtype, device = self._items[index]
        out = torch.empty(shape, dtype=dtype)
        buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
        done = 0
        while done < buffer.nbytes:
            got = os.preadv(self._fd, [buffer[done:]], offset + done)
            if got <= 0:
                raise OSError(f"{self.path} is shorter than the activations written to it")
            done += got
        return out.to(device)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)


@dataclass
class _Pass:
    """One pass's recording state: outputs per module and batch, calls seen, bytes reserved."""

    used: int  # bytes of the replay already in use, plus this pass's reservations
    free_used: int  # the part of ``used`` held by modules without linears
    recording: dict[str, list] = field(default_factory=dict)  # module name -> output per batch
    calls: dict[str, int] = field(default_factory=dict)  # "name@batch" -> calls in this batch
    reserved: dict[str, int] = field(default_factory=dict)  # module name -> bytes reserved


def _replayable(value: Any) -> bool:
    """Tensors, and tuples of tensors and Nones: values a replay can hand back as they were."""
    if isinstance(value, tuple):
        return all(v is None or isinstance(v, torch.Tensor) for v in value)
    return isinstance(value, torch.Tensor)


def _held(outs: "list | SpilledTail") -> int:
    """Bytes of memory a list of per-batch values holds (a spilled tail: none)."""
    return 0 if isinstance(outs, SpilledTail) else sum(_nbytes(v) for v in outs)


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0
