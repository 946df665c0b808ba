"""The calibration batches through a decoder block, several at a time on the cores.

A block forward over one batch (8 sequences of 512 tokens) is some fifty torch operations; run
with torch's intra-op threads, each is a parallel region that ends in a barrier, and on a shared
machine the barrier waits for whichever thread the OS has descheduled (methods.parallel measured
20 ms per small operation at load 17 on 2 cores). Batches are independent, so here they run in
Python threads instead, one intra-op thread each (:func:`bitsmith.methods.parallel.map_chunks`):
each thread runs its own forward start to finish, no barrier per operation.

The caller gets every batch's result in batch order and does its order-dependent work (summing
Hessians, keeping replay tails) on its own thread, so sums are taken in the same order on every
run and a resumed run stays bit-identical. The first batch runs alone: the first forward of a pass
is where :class:`~bitsmith.pipeline.replay.OutputReplay` reserves memory and checks its tails.
"""

from __future__ import annotations

from typing import Callable, Iterator, TypeVar

import torch

from bitsmith.methods.parallel import map_chunks

R = TypeVar("R")


def run_batches(fn: Callable[[int], R], count: int, workers: int | None = None) -> Iterator[tuple[int, R]]:
    """Yield ``(b, fn(b))`` for b in 0..count-1, in order: batch 0 alone, then waves of ``workers``
    batches (default: torch's intra-op thread count) in threads, each under ``torch.no_grad()``
    with one intra-op thread (a wave of one runs on the caller's thread with all of them, so no
    core idles). At most ``workers`` results are held at once."""
    workers = max(1, workers or torch.get_num_threads())

    def call(b: int) -> R:
        with torch.no_grad():  # grad mode is per thread
            return fn(b)

    if count:
        yield 0, call(0)
    for start in range(1, count, workers):
        wave = list(range(start, min(start + workers, count)))
        if len(wave) == 1:  # a last batch alone (an odd count) gets every intra-op thread, as batch 0
            yield wave[0], call(wave[0])
        else:
            yield from zip(wave, map_chunks(call, wave, workers))
