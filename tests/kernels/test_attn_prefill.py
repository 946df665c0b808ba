"""Causal prefill attention (csrc/attn_prefill.cpp via kernels.attention.causal_prefill) against a float64
softmax(q k^T) v on fresh random inputs: grouped heads, head sizes 16-128, prompt slices that start
mid-cache and end off the 32-key tiles, float32 and fp16 caches."""

from __future__ import annotations

import itertools

import pytest
import torch

from bitsmith.kernels.attention import causal_prefill
from bitsmith.kernels.build import native_library

native = native_library()
takes = native is not None and hasattr(native, "bs_attn_prefill_takes") and bool(native.bs_attn_prefill_takes(64))
needs_kernel = pytest.mark.skipif(not takes, reason="this build has no prefill attention kernel (needs AVX-512)")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread per test


def oracle(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scaling: float) -> torch.Tensor:
    heads, t, dim = q.shape
    rep = heads // keys.shape[0]
    k = keys[:, : start + t].double().repeat_interleave(rep, 0)
    v = values[:, : start + t].double().repeat_interleave(rep, 0)
    scores = q.double() @ k.transpose(1, 2) * scaling  # [H, T, S]
    qpos, kpos = torch.arange(start, start + t)[:, None], torch.arange(start + t)[None]
    scores = scores.masked_fill(kpos > qpos, float("-inf"))
    return (torch.softmax(scores, -1) @ v).transpose(0, 1).reshape(t, heads * dim)


@needs_kernel
@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (12, 2, 128), (4, 4, 32), (6, 2, 80), (2, 1, 16)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_causal_prefill_matches_float64(heads: int, kv_heads: int, dim: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(heads * 100 + dim)
    for start, t in ((0, 300), (0, 37), (100, 70), (64, 64), (5, 1), (0, 2)):
        max_len = start + t + 13  # cache rows past the slice hold junk the kernel must not read
        keys = (torch.randn(kv_heads, max_len, dim, generator=gen) * 2).to(dtype)
        values = torch.randn(kv_heads, max_len, dim, generator=gen).to(dtype)
        q = torch.randn(heads, t, dim, generator=gen) * 2
        want = oracle(q, keys, values, start, dim**-0.5)
        got = causal_prefill(q, keys, values, start, dim**-0.5)
        assert got is not None and got.shape == (t, heads * dim)
        assert float((got.double() - want).abs().max() / want.abs().max()) < 2e-5, (start, t)


@needs_kernel
@pytest.mark.parametrize("offset", [-1000.0, -90.0, 5000.0])
def test_rows_of_large_scores_keep_their_softmax(offset: float) -> None:
    """Scores of thousands, as Qwen2.5's first layer has (-1,601 .. 12,381 measured): every key shares a
    large component along one direction, and the queries one of sign ``offset``, so whole rows sit far
    below (or above) zero. The kernel once took the masked tail lanes (0) into a row's maximum: rows all
    below -87 came out as a flat average (max error 1.18 on Qwen's layer 0)."""
    gen = torch.Generator().manual_seed(int(abs(offset)))
    heads, kv_heads, dim, t = 12, 2, 128, 45
    u = torch.zeros(dim)
    u[3] = 1.0
    keys = torch.randn(kv_heads, t, dim, generator=gen) + 40.0 * u
    values = torch.randn(kv_heads, t, dim, generator=gen)
    q = torch.randn(heads, t, dim, generator=gen) * 3 + offset / 40.0 * dim**0.5 * u
    want = oracle(q, keys, values, 0, dim**-0.5)
    got = causal_prefill(q, keys, values, 0, dim**-0.5)
    # float32 scores of thousands carry ~1e-4 of rounding into the weights, SDPA's as much: the bound is its
    sdpa = torch.nn.functional.scaled_dot_product_attention(q[None], keys[None], values[None], is_causal=True,
                                                            scale=dim**-0.5, enable_gqa=True)[0]
    sdpa_error = float((sdpa.transpose(0, 1).reshape(t, -1).double() - want).abs().max())
    assert float((got.double() - want).abs().max()) < 4 * sdpa_error + 1e-5


@needs_kernel
def test_threads_share_tasks_not_results() -> None:
    gen = torch.Generator().manual_seed(1)
    keys, values = torch.randn(2, 200, 64, generator=gen).half(), torch.randn(2, 200, 64, generator=gen).half()
    q = torch.randn(8, 150, 64, generator=gen)
    assert torch.equal(causal_prefill(q, keys, values, 40, 0.125, threads=1),
                       causal_prefill(q, keys, values, 40, 0.125, threads=3))


def test_inputs_the_kernel_does_not_take_are_declined() -> None:
    """None, so the lean runner keeps torch's SDPA: bf16 queries, a bf16 cache, heads not whole
    16-float vectors, a slice past the cache, heads not a multiple of the KV heads."""
    keys = torch.zeros(2, 32, 64)
    q = torch.zeros(4, 8, 64)
    assert causal_prefill(q.bfloat16(), keys, keys, 0, 1.0) is None
    assert causal_prefill(q, keys.bfloat16(), keys.bfloat16(), 0, 1.0) is None
    assert causal_prefill(torch.zeros(4, 8, 24), torch.zeros(2, 32, 24), torch.zeros(2, 32, 24), 0, 1.0) is None
    assert causal_prefill(q, keys, keys, 30, 1.0) is None
    assert causal_prefill(torch.zeros(3, 8, 64), keys, keys, 0, 1.0) is None
