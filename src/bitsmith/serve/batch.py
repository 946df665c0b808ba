"""One forward for many sequences at once: the server's continuous-batching primitive.

Every request owns a :class:`~bitsmith.infer.lean.LeanRunner` (its own KV cache, its own position).
:func:`ragged_step` appends a list of tokens to each runner in one forward: one token for a decoding
sequence, a slice of its prompt for one being prefilled, so decode steps and prompt chunks share one
pass over the weights (chunked prefill, as vLLM and llama.cpp's server schedule it):

- the linears (q/k/v, o, gate/up, down, head) run once on the ``[N, hidden]`` activation of all rows,
  so each packed weight is read once for the step: the native small-batch gemv up to ``GEMV_MAX_ROWS``
  rows, slices of it up to ``SLICED_MAX_ROWS`` (measured faster than dequantize-then-BLAS at 16 rows),
  one blocked dequantize-and-BLAS call above (a prompt chunk);
- attention runs per sequence, each sequence's rows against its own cache ``[0, pos + n)`` with the
  causal (and sliding-window) mask: the caches have different lengths, and the loop reads exactly the
  cached positions, where a padded batch would read (and mask) up to the longest one for every sequence;
- rotary positions, cache writes and sliding windows are per row;
- the head runs only on the rows whose logits are wanted (each sequence's last row, or all of its rows).

With one runner the runner's own forward is used (the fused native decode for one token), so a lone
client decodes exactly as ``bitsmith generate`` does. :func:`decode_step` is the one-token-each case.
Both are checked against per-runner forwards on random inputs (tests/serve/test_batch.py).

Models the batched step does not reproduce (attention logit softcapping) run sequence by sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bitsmith.infer.lean import LeanRunner
from bitsmith.kernels.cpu import GEMV_MAX_ROWS

__all__ = ["SLICED_MAX_ROWS", "batchable", "decode_step", "ragged_step", "rotate"]

SLICED_MAX_ROWS = 2 * GEMV_MAX_ROWS  # up to here gemv slices beat dequantize-then-BLAS (see _rows)


def rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotary embedding x * cos + swap_halves(x) * sin; ``signed_sin`` has its first half negated
    (the lean plan's tables). x [N, H, D], cos/sin [N, 1, D]."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, swapped, signed_sin)


def batchable(runner: LeanRunner) -> bool:
    """Whether the batched step reproduces this runner's model (no attention logit softcapping)."""
    return all(layer.softcap is None for layer in runner.plan.layers)


def _rows(fn: Callable[[Tensor], Any], x: Tensor) -> Any:
    """``fn`` (a linear, or a joined one returning a tuple) over x [N, in]. The native gemv multiplies
    up to GEMV_MAX_ROWS rows in one pass over the packed codes; up to SLICED_MAX_ROWS rows, slices of
    that measured faster per token than one dequantize-and-BLAS call (16 rows: 646 vs 935 ms per decode
    step, bench/results/serve/README.md); more rows (a prompt chunk rides along) go to BLAS at once."""
    if x.shape[0] <= GEMV_MAX_ROWS or x.shape[0] > SLICED_MAX_ROWS:
        return fn(x)
    parts = [fn(x[i : i + GEMV_MAX_ROWS]) for i in range(0, x.shape[0], GEMV_MAX_ROWS)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def _attend_one(runner: LeanRunner, i: int, q: Tensor, pos: int) -> Tensor:
    """One query q [H, D] at ``pos`` against this runner's layer-``i`` cache -> [1, H*D]."""
    layer = runner.plan.layers[i]
    lo = 0 if layer.window is None else max(0, pos + 1 - layer.window)
    keys = runner.keys[i][:, lo : pos + 1].to(q.dtype)  # [KV, S, D]
    values = runner.values[i][:, lo : pos + 1].to(q.dtype)
    rep = layer.heads // layer.kv_heads
    qg = q.view(layer.kv_heads, rep, layer.head_dim)  # grouped heads: no GQA copy of the cache
    scores = torch.baddbmm(qg.new_empty(()), qg, keys.transpose(1, 2), beta=0.0, alpha=layer.scaling)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # [KV, rep, S]
    return torch.bmm(probs, values).reshape(1, layer.heads * layer.head_dim)


def _attend_rows(runner: LeanRunner, i: int, q: Tensor, start: int) -> Tensor:
    """Queries q [n, H, D] at positions [start, start + n) against the layer-``i`` cache [0, start + n)
    with the causal mask (and the layer's sliding window) -> [n, H*D]."""
    n = q.shape[0]
    if n == 1:
        return _attend_one(runner, i, q[0], start)
    layer = runner.plan.layers[i]
    stop = start + n
    keys = runner.keys[i][None, :, :stop].to(q.dtype)  # [1, KV, S, D]
    values = runner.values[i][None, :, :stop].to(q.dtype)
    qpos = torch.arange(start, stop, device=q.device)[:, None]
    kpos = torch.arange(0, stop, device=q.device)[None]
    mask = kpos <= qpos  # [n, S]
    if layer.window is not None:
        mask = mask & (kpos > qpos - layer.window)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys, values, attn_mask=mask, scale=layer.scaling,
        enable_gqa=layer.kv_heads != layer.heads)[0]  # [H, n, D]
    return out.transpose(0, 1).reshape(n, layer.heads * layer.head_dim)


