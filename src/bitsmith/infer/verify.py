"""The fused verify step of speculative decoding: the target checks the draft's ``k`` tokens (plus the
token before them) in one native call (csrc/verify.cpp ``bs_verify_step``), each of the ``k + 1`` rows'
logits bit for bit what plain decoding's one-token fused step (csrc/decode.cpp) computes at that
position, while every weight row is read once for all of them.

Why it exists: plain decoding's default arithmetic rounds activations to int8 per 32-block before each
matrix product, and a verify through the torch lean path rounds at slightly different values (its norms
and attention sum in another order), so greedy speculative output could differ from plain decoding at
near-ties (bench/results/speculative, session 9: 11/20 prompts identical). Here the whole layer stack
repeats the one-token step's float arithmetic around int8 matrix products whose rows equal the one-row
decode's (csrc/verify_rows.cpp), so greedy speculative decoding emits plain decoding's tokens at plain
decoding's fast default, not only with ``BITSMITH_INT8_DECODE=0``.

Taken when the target runner decodes with the fused step (:mod:`bitsmith.infer.fused`), its head runs in
that step (a native-kernel quantized head, as bitsmith's default head) and its kernels use int8 activations;
otherwise :func:`fused_verifier` returns None and the caller verifies through the runner's own batched
forward (the exact float small-batch path for ``int8_decode=False``, csrc/smallbatch.cpp).
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import torch
from torch import Tensor

from bitsmith.infer.fused import fused_decoder

__all__ = ["FusedVerifier", "fused_verifier"]

log = logging.getLogger(__name__)

_P, _I = ctypes.c_void_p, ctypes.c_int64


class FusedVerifier:
    """``verifier(runner, ids)``: the runner's logits [T, V] for ``ids`` at positions ``runner.pos ..``,
    the cache rows written and ``runner.pos`` advanced, as T calls of ``runner([id])`` would leave them."""

    def __init__(self, decoder: Any) -> None:
        self.decoder = decoder
        self.lib = decoder.lib
        self.max_rows = int(self.lib.bs_verify_max_rows())

    def __call__(self, runner: Any, ids: list[int]) -> Tensor:
        dec, plan = self.decoder, self.decoder.plan
        t, pos = len(ids), runner.pos
        if not 1 <= t <= self.max_rows:
            raise ValueError(f"the verify step takes 1 to {self.max_rows} tokens, got {t}")
        if pos + t > runner.max_len:
            raise ValueError(f"the KV cache holds {runner.max_len} positions; {pos + t} were asked for")
        with torch.no_grad():
            h = plan.embed(torch.as_tensor(ids, dtype=torch.long)[None])[0].to(torch.float32).contiguous()
            logits = torch.empty(t, dec.vocab, dtype=torch.float32)
            threads = dec.threads or torch.get_num_threads()
            rc = self.lib.bs_verify_step(ctypes.addressof(dec.layers), len(dec.layers), h.data_ptr(), pos, t, threads,
                                         int(dec.int8_decode), ctypes.addressof(dec.head), logits.data_ptr())
        if rc != 0:
            raise RuntimeError(f"bs_verify_step refused {t} rows at position {pos}")
        runner.pos = pos + t
        if plan.final_softcap:
            logits = torch.tanh(logits / plan.final_softcap) * plan.final_softcap
        return logits


def _declare(lib: Any) -> bool:
    if not hasattr(lib, "bs_verify_step"):
        return False
    lib.bs_verify_step.argtypes = [_P, _I, _P, _I, _I, _I, _I, _P, _P]
    lib.bs_verify_step.restype = _I
    lib.bs_verify_max_rows.argtypes = []
    lib.bs_verify_max_rows.restype = _I
    return True


def fused_verifier(runner: Any) -> FusedVerifier | None:
    """The fused verify for a target runner (:class:`bitsmith.infer.lean.LeanRunner`), or None when its
    plain decoding does not run the fused int8 step with the head in it (module docstring)."""
    # The runner's own choice of decode path (RuntimeOptions.fused_decode, the plan's reason) is its
    # `_fused` decoder: verify as it decodes, never on a path plain decoding does not take.
    if getattr(runner, "_fused", None) is None:
        return None
    decoder = fused_decoder(runner)  # fresh structs over the same cache and weights
    if decoder is None or decoder.head is None or not decoder.int8_decode or not _declare(decoder.lib):
        why = "no fused step" if decoder is None else "the head runs in torch" if decoder.head is None else \
            "exact float decode (the small-batch verify is exact there)" if not decoder.int8_decode else \
            "the native library has no bs_verify_step"
        log.info("speculative verify through the batched lean forward: %s", why)
        return None
    return FusedVerifier(decoder)
