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
(:mod:`bitsmith.infer.fused`) writing the same cache; ``$BITSMITH_FUSED_DECODE=0`` keeps it in torch.

Anything outside this (an unknown architecture, rotary scaling that depends on the sequence length,
hooks on the modules such as offloaded blocks, bidirectional attention) makes :func:`lean_runner`
return ``None`` with the reason logged, and generation uses the Hugging Face forward.

Everything is plain torch on the model's device, so the same code runs on CUDA (through
``QuantLinear``'s dequantize-then-matmul there); only the CPU is tested.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from bitsmith.models.family import FUSED_DECODE_TYPES

__all__ = ["LeanRunner", "LeanUnsupported", "lean_plan", "lean_runner", "SUPPORTED_MODEL_TYPES"]

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = FUSED_DECODE_TYPES  # the family table's fused_decode entries
_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})  # cos/sin independent of sequence length
_LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm",
                   "pre_feedforward_layernorm", "post_feedforward_layernorm"}
_ATTN_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}
_MLP_CHILDREN = {"gate_proj", "up_proj", "down_proj", "act_fn"}


class LeanUnsupported(ValueError):
    """The model is outside what the lean path reproduces exactly; the message says why."""


# ----------------------------------------------------------------------------- the static plan


@dataclass
class _Norm:
    """An RMS norm as data: y = rms_norm(x) * weight, weight already ``w`` or ``1 + w``."""

    weight: Tensor  # float32 [d]
    eps: float
    fp32: bool  # the model runs in float32: one fused F.rms_norm

    def __call__(self, x: Tensor) -> Tensor:
        if self.fp32 and x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # lower precision: normalise in float32 as the reference modules do, then scale
        return (F.rms_norm(x.float(), self.weight.shape, None, self.eps) * self.weight).to(x.dtype)


@dataclass
class _Layer:
    in_norm: _Norm
    post_attn_norm: _Norm | None  # sandwich only: norm of the attention output
    pre_mlp_norm: _Norm
    post_mlp_norm: _Norm | None  # sandwich only
    qkv: Callable[[Tensor], tuple[Tensor, ...]]  # x -> (q, k, v), one kernel call when they fuse
    o: Callable[[Tensor], Tensor]
    q_norm: _Norm | None
    k_norm: _Norm | None
    gate_up: Callable[[Tensor], tuple[Tensor, ...]]  # x -> (gate, up)
    down: Callable[[Tensor], Tensor]
    act: Callable[[Tensor], Tensor]
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    window: int | None  # attend to the last `window` positions (self included); None = all
    softcap: float | None
    rope: str  # key into the plan's rotary tables


@dataclass
class _Plan:
    """What one model's lean forward needs, read once from the model (no per-call state)."""

    model: nn.Module
    embed: nn.Module
    layers: list[_Layer]
    final_norm: _Norm
    head: nn.Module
    final_softcap: float | None
    rotary: nn.Module
    rope_arg: bool  # the rotary forward takes a layer_type argument
    dtype: torch.dtype
    device: torch.device
    hidden: int
    tables: dict[str, tuple[Tensor, Tensor]]  # rope key -> (cos, sin) [positions, head_dim]

    def rope_tables(self, length: int) -> dict[str, tuple[Tensor, Tensor]]:
        """cos/sin for positions [0, length), computed by the model's rotary module(s) and kept."""
        have = min((c.shape[0] for c, _ in self.tables.values()), default=0)
        if self.tables and have >= length:
            return self.tables
        length = max(length, 2 * have)
        positions = torch.arange(length, device=self.device)[None]  # [1, length]
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        keys = sorted({layer.rope for layer in self.layers})
        tables = {}
        for key in keys:
            cos, sin = self.rotary(probe, positions, key) if self.rope_arg else self.rotary(probe, positions)
            sin = sin[0].clone()
            sin[:, : sin.shape[1] // 2] *= -1  # rotate_half's sign folded in: x*cos + swap(x)*sin
            tables[key] = (cos[0].to(self.dtype).contiguous(), sin.to(self.dtype).contiguous())
        self.tables = tables
        return tables


def _norm_of(module: nn.Module | None, name: str, fp32: bool) -> _Norm:
    """Read an RMS norm's weight and epsilon, and probe whether it scales by w or by 1 + w."""
    if module is None:
        raise LeanUnsupported(f"{name} is missing")
    weight = getattr(module, "weight", None)
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    if not isinstance(weight, Tensor) or weight.dim() != 1 or eps is None:
        raise LeanUnsupported(f"{name} ({type(module).__name__}) is not an RMS norm with a weight and an epsilon")
    w = weight.detach().float()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, w.shape[0], generator=gen).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        ref = module(x).float()
    base = F.rms_norm(x.float(), w.shape, None, float(eps))
    for candidate in (w, 1.0 + w):
        if torch.allclose(base * candidate, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()) + 1e-6):
            return _Norm(candidate.contiguous(), float(eps), fp32)
    raise LeanUnsupported(f"{name} ({type(module).__name__}) is neither x*w nor x*(1+w) after RMS normalisation")


