"""Causal attention of a prompt slice on the native path (csrc/attn_prefill.cpp), for the lean runner's prefill.

torch's CPU flash attention takes keys in blocks of 512, so a 512-token causal prompt computes every score
of the square; the native kernel scores each block of 32 query rows only against the keys up to its last
row (per layer at T = 512: SmolLM2-135M 3.4 -> 1.6 ms, Qwen2.5-Coder-1.5B 8.3 -> 3.6 ms; session 22 in
bench/results/speed/README.md). :func:`causal_prefill` returns None where it does not apply (no native
library or AVX-512, head sizes not whole 16-float vectors, a cache that is neither float32 nor fp16,
queries that are not float32) and the caller keeps torch's ``scaled_dot_product_attention``, the oracle
the tests hold it to.
"""

from __future__ import annotations

import ctypes

import torch

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def _library() -> ctypes.CDLL | None:
    from bitsmith.kernels.build import declared_library

    return declared_library({
        "bs_attn_prefill_takes": ([_I64], _I64),
        "bs_attn_prefill": ([_PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_float, _PTR, _I64], None),
    })


def causal_prefill(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scaling: float,
                   threads: int | None = None) -> torch.Tensor | None:
    """[T, H * D]: query rows ``q`` [H, T, D] at positions [start, start + T) attending causally to the cache
    ``keys``/``values`` [KV, max_len, D] (positions [0, start + T) filled), or None (see the module)."""
    if q.dim() != 3 or keys.dim() != 3 or keys.shape != values.shape or q.dtype != torch.float32:
        return None
    heads, t, dim = q.shape
    kv_heads, max_len, kdim = keys.shape
    if kdim != dim or heads % kv_heads or start + t > max_len or keys.dtype not in (torch.float16, torch.float32):
        return None
    if values.dtype != keys.dtype or q.device.type != "cpu" or keys.device.type != "cpu" or q.requires_grad:
        return None
    lib = _library()
    if lib is None or not lib.bs_attn_prefill_takes(dim):
        return None
    q, keys, values = q.contiguous(), keys.contiguous(), values.contiguous()
    out = torch.empty(t, heads * dim, dtype=torch.float32)
    lib.bs_attn_prefill(q.data_ptr(), keys.data_ptr(), values.data_ptr(), int(keys.dtype == torch.float16), heads,
                        kv_heads, t, start, dim, max_len, float(scaling), out.data_ptr(),
                        threads or torch.get_num_threads())
    return out
