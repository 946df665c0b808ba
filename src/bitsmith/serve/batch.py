"""One decode step for many sequences at once: the server's continuous-batching primitive.

Every active request owns a :class:`~bitsmith.infer.lean.LeanRunner` (its own KV cache, its own
position). :func:`decode_step` advances all of them by one token:

- the linears (q/k/v, o, gate/up, down, head) run once on a ``[B, hidden]`` activation, so each packed
  weight is read once per step for all B sequences (the native kernel's gemv takes up to
  ``GEMV_MAX_ROWS`` rows in one pass over the codes; above that it dequantizes blocks once for all);
- attention runs per sequence, each query against its own cache ``[0, pos]``: the caches have different
  lengths, and at one query per sequence the loop reads exactly the cached positions, where a padded
  batch would read (and mask) up to the longest one for every sequence;
- rotary positions, cache writes and sliding windows are per sequence.

With one sequence the runner's own step is used (the fused native decode when the model has one), so
a lone client decodes exactly as ``bitsmith generate`` does. The batched step is checked against
per-sequence runner steps on random inputs (tests/serve/test_batch.py).

Models the batched step does not reproduce (attention logit softcapping) decode sequence by sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bitsmith.infer.lean import LeanRunner
from bitsmith.kernels.cpu import GEMV_MAX_ROWS

__all__ = ["batchable", "decode_step", "rotate"]


def rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotary embedding x * cos + swap_halves(x) * sin; ``signed_sin`` has its first half negated
    (the lean plan's tables). x [B, H, D], cos/sin [B, 1, D]."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, swapped, signed_sin)


def batchable(runner: LeanRunner) -> bool:
    """Whether the batched step reproduces this runner's model (no attention logit softcapping)."""
    return all(layer.softcap is None for layer in runner.plan.layers)


def _rows(fn: Callable[[Tensor], Any], x: Tensor) -> Any:
    """``fn`` (a linear, or a joined one returning a tuple) over x [B, in] in slices of at most
    GEMV_MAX_ROWS rows: the native gemv multiplies that many rows in one pass over the packed codes,
    while more rows switch it to dequantize-then-BLAS, which measured slower per token at 16 rows
    than two gemv passes (bench/results/serve/README.md)."""
    if x.shape[0] <= GEMV_MAX_ROWS:
        return fn(x)
    parts = [fn(x[i : i + GEMV_MAX_ROWS]) for i in range(0, x.shape[0], GEMV_MAX_ROWS)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def _attend_one(runner: LeanRunner, i: int, q: Tensor, pos: int) -> Tensor:
    """One query q [H, D] at ``pos`` against this runner's layer-``i`` cache -> [H*D]."""
    layer = runner.plan.layers[i]
    lo = 0 if layer.window is None else max(0, pos + 1 - layer.window)
    keys = runner.keys[i][:, lo : pos + 1].to(q.dtype)  # [KV, S, D]
    values = runner.values[i][:, lo : pos + 1].to(q.dtype)
    rep = layer.heads // layer.kv_heads
    qg = q.view(layer.kv_heads, rep, layer.head_dim)  # grouped heads: no GQA copy of the cache
    scores = torch.baddbmm(qg.new_empty(()), qg, keys.transpose(1, 2), beta=0.0, alpha=layer.scaling)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # [KV, rep, S]
    return torch.bmm(probs, values).reshape(layer.heads * layer.head_dim)


def decode_step(runners: Sequence[LeanRunner], ids: Sequence[int]) -> Tensor:
    """Append token ``ids[b]`` to runner b at its next position, for every b, and return the logits
    [B, V] of those positions. All runners must run the same model (one plan)."""
    if len(runners) != len(ids) or not runners:
        raise ValueError(f"decode_step needs one id per runner, got {len(ids)} ids for {len(runners)} runners")
    plan = runners[0].plan
    if any(r.plan is not plan for r in runners):
        raise ValueError("decode_step batches runners of one model only")
    for r in runners:
        if r.pos + 1 > r.max_len:
            raise ValueError(f"the KV cache holds {r.max_len} positions; {r.pos + 1} were asked for")
    if len(runners) == 1 or not batchable(runners[0]):
        return torch.stack([r.forward([t]) for r, t in zip(runners, ids)])
    return _batched(runners, ids)


def _batched(runners: Sequence[LeanRunner], ids: Sequence[int]) -> Tensor:
    plan = runners[0].plan
    b = len(runners)
    positions = [r.pos for r in runners]
    tables = plan.rope_tables(max(positions) + 1)
    where = torch.tensor(positions, dtype=torch.long, device=plan.device)
    h = plan.embed(torch.tensor([list(ids)], dtype=torch.long, device=plan.device))[0].to(plan.dtype)  # [B, hidden]
    for i, layer in enumerate(plan.layers):
        x = layer.in_norm(h)
        q, k, v = _rows(layer.qkv, x)
        q = q.view(b, layer.heads, layer.head_dim)
        k = k.view(b, layer.kv_heads, layer.head_dim)
        v = v.view(b, layer.kv_heads, layer.head_dim)
        if layer.q_norm is not None:
            q = layer.q_norm(q)
        if layer.k_norm is not None:
            k = layer.k_norm(k)
        cos, sin = tables[layer.rope]
        cos, sin = cos[where][:, None], sin[where][:, None]  # [B, 1, D]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        outs = []
        for j, (r, p) in enumerate(zip(runners, positions)):
            r.keys[i][:, p] = k[j]
            r.values[i][:, p] = v[j]
            outs.append(_attend_one(r, i, q[j], p))
        a = _rows(layer.o, torch.stack(outs))  # [B, hidden]
        if layer.post_attn_norm is not None:
            a = layer.post_attn_norm(a)
        h = h + a
        x = layer.pre_mlp_norm(h)
        gate, up = _rows(layer.gate_up, x)
        m = _rows(layer.down, layer.act(gate) * up)
        if layer.post_mlp_norm is not None:
            m = layer.post_mlp_norm(m)
        h = h + m
    for r in runners:
        r.pos += 1
    logits = plan.head(plan.final_norm(h))  # [B, V]; one call: the (often float) head is read once
    if plan.final_softcap:
        logits = torch.tanh(logits / plan.final_softcap) * plan.final_softcap
    return logits
