"""Running the methods' many small, independent tensor operations fast on a few cores.

The searches and iterations of the quantization methods (range and clip searches, HQQ's
half-quadratic steps, GPTQ's column walk) are long chains of small elementwise operations on
independent rows of a weight. Run through torch's intra-op thread pool, every one of those
operations is a parallel region with a barrier at its end. Measured here (2 cores, 8 processes
sharing them, load ~17): a 64 x 3072 matrix-vector product took 20 ms with 2 intra-op threads
and 0.024 ms with 1 -- the barrier waits for a thread the OS has descheduled. On a quiet machine
the barrier costs microseconds, but the operations are too small to gain from it anyway.

So these parts run with one intra-op thread, and where the work splits into independent chunks
(rows are independent in every search), the chunks go to ``workers`` Python threads instead: torch
releases the GIL inside its kernels, so two threads keep two cores busy with no barrier per
operation. Splitting rows changes no result: each row's arithmetic is the same in any chunk.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


@contextmanager
def intra_op_threads(n: int) -> Iterator[int]:
    """Run the block with at most ``n`` intra-op threads; yields the count that was set before."""
    before = torch.get_num_threads()
    if n >= before:
        yield before
        return
    torch.set_num_threads(max(1, n))
    try:
        yield before
    finally:
        torch.set_num_threads(before)


def map_chunks(fn: Callable[[T], R], items: Sequence[T], workers: int | None = None) -> list[R]:
    """``[fn(item) for item in items]``, in order, with each operation single-threaded and the items
    spread over ``workers`` threads (default: torch's intra-op thread count, i.e. the cores it would
    have used). One item, or one worker, runs inline."""
    with intra_op_threads(1) as cores:
        workers = max(1, min(workers or cores, len(items)))
        if workers == 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(fn, items))


def row_chunks(rows: int, row_size: int, weights_per_chunk: int) -> list[slice]:
    """Slices of ``rows`` rows of ``row_size`` weights, about ``weights_per_chunk`` weights each
    (at least one row): cache-sized chunks keep the elementwise chains in L2."""
    step = max(1, weights_per_chunk // max(1, row_size))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


@functools.lru_cache(maxsize=1)
def bf16_fpmath_rounds() -> bool:
    """Whether oneDNN's bf16 fpmath mode changes a float32 matmul on this CPU and torch: a 64 x 64
    product of 1 + 2^-12 (not a bf16 value: it rounds to 1) differs from the float32 one only where the
    mode is honoured. Measured once per process, because the CPU flags do not tell (AVX512-BF16
    without AMX ignored it on one Xeon)."""
    from bitsmith.kernels.cpu import fast_bf16_matmul

    backend = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if backend is None or not hasattr(backend, "fp32_precision") or not fast_bf16_matmul():
        return False
    x = torch.full((64, 64), 1 + 2.0**-12)
    before = backend.fp32_precision
    exact = float((x @ x)[0, 0])
    backend.fp32_precision = "bf16"
    try:
        return float((x @ x)[0, 0]) != exact
    finally:
        backend.fp32_precision = before


@contextmanager
def bf16_fpmath(enabled: bool = True) -> Iterator[bool]:
    """Run float32 matmuls in the block through oneDNN's bf16 fpmath mode (operands rounded to bf16,
    float32 accumulation and output); yields whether the mode was set. Exact for operands that are
    bf16 values; for others it is a deliberate approximation (the per-layer reports' quadratic forms,
    ``methods.gptq.layer_errors_by_rows``). The setting is process-wide: callers use it only where no
    other thread multiplies (the statistics are summed, and the reports computed, on the pipeline's
    own thread while no batch forward runs).
    A torch without the setting, or without oneDNN, keeps plain float32 GEMMs (same values), and so
    do CPUs where oneDNN ignores the mode (seen on an AVX2-only Zen 3, and on an AVX512-BF16 Xeon
    without AMX), so the answer is False wherever :func:`bf16_fpmath_rounds` finds no effect."""
    if not enabled or not bf16_fpmath_rounds():  # False too without the setting or without oneDNN
        yield False
        return
    backend = torch.backends.mkldnn.matmul
    before = backend.fp32_precision
    backend.fp32_precision = "bf16"
    try:
        yield True
    finally:
        backend.fp32_precision = before