def _activation(act: Any) -> Callable[[Tensor], Tensor]:
    """The MLP activation; the module itself unless it is one of the fused torch functions."""
    if not callable(act):
        raise LeanUnsupported(f"MLP activation {act!r} is not callable")
    x = torch.linspace(-6, 6, 97)
    with torch.no_grad():
        y = act(x)
    for fn in (F.silu, lambda t: F.gelu(t, approximate="tanh"), F.gelu):
        if torch.allclose(fn(x), y, rtol=1e-6, atol=1e-6):
            return fn
    return act


def _linear(module: nn.Module) -> Callable[[Tensor], Tensor]:
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module.forward  # QuantLinear and other drop-ins: no hook machinery per call


def _joined(modules: list[nn.Module]) -> Callable[[Tensor], tuple[Tensor, ...]]:
    """x -> tuple(m(x) for m in modules), as one native kernel call when the modules are quantized
    linears with the same format (their packed bytes are concatenated once and shared, not copied)."""
    from bitsmith.kernels.cpu import fusable, fuse_native
    from bitsmith.nn.qlinear import QuantLinear

    kernels = [getattr(m, "_kernel", None) for m in modules]
    if all(type(m) is QuantLinear for m in modules) and fusable(kernels):
        sizes = [m.out_features for m in modules]
        biases = [m.bias for m in modules]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach().float() if b is not None else torch.zeros(n) for b, n in zip(biases, sizes)])
        return _Joined(fuse_native(kernels), bias, sizes)
    calls = [_linear(m) for m in modules]
    return lambda x: tuple(c(x) for c in calls)


class _Joined:
    """x -> the fused kernel's output (+ bias) split per module; kernel and bias kept as data for the
    fused decode step (infer/fused.py)."""

    def __init__(self, kernel: Any, bias: Tensor | None, sizes: list[int]) -> None:
        self.kernel, self.bias, self.sizes = kernel, bias, sizes

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        y = self.kernel(x)
        return (y if self.bias is None else y + self.bias).split(self.sizes, -1)


