"""Per-row log-sum-exp and argmax of logits on the native path (csrc/score.cpp), for evaluation.

What scoring a window needs from the model's logits [T, V] is, per position, the log-normaliser
``lse`` (so ``log q_i = logits_i - lse`` at any gathered id) and the argmax (top-1 agreement): two
passes over each row from the cache instead of torch's full log-softmax and max-with-indices
(csrc/score.cpp says what that costs). :func:`row_lse_argmax` returns None where the kernel does
not apply (no native library, no AVX-512, not a CPU float32 tensor with unit column stride, a NaN
in a row) and the caller takes :func:`torch_lse_argmax`, the oracle the tests hold it to.
"""

from __future__ import annotations

import ctypes

import torch

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
MIN_PARALLEL_ELEMENTS = 1 << 20  # smaller calls run on one thread: waking another costs more


def _library() -> ctypes.CDLL | None:
    from bitsmith.kernels.build import declared_library

    return declared_library({"bs_row_lse_argmax": ([_PTR, _I64, _I64, _I64, _PTR, _PTR, ctypes.c_int], ctypes.c_int)})


def torch_lse_argmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: ``logsumexp`` (float64) and the first index of the maximum per row of ``x`` [T, V]."""
    return torch.logsumexp(x.double(), dim=-1), x.max(-1).indices


def row_lse_argmax(x: torch.Tensor, threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Native :func:`torch_lse_argmax` of ``x`` [T, V] (float32, CPU, unit column stride), or None."""
    if x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu" or x.stride(1) != 1 or x.shape[1] == 0:
        return None
    if x.requires_grad:
        return None
    lib = _library()
    if lib is None:
        return None
    rows, vocab = x.shape
    lse = torch.empty(rows, dtype=torch.float64)
    argmax = torch.empty(rows, dtype=torch.int64)
    if threads is None:
        threads = torch.get_num_threads() if x.numel() >= MIN_PARALLEL_ELEMENTS else 1
    done = lib.bs_row_lse_argmax(x.data_ptr(), rows, vocab, x.stride(0), lse.data_ptr(), argmax.data_ptr(),
                                 max(1, min(threads, rows)))
    return (lse, argmax) if done == 0 else None


def lse_argmax(x: torch.Tensor, chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`row_lse_argmax` where it applies, else :func:`torch_lse_argmax` on ``chunk`` rows at a time
    (its float64 copy stays cache-sized); the same values to float rounding, on ``x``'s device."""
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}")
    got = row_lse_argmax(x)
    if got is not None:
        return got
    parts = [torch_lse_argmax(x[start:start + chunk]) for start in range(0, x.shape[0], chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