def _check(runners: Sequence[LeanRunner], tokens: Sequence[Sequence[int]]) -> None:
    if len(runners) != len(tokens) or not runners:
        raise ValueError(f"a batched step needs one token list per runner, got {len(tokens)} for {len(runners)} runners")
    plan = runners[0].plan
    if any(r.plan is not plan for r in runners):
        raise ValueError("a batched step batches runners of one model only")
    for r, ids in zip(runners, tokens):
        if not len(ids):
            raise ValueError("every runner in a batched step needs at least one token")
        if r.pos + len(ids) > r.max_len:
            raise ValueError(f"the KV cache holds {r.max_len} positions; {r.pos + len(ids)} were asked for")


def ragged_step(runners: Sequence[LeanRunner], tokens: Sequence[Sequence[int]],
                all_rows: Sequence[bool] | None = None) -> list[Tensor]:
    """Append ``tokens[b]`` to runner b at its next positions, for every b, in one forward. Returns per
    runner the logits of its last new position [V], or of all its new positions [n_b, V] where
    ``all_rows[b]``. All runners must run the same model (one plan)."""
    _check(runners, tokens)
    want = [bool(a) for a in all_rows] if all_rows is not None else [False] * len(runners)
    if len(want) != len(runners):
        raise ValueError(f"all_rows has {len(want)} entries for {len(runners)} runners")
    if len(runners) == 1 or not batchable(runners[0]):
        return [r.forward(list(ids), all_logits=a) for r, ids, a in zip(runners, tokens, want)]
    h = _layers(runners, tokens)
    plan = runners[0].plan
    keep, offsets, off = [], [], 0
    for ids, a in zip(tokens, want):
        rows = range(off, off + len(ids)) if a else range(off + len(ids) - 1, off + len(ids))
        offsets.append((len(keep), len(keep) + len(rows)))
        keep.extend(rows)
        off += len(ids)
    logits = plan.head(plan.final_norm(h[keep]))  # one call: the (often float) head is read once
    if plan.final_softcap:
        logits = torch.tanh(logits / plan.final_softcap) * plan.final_softcap
    return [logits[lo:hi] if a else logits[lo] for (lo, hi), a in zip(offsets, want)]


def _layers(runners: Sequence[LeanRunner], tokens: Sequence[Sequence[int]]) -> Tensor:
    """The decoder layers over all rows (caches written, positions advanced) -> hidden [N, hidden]."""
    plan = runners[0].plan
    counts = [len(ids) for ids in tokens]
    n = sum(counts)
    starts = [r.pos for r in runners]
    positions = [p + j for p, c in zip(starts, counts) for j in range(c)]
    tables = plan.rope_tables(max(positions) + 1)
    where = torch.tensor(positions, dtype=torch.long, device=plan.device)
    flat = [t for ids in tokens for t in ids]
    h = plan.embed(torch.tensor([flat], dtype=torch.long, device=plan.device))[0].to(plan.dtype)  # [N, hidden]
    for i, layer in enumerate(plan.layers):
        x = layer.in_norm(h)
        q, k, v = _rows(layer.qkv, x)
        q = q.view(n, layer.heads, layer.head_dim)
        k = k.view(n, layer.kv_heads, layer.head_dim)
        v = v.view(n, layer.kv_heads, layer.head_dim)
        if layer.q_norm is not None:
            q = layer.q_norm(q)
        if layer.k_norm is not None:
            k = layer.k_norm(k)
        cos, sin = tables[layer.rope]
        cos, sin = cos[where][:, None], sin[where][:, None]  # [N, 1, D]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        outs, off = [], 0
        for r, p, c in zip(runners, starts, counts):
            r.keys[i][:, p : p + c] = k[off : off + c].transpose(0, 1)
            r.values[i][:, p : p + c] = v[off : off + c].transpose(0, 1)
            outs.append(_attend_rows(r, i, q[off : off + c], p))
            off += c
        a = _rows(layer.o, torch.cat(outs))  # [N, hidden]
        if layer.post_attn_norm is not None:
            a = layer.post_attn_norm(a)
        h = h + a
        x = layer.pre_mlp_norm(h)
        gate, up = _rows(layer.gate_up, x)
        m = _rows(layer.down, layer.act(gate) * up)
        if layer.post_mlp_norm is not None:
            m = layer.post_mlp_norm(m)
        h = h + m
    for r, c in zip(runners, counts):
        r.pos += c
    return h


def decode_step(runners: Sequence[LeanRunner], ids: Sequence[int]) -> Tensor:
    """Append token ``ids[b]`` to runner b at its next position, for every b, and return the logits
    [B, V] of those positions. All runners must run the same model (one plan)."""
    if len(runners) != len(ids) or not runners:
        raise ValueError(f"decode_step needs one id per runner, got {len(ids)} ids for {len(runners)} runners")
    return torch.stack(ragged_step(runners, [[t] for t in ids]))