def _has_hooks(module: nn.Module) -> bool:
    return any(
        m._forward_hooks or m._forward_pre_hooks or getattr(m, "_backward_hooks", None) for m in module.modules()
    ) or bool(nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


def _text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def lean_plan(model: nn.Module) -> _Plan:
    """Read everything the lean forward needs from ``model``; raise LeanUnsupported with the reason."""
    config = _text_config(model)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LeanUnsupported(f"model type {model_type!r} is not one of {sorted(SUPPORTED_MODEL_TYPES)}")
    if getattr(config, "use_bidirectional_attention", False):
        raise LeanUnsupported("bidirectional attention")
    base = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or head is None:
        raise LeanUnsupported(f"{type(model).__name__} has no .model decoder and output embedding")
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if getattr(base, attr, None) is None:
            raise LeanUnsupported(f"the decoder has no {attr}")
    if _has_hooks(model):
        raise LeanUnsupported("modules carry forward hooks (e.g. offloaded blocks), which the lean path would skip")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    per_type = [v for v in rope.values() if isinstance(v, dict)] or [rope]  # Gemma 3: one dict per layer type
    rope_types = {p.get("rope_type", p.get("type", "default")) for p in per_type}
    if not rope_types <= _ROPE_TYPES:
        raise LeanUnsupported(f"rotary type {sorted(rope_types - _ROPE_TYPES)} depends on the sequence length")
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    fp32 = dtype == torch.float32
    rope_arg = "layer_type" in inspect.signature(base.rotary_emb.forward).parameters
    final_softcap = getattr(config, "final_logit_softcapping", None)

    layers = []
    for i, layer in enumerate(base.layers[: config.num_hidden_layers]):
        where = f"layer {i}"
        extra = {name for name, _ in layer.named_children()} - _LAYER_CHILDREN
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if extra or attn is None or mlp is None:
            raise LeanUnsupported(f"{where} has modules the lean path does not know: {sorted(extra) or 'no self_attn/mlp'}")
        extra = {name for name, _ in attn.named_children()} - _ATTN_CHILDREN
        extra |= {name for name, _ in mlp.named_children()} - _MLP_CHILDREN
        if extra:
            raise LeanUnsupported(f"{where} has attention/MLP modules the lean path does not know: {sorted(extra)}")
        if any(getattr(mlp, n, None) is None for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            raise LeanUnsupported(f"{where}: the MLP is not gate/up/down with an activation")
        head_dim = int(getattr(attn, "head_dim", 0) or config.hidden_size // config.num_attention_heads)
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        if attn.q_proj.out_features != heads * head_dim or attn.k_proj.out_features != kv_heads * head_dim:
            raise LeanUnsupported(f"{where}: q/k projections do not match {heads}/{kv_heads} heads of {head_dim}")
        sandwich = getattr(layer, "pre_feedforward_layernorm", None) is not None
        window = getattr(attn, "sliding_window", None)
        rope_key = getattr(attn, "layer_type", None) if rope_arg else "default"
        if rope_arg and rope_key is None:
            raise LeanUnsupported(f"{where}: the rotary module needs a layer type the attention does not name")
        layers.append(_Layer(
            in_norm=_norm_of(layer.input_layernorm, f"{where}.input_layernorm", fp32),
            post_attn_norm=_norm_of(layer.post_attention_layernorm, f"{where}.post_attention_layernorm", fp32) if sandwich else None,
            pre_mlp_norm=_norm_of(layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm,
                                  f"{where} pre-MLP norm", fp32),
            post_mlp_norm=_norm_of(getattr(layer, "post_feedforward_layernorm", None), f"{where}.post_feedforward_layernorm", fp32) if sandwich else None,
            qkv=_joined([attn.q_proj, attn.k_proj, attn.v_proj]), o=_linear(attn.o_proj),
            q_norm=_norm_of(attn.q_norm, f"{where}.q_norm", fp32) if getattr(attn, "q_norm", None) is not None else None,
            k_norm=_norm_of(attn.k_norm, f"{where}.k_norm", fp32) if getattr(attn, "k_norm", None) is not None else None,
            gate_up=_joined([mlp.gate_proj, mlp.up_proj]), down=_linear(mlp.down_proj), act=_activation(mlp.act_fn),
            heads=heads, kv_heads=kv_heads, head_dim=head_dim,
            scaling=float(getattr(attn, "scaling", head_dim**-0.5)),
            window=int(window) if window else None,
            softcap=getattr(attn, "attn_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None) or None,
            rope=str(rope_key),
        ))
    if not layers:
        raise LeanUnsupported("the model has no decoder layers")
    return _Plan(model=model, embed=base.embed_tokens, layers=layers, final_norm=_norm_of(base.norm, "final norm", fp32),
                 head=head, final_softcap=final_softcap, rotary=base.rotary_emb, rope_arg=rope_arg, dtype=dtype,
                 device=device, hidden=int(config.hidden_size), tables={})


_PLANS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], _Plan | str]]" = weakref.WeakKeyDictionary()


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


def lean_runner(model: nn.Module, max_len: int) -> LeanRunner | None:
    """A runner with a cache for ``max_len`` positions, or None (reason logged once) when the model
    is outside the lean path. The plan is read once per model and reused."""
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
    return LeanRunner(plan, max_len)


# ----------------------------------------------------------------------------- the runner


def _rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin; x [..., T, D], cos/sin [T, D], the sin table's first half
    already negated (so rotate_half is a plain swap of the halves)."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, swapped, signed_sin)


PREFILL_CHUNK = 256  # prompt tokens per prefill slice (see LeanRunner.forward)
KV_CACHE_ENV = "BITSMITH_KV_CACHE"  # "fp16" (default for float32 models) or "fp32"


def kv_cache_dtype(dtype: torch.dtype) -> torch.dtype:
    """The KV cache's dtype for a model computing in ``dtype``: float16 for float32 models unless
    ``$BITSMITH_KV_CACHE=fp32``. Decode reads the whole cache per token (at 512 positions about a fifth of
    SmolLM2's bytes per token); half of it in fp16, rounded once when written, as llama.cpp's default
    f16 cache. Generation only: eval never goes through the runner. Other model dtypes keep theirs."""
    choice = os.environ.get(KV_CACHE_ENV, "fp16").strip().lower() or "fp16"
    if choice not in ("fp16", "fp32"):
        raise ValueError(f"{KV_CACHE_ENV}={choice!r}; use fp16 or fp32")
    return torch.float16 if dtype == torch.float32 and choice == "fp16" else dtype


class LeanRunner:
    """Prefill and decode over a preallocated KV cache. ``forward(ids)`` appends ``ids`` [T] at the
    next positions and returns the last position's logits [V] (or all T with ``all_logits``)."""

    def __init__(self, plan: _Plan, max_len: int) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.plan = plan
        self.max_len = max_len
        self.tables = plan.rope_tables(max_len)
        kv = kv_cache_dtype(plan.dtype)
        self.keys = [torch.zeros(l.kv_heads, max_len, l.head_dim, dtype=kv, device=plan.device) for l in plan.layers]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.pos = 0
        from bitsmith.infer.fused import fused_decoder

        self._fused = fused_decoder(self)  # one native call per decoded token, or None (reason logged)

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def reset(self) -> None:
        self.pos = 0

    def _attend(self, layer: _Layer, i: int, q: Tensor, start: int, stop: int) -> Tensor:
        """q [H, T, D] at positions [start, stop) against the cache [0, stop) -> [T, H*D]."""
        t = stop - start
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
        if t > PREFILL_CHUNK and not all_logits:
            # A long prompt in slices: the activations, attention scores and dequantized weight blocks of
            # one slice at a time (peak memory), at the cost of dequantizing the weights once per slice.
            for lo in range(0, t - PREFILL_CHUNK, PREFILL_CHUNK):
                self.forward(ids[lo : lo + PREFILL_CHUNK])
            return self.forward(ids[(t - 1) // PREFILL_CHUNK * PREFILL_CHUNK :])
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

    __call__ = forward
