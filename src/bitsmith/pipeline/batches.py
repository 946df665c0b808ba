"""The calibration batches through a decoder block, several at a time on the cores.

A block forward over one batch (8 sequences of 512 tokens) is some fifty torch operations; run
with torch's intra-op threads, each is a parallel region that ends in a barrier, and on a shared
machine the barrier waits for whichever thread the OS has descheduled (methods.parallel measured
20 ms per small operation at load 17 on 2 cores). Batches are independent, so here they run in
Python threads instead, one intra-op thread each: each thread runs its own forward start to finish,
no barrier per operation.

Order-dependent work (summing Hessians, keeping replay tails) is done in batch order, so sums are
taken in the same order on every run and a resumed run stays bit-identical. The first batch runs
alone: the first forward of a pass is where :class:`~bitsmith.pipeline.replay.OutputReplay`
reserves memory and checks its tails.

Two forms. :func:`run_batches` runs waves of ``workers`` batches and hands their results to the
caller's thread, which sums them while no forward runs. :func:`for_each_batch` hands each result to
``consume`` inside the worker that made it, in batch order (a worker waits for its batch's turn), so
one worker sums batch b while the other runs the next forward: no core waits for the sums, and no
pool or thread team is started per wave. It is for consumers whose result does not depend on the
intra-op thread count (the AMX Hessian kernel: every block of H summed by one thread in token order),
since ``consume`` runs at one intra-op thread where the caller's thread would use all of them.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from bitsmith.methods.parallel import intra_op_threads, map_chunks

R = TypeVar("R")


def run_batches(fn: Callable[[int], R], count: int, workers: int | None = None) -> Iterator[tuple[int, R]]:
    """Yield ``(b, fn(b))`` for b in 0..count-1, in order: batch 0 alone, then waves of ``workers``
    batches (default: torch's intra-op thread count) in threads, each under ``torch.no_grad()``
    with one intra-op thread (a wave of one runs on the caller's thread with all of them, so no
    core idles). At most ``workers`` results are held at once."""
    workers = max(1, workers or torch.get_num_threads())
    call = _no_grad(fn)
    if count:
        yield 0, call(0)
    for start in range(1, count, workers):
        wave = list(range(start, min(start + workers, count)))
        if len(wave) == 1:  # a last batch alone (an odd count) gets every intra-op thread, as batch 0
            yield wave[0], call(wave[0])
        else:
            yield from zip(wave, map_chunks(call, wave, workers))


def for_each_batch(fn: Callable[[int], R], count: int, consume: Callable[[int, R], None] | None = None,
                   workers: int | None = None) -> None:
    """``consume(b, fn(b))`` for b in 0..count-1, ``consume`` called in batch order, everything under
    ``torch.no_grad()``. The batches that :func:`run_batches` runs on the caller's thread with every
    intra-op thread (batch 0, and a last batch left alone by its waves) run there here too, so each
    forward sees the same thread count as there; the others go to ``workers`` threads (default:
    torch's intra-op thread count) at one intra-op thread each, which take the next batch as soon as
    they have consumed their last one; batch 0's result is consumed by the first of them while the next
    runs batch 1. At most ``workers`` results are held at once."""
    workers = max(1, workers or torch.get_num_threads())
    call, consume = _no_grad(fn), _no_grad(consume or (lambda b, result: None))
    if not count:
        return
    first = call(0)
    last_alone = workers > 1 and (count - 1) % workers == 1  # run_batches' wave of one
    pooled = range(1, count - 1 if last_alone else count)
    if workers == 1 or len(pooled) < 2:
        consume(0, first)
        del first
        for b in pooled:
            consume(b, call(b))
    else:  # batch 0 is consumed by the first worker while the second runs batch 1's forward
        ready = {0: first}
        del first  # the pool's only reference: dropped once consumed
        _ordered_pool(call, consume, [0, *pooled], workers, ready)
    if last_alone:
        consume(count - 1, call(count - 1))


def _ordered_pool(call: Callable[[int], R], consume: Callable[[int, R], None], batches: Sequence[int],
                  workers: int, ready: dict[int, R]) -> None:
    """Run ``call`` over ``batches`` on ``workers`` threads at one intra-op thread, each result consumed
    by its own worker once every earlier batch is consumed; the results in ``ready`` (taken out of it)
    are only consumed. The first error stops every worker (the others finish the batch they are on)
    and is raised here."""
    turn = _Turns(batches)

    def work() -> None:
        while (b := turn.take()) is not None:
            try:
                result = ready.pop(b) if b in ready else call(b)
                if not turn.wait_for(b):
                    return
                consume(b, result)
                result = None  # dropped before the next batch's turn: not held while it is summed
                turn.done()
            except BaseException as error:  # noqa: BLE001  (handed to the caller's thread)
                turn.fail(error)
                return

    with intra_op_threads(1):
        threads = [threading.Thread(target=work, name=f"bitsmith-batch-{i}", daemon=True)
                   for i in range(min(workers, len(batches)))]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException as error:  # e.g. Ctrl-C on the caller's thread: stop the workers first
            turn.fail(error)
            for t in threads:
                t.join()
            raise
    if turn.error is not None:
        raise turn.error


class _Turns:
    """Hands out batches in order and lets each be consumed only after the ones before it."""

    def __init__(self, batches: Sequence[int]) -> None:
        self._batches, self._next, self._turn = list(batches), 0, 0
        self._cond = threading.Condition()
        self.error: BaseException | None = None

    def take(self) -> int | None:
        """The next batch to compute, or None when all are handed out or a worker failed."""
        with self._cond:
            if self.error is not None or self._next == len(self._batches):
                return None
            self._next += 1
            return self._batches[self._next - 1]

    def wait_for(self, b: int) -> bool:
        """Block until batch ``b`` is next to be consumed; False when a worker failed."""
        with self._cond:
            self._cond.wait_for(lambda: self.error is not None or self._batches[self._turn] == b)
            return self.error is None

    def done(self) -> None:
        """The batch whose turn it was is consumed."""
        with self._cond:
            self._turn += 1
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            if self.error is None:
                self.error = error
            self._cond.notify_all()


def _no_grad(fn: Callable) -> Callable:
    """``fn`` under ``torch.no_grad()`` (grad mode is per thread)."""

    def call(*args):
        with torch.no_grad():
            return fn(*args)

    return call
