"""A lean forward for decoder-only transformers: the loaded model's own submodules, a preallocated
KV cache, and as little Python per token as the architecture allows.

The Hugging Face forward spends most of a small model's decode step outside the matmuls: mask
construction, cache bookkeeping, output dataclasses, hooks and keyword plumbing. :class:`LeanRunner`
keeps only the arithmetic. It is generic, with no per-model classes: what differs between the
architectures bitsmith supports is read from the config and the modules as data and checked once.

- embedding: the model's own embedding module (``QuantEmbedding``, Gemma's scaled embedding, ...);
- RMS norms: weight and epsilon are read off each norm, and whether it multiplies by ``w`` (Llama,
  Qwen2) or ``1 + w`` (Gemma) is decided by probing the module on a random input, so a norm that is
  neither is refused rather than guessed;
- attention: ``q/k/v/o_proj`` (``QuantLinear`` for quantized checkpoints, biases included), optional
  ``q_norm``/``k_norm``, the module's ``scaling`` (Gemma's ``query_pre_attn_scalar``), its
  ``sliding_window`` (local layers attend to the last ``window`` positions), optional logit
  softcapping; rotary cos/sin come from the model's rotary module(s) once, for every position the
  cache can hold (Gemma 3's local and global layers each get their own table);
- layer wiring: pre-norm (Llama, Qwen2: norm -> block -> residual) or sandwich (Gemma 3: a norm
  before and after attention and the MLP), chosen by the norms the layer has;
- MLP: ``down(act(gate(x)) * up(x))`` with the module's own activation;
- head: the model's output embedding, then ``final_logit_softcapping`` if the config sets one.

The KV cache is one key and one value tensor per layer, ``[kv_heads, max_len, head_dim]``,
allocated once for prompt + new tokens. Prefill is one pass over the prompt (causal mask with the
sliding window applied where a layer has one); decode is one position per call. When every layer is
native-kernel quantized, float32 and on the CPU, a decode step is one native call over all layers
(:mod:`bitsmith.infer.fused`) writing the same cache; ``RuntimeOptions(fused_decode=False)`` keeps it in
torch. The plan itself (what is read from the model, and checked) is :mod:`bitsmith.infer.plan`.

Anything outside this (an unknown architecture, rotary scaling that depends on the sequence length,
hooks on the modules such as offloaded blocks, bidirectional attention) makes :func:`lean_runner`
return ``None`` with the reason logged, and generation uses the Hugging Face forward.

Everything is plain torch on the model's device, so the same code runs on CUDA (through
``QuantLinear``'s dequantize-then-matmul there); only the CPU is tested.
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitsmith.infer.fused import fused_decoder
from bitsmith.infer.plan import SUPPORTED_MODEL_TYPES, Layer, LeanUnsupported, Plan, lean_plan
from bitsmith.kernels.alloc import heap_reuse
from bitsmith.kernels.attention import causal_prefill
from bitsmith.runtime.options import RuntimeOptions

__all__ = ["LeanRunner", "LeanUnsupported", "lean_plan", "lean_runner", "SUPPORTED_MODEL_TYPES"]

log = logging.getLogger(__name__)

DEFAULT_OPTIONS = RuntimeOptions()


_PLANS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], Plan | str]]" = weakref.WeakKeyDictionary()


def _identity(model: nn.Module) -> tuple[int, ...]:
    """Which modules, tensors, kernels and hooks the model holds now, and where: a cached plan is stale once
    any changes (``model.to("cuda")`` keeps the parameter objects but moves their storage and kernels)."""
    modules = list(model.modules())
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)
    kernels = (id(getattr(m, "_kernel", None)) for m in modules)
    return (hooks, *(id(m) for m in modules), *kernels, *(x for p in model.parameters() for x in (id(p), p.data_ptr())))


def _release_freed_memory() -> None:
    """glibc keeps freed heap pages mapped; malloc_trim returns them so RSS shows what is live.

    Also fixes glibc's mmap threshold at 128 KiB (once; its default, before glibc raises it
    adaptively): otherwise, after the loader frees its large buffers, every later per-token buffer
    (logits, activations) up to 32 MB is served from the heap and its pages stay resident after
    free, which showed as 13-30 MB of RSS growth while generating SmolLM2 (bench/speed.py)."""
    global _MALLOC_TUNED
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if not _MALLOC_TUNED:
            libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
            _MALLOC_TUNED = True
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


_MALLOC_TUNED = False


def lean_runner(model: nn.Module, max_len: int, options: RuntimeOptions = DEFAULT_OPTIONS) -> LeanRunner | None:
    """A runner with a cache for ``max_len`` positions, or None (reason logged once) when the model
    is outside the lean path. The plan is read once per model and reused; ``options`` choose the KV
    cache dtype and whether decode takes the fused native step."""
    key = _identity(model)
    cached = _PLANS.get(model)
    plan = cached[1] if cached is not None and cached[0] == key else None
    if plan is None:
        try:
            with torch.no_grad():
                plan = lean_plan(model)
            _release_freed_memory()  # fusion replaced many buffers: hand the freed pages back
        except LeanUnsupported as err:
            plan = str(err)
            log.info("lean inference path not used for %s: %s; using the Hugging Face forward", type(model).__name__, err)
        _PLANS[model] = (key, plan)
    if isinstance(plan, str):
        return None
    return LeanRunner(plan, max_len, options)


# ----------------------------------------------------------------------------- the runner


def _rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin; x [..., T, D], cos/sin [T, D], the sin table's first half
    already negated (so rotate_half is a plain swap of the halves)."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, swapped, signed_sin)


# Prompt tokens per prefill slice (see LeanRunner.forward). Session 22 raised it to 512 when a second slice
# attended through an explicit mask over all keys (91 ms of SmolLM2-135M's 512-token prefill); the attention
# kernel (kernels.attention) now handles a slice's causal block itself. Session 24, 256 again, for memory: a
# slice's activations and their heap fragments are most of what RSS grows by while generating, and SmolLM2-135M
# w4g128's growth over a 512-token prompt went 44 -> 34 MiB (85 MB packed), for a prefill 2.4% slower (Qwen2.5-
# Coder-1.5B: 3.4%; 7 and 3 alternating rounds in one process). Scoring (all_logits) never slices.
PREFILL_CHUNK = 256


def kv_cache_dtype(dtype: torch.dtype, choice: str = "fp16") -> torch.dtype:
    """The KV cache's dtype for a model computing in ``dtype``: float16 for float32 models unless
    ``choice`` (``RuntimeOptions.kv_cache``) is ``fp32``. Decode reads the whole cache per token (at 512
    positions about a fifth of SmolLM2's bytes per token); half of it in fp16, rounded once when written,
    as llama.cpp's default f16 cache. Generation only: scoring (eval.perplexity.window_logits) asks for
    fp32. Other model dtypes keep theirs."""
    return torch.float16 if dtype == torch.float32 and choice == "fp16" else dtype


class LeanRunner:
    """Prefill and decode over a preallocated KV cache. ``forward(ids)`` appends ``ids`` [T] at the
    next positions and returns the last position's logits [V] (or all T with ``all_logits``).
    ``options``: the cache dtype (``kv_cache``) and whether decode takes the fused step (``fused_decode``);
    the matmuls compute as the model's kernels were prepared at load time."""

    def __init__(self, plan: Plan, max_len: int, options: RuntimeOptions = DEFAULT_OPTIONS) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.plan = plan
        self.max_len = max_len
        self.tables = plan.rope_tables(max_len)
        kv = kv_cache_dtype(plan.dtype, options.kv_cache)
        self.keys = [torch.zeros(l.kv_heads, max_len, l.head_dim, dtype=kv, device=plan.device) for l in plan.layers]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.pos = 0
        # one native call per decoded token, or None (switched off, or the reason logged)
        self._fused = fused_decoder(self) if options.fused_decode else None

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def reset(self) -> None:
        self.pos = 0

    def _attend(self, layer: Layer, i: int, q: Tensor, start: int, stop: int) -> Tensor:
        """q [H, T, D] at positions [start, stop) against the cache [0, stop) -> [T, H*D]."""
        t = stop - start
        if t > 1 and layer.window is None and layer.softcap is None:
            out = causal_prefill(q, self.keys[i], self.values[i], start, layer.scaling)  # None: torch's path below
            if out is not None:
                return out
        lo = 0
        if layer.window is not None and t == 1:
            lo = max(0, stop - layer.window)
        keys = self.keys[i][:, lo:stop].to(q.dtype)  # [KV, S, D]; a copy when the cache is fp16
        values = self.values[i][:, lo:stop].to(q.dtype)
        mask = None
        causal = False
        if t > 1:
            qpos = torch.arange(start, stop, device=q.device)[:, None]
            kpos = torch.arange(lo, stop, device=q.device)[None]
            if layer.window is None and start == 0:
                causal = True
            else:
                mask = kpos <= qpos  # [T, S]
                if layer.window is not None:
                    mask = mask & (kpos > qpos - layer.window)
        if t == 1 and layer.softcap is None:
            # one query: grouped heads as [KV, rep, D] @ [KV, D, S]; three small ops, no GQA copies
            rep = layer.heads // layer.kv_heads
            qg = q.view(layer.kv_heads, rep, layer.head_dim)
            scores = torch.baddbmm(qg.new_empty(()), qg, keys.transpose(1, 2), beta=0.0, alpha=layer.scaling)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # [KV, rep, S]
            return torch.bmm(probs, values).view(1, layer.heads * layer.head_dim)
        if layer.softcap is None:
            out = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask,
                                                 is_causal=causal, scale=layer.scaling,
                                                 enable_gqa=layer.kv_heads != layer.heads)[0]  # [H, T, D]
        else:
            rep = layer.heads // layer.kv_heads
            keys = keys.repeat_interleave(rep, 0)
            values = values.repeat_interleave(rep, 0)
            scores = torch.matmul(q, keys.transpose(1, 2)) * layer.scaling  # [H, T, S]
            scores = torch.tanh(scores / layer.softcap) * layer.softcap
            if causal:
                mask = torch.ones(t, keys.shape[1], dtype=torch.bool, device=q.device).tril()
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), values)
        return out.transpose(0, 1).reshape(t, layer.heads * layer.head_dim)

    def forward(self, ids: Tensor | list[int], all_logits: bool = False) -> Tensor:
        plan = self.plan
        ids = torch.as_tensor(ids, dtype=torch.long, device=plan.device).reshape(-1)  # [T]
        t = ids.shape[0]
        start, stop = self.pos, self.pos + t
        if t == 0:
            raise ValueError("forward needs at least one token")
        if stop > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {stop} were asked for")
        if t == 1 and self._fused is not None:
            logits = self._fused(ids, start)
            self.pos = stop
            return logits[None] if all_logits else logits
        if t == 1:
            return self._layers(ids, start, stop, all_logits)
        # A batched forward: activations from reused heap pages, not a fresh mmap per op (kernels.alloc)
        with heap_reuse():
            if t > PREFILL_CHUNK and not all_logits:
                # A long prompt in slices: the activations, attention scores and dequantized weight blocks of
                # one slice at a time (peak memory), at the cost of dequantizing the weights once per slice.
                for lo in range(0, t - PREFILL_CHUNK, PREFILL_CHUNK):
                    self.forward(ids[lo : lo + PREFILL_CHUNK])
                return self.forward(ids[(t - 1) // PREFILL_CHUNK * PREFILL_CHUNK :])
            return self._layers(ids, start, stop, all_logits)

    __call__ = forward

    def _layers(self, ids: Tensor, start: int, stop: int, all_logits: bool) -> Tensor:
        """The decoder over ``ids`` [T] at positions [start, stop): K/V into the cache, logits out."""
        plan = self.plan
        t = stop - start
        h = plan.embed(ids[None])[0].to(plan.dtype)  # [T, hidden]
        for i, layer in enumerate(plan.layers):
            x = layer.in_norm(h)
            q, k, v = layer.qkv(x)
            q = q.view(t, layer.heads, layer.head_dim)
            k = k.view(t, layer.kv_heads, layer.head_dim)
            v = v.view(t, layer.kv_heads, layer.head_dim)
            if layer.q_norm is not None:
                q = layer.q_norm(q)
            if layer.k_norm is not None:
                k = layer.k_norm(k)
            cos, sin = self.tables[layer.rope]
            cos, sin = cos[start:stop], sin[start:stop]  # [T, D]
            q = _rotate(q.transpose(0, 1), cos, sin)  # [H, T, D]
            self.keys[i][:, start:stop] = _rotate(k.transpose(0, 1), cos, sin)
            self.values[i][:, start:stop] = v.transpose(0, 1)
            a = layer.o(self._attend(layer, i, q, start, stop))
            if layer.post_attn_norm is not None:
                a = layer.post_attn_norm(a)
            h = h + a
            x = layer.pre_mlp_norm(h)
            gate, up = layer.gate_up(x)
            m = layer.down(layer.act(gate) * up)
            if layer.post_mlp_norm is not None:
                m = layer.post_mlp_norm(m)
            h = h + m
        self.pos = stop
        if not all_logits:
            h = h[-1:]
        logits = plan.head(plan.final_norm(h))
        if plan.final_softcap:
            logits = torch.tanh(logits / plan.final_softcap) * plan.final_softcap
        return logits if all_logits else logits[0]
