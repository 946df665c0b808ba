"""Causal self-attention of the calibration forwards on the native kernel (kernels.attention).

The layer-wise pipeline runs every block's Hugging Face modules over 128 x 512 calibration tokens in
bfloat16, one batch of 8 sequences per thread. Their attention is transformers' ``sdpa``, i.e. torch's
CPU flash attention, which on a CPU without AMX multiplies bfloat16 through float32 GEMM kernels and,
taking keys in blocks of 512, computes the whole square of a causal 512-token window. The native
prefill kernel (csrc/attn_prefill.cpp) scores each block of 32 query rows only against the keys up to
its last row. :func:`calibration_attention` points a model's config at :func:`attention_forward` for the
duration of a ``with``; that function takes the calls it can do exactly and hands every other one to
transformers' own ``sdpa`` function unchanged.

Exactness: the inputs are bfloat16 values, widened to float32 (exact), so the scores, the softmax and
the weighted sum are float32 computations in another summation order than torch's, and the result is
rounded to the inputs' dtype as sdpa's is (held to sdpa in tests/pipeline/test_calibration_attention.py).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

NAME = "bitsmith_calibration"
log = logging.getLogger(__name__)


def _sdpa() -> Any:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _plain_causal(module: nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: Any, dropout: float,
                  kwargs: dict) -> bool:
    """Whether this call is a plain causal self-attention over a whole window (what the kernel does)."""
    if attention_mask is not None or dropout or not getattr(module, "is_causal", True):
        return False
    if kwargs.get("is_causal") is False or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        return False
    window = kwargs.get("sliding_window")
    if window is not None and window < key.shape[2]:
        return False
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:  # attention sinks (gpt-oss)
        return False
    return (query.dim() == 4 and query.shape[2] == key.shape[2] and query.shape[2] > 1 and query.device.type == "cpu"
            and not query.requires_grad and query.shape[1] % key.shape[1] == 0)


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query [B, H, T, D], key/value [B, KV, T, D] -> ([B, T, H, D], None)."""
    from bitsmith.kernels.attention import causal_prefill

    if _plain_causal(module, query, key, attention_mask, dropout, kwargs):
        batch, heads, tokens, dim = query.shape
        scale = float(scaling) if scaling is not None else dim ** -0.5
        rows = []
        for b in range(batch):
            out = causal_prefill(query[b].float(), key[b].float(), value[b].float(), 0, scale,
                                 threads=torch.get_num_threads())
            if out is None:  # the kernel does not take this shape or CPU: all of it on sdpa
                rows = None
                break
            rows.append(out.to(query.dtype))
        if rows is not None:
            return torch.stack(rows).view(batch, tokens, heads, dim), None
    return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention_forward)


@contextmanager
def calibration_attention(config: Any, enabled: bool = True) -> Iterator[None]:
    """Within the ``with``, modules built from ``config`` whose attention is ``sdpa`` dispatch to
    :func:`attention_forward`; the previous setting comes back after. Other implementations (eager,
    flex) are left as they are, and so is everything when ``enabled`` is False."""
    before = getattr(config, "_attn_implementation", None)
    if not enabled or before != "sdpa":
        yield
        return
    try:
        _register()
        config._attn_implementation = NAME
    except Exception as exc:  # a transformers without the interface, or one that refuses the name: sdpa as before
        log.info("calibration forwards keep transformers' sdpa attention (%s: %s)", type(exc).__name__, exc)
        config._attn_implementation = before
        yield
        return
    try:
        yield
    finally:
        config._attn_implementation = before
