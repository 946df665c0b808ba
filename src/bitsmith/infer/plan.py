"""The static plan of the lean forward (:mod:`bitsmith.infer.lean`) and the fused decode step
(:mod:`bitsmith.infer.fused`): what one decoder-only model's forward needs, read once from its modules as
data (norms, projections, attention shape, rotary, wiring) and checked, so both runners share one
description and neither imports the other. See :mod:`bitsmith.infer.lean` for what is supported and why.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitsmith.models.family import FUSED_DECODE_TYPES

__all__ = ["Joined", "Layer", "LeanUnsupported", "Norm", "Plan", "SUPPORTED_MODEL_TYPES", "lean_plan"]

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
class Norm:
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
class Layer:
    in_norm: Norm
    post_attn_norm: Norm | None  # sandwich only: norm of the attention output
    pre_mlp_norm: Norm
    post_mlp_norm: Norm | None  # sandwich only
    qkv: Callable[[Tensor], tuple[Tensor, ...]]  # x -> (q, k, v), one kernel call when they fuse
    o: Callable[[Tensor], Tensor]
    q_norm: Norm | None
    k_norm: Norm | None
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
class Plan:
    """What one model's lean forward needs, read once from the model (no per-call state)."""

    model: nn.Module
    embed: nn.Module
    layers: list[Layer]
    final_norm: Norm
    head: nn.Module
    final_softcap: float | None
    rotary: nn.Module
    rope_arg: bool  # the rotary forward takes a layer_type argument
    dtype: torch.dtype
    device: torch.device
    hidden: int
    tables: dict[str, tuple[Tensor, Tensor]]  # rope key -> (cos, sin) [positions, head_dim]
    fused: Any = None  # infer/fused.py's per-plan C descriptions (or why there are none), made on first use

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


def _norm_of(module: nn.Module | None, name: str, fp32: bool) -> Norm:
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
    # The closer of the two, if it is close: the candidates differ by |base| per element, which a tolerance
    # relative to the output cannot tell apart once |w| is large (Gemma 3 270M's final norm has weights up
    # to 300: a 2% tolerance took x*w for x*(1+w), and every real Gemma 3 forward came out as noise)
    candidates = (w, 1.0 + w)
    errors = [float((base * c - ref).abs().max()) for c in candidates]
    best = min(range(2), key=errors.__getitem__)
    rounding = 1e-5 if weight.dtype == torch.float32 else 2e-2  # the module's output dtype rounds this much
    if errors[best] <= rounding * float(ref.abs().max()) + 1e-6 and errors[best] < errors[1 - best]:
        return Norm(candidates[best].contiguous(), float(eps), fp32)
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
        return Joined(fuse_native(kernels), bias, sizes)
    calls = [_linear(m) for m in modules]
    return lambda x: tuple(c(x) for c in calls)


class Joined:
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
    config = getattr(model, "config", None)
    if config is None:
        raise LeanUnsupported(f"{type(model).__name__} has no Hugging Face config")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _decoder_parts(model: nn.Module, config: Any) -> tuple[nn.Module, nn.Module]:
    """The decoder (``model.model``) and the output embedding, after the whole-model checks."""
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
    return base, head


def _check_layer(layer: nn.Module, where: str) -> tuple[nn.Module, nn.Module]:
    """The layer's attention and MLP, after checking it holds only modules the lean path knows."""
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
    return attn, mlp


def _layer_plan(layer: nn.Module, i: int, config: Any, rope_arg: bool, fp32: bool) -> Layer:
    """One decoder layer as data (norms, joined projections, attention shape, window, rotary key)."""
    where = f"layer {i}"
    attn, mlp = _check_layer(layer, where)
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
    return Layer(
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
    )


def lean_plan(model: nn.Module) -> Plan:
    """Read everything the lean forward needs from ``model``; raise LeanUnsupported with the reason."""
    config = _text_config(model)
    base, head = _decoder_parts(model, config)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    fp32 = dtype == torch.float32
    rope_arg = "layer_type" in inspect.signature(base.rotary_emb.forward).parameters
    final_softcap = getattr(config, "final_logit_softcapping", None)
    layers = [_layer_plan(layer, i, config, rope_arg, fp32) for i, layer in enumerate(base.layers[: config.num_hidden_layers])]
    if not layers:
        raise LeanUnsupported("the model has no decoder layers")
    return Plan(model=model, embed=base.embed_tokens, layers=layers, final_norm=_norm_of(base.norm, "final norm", fp32),
                head=head, final_softcap=final_softcap, rotary=base.rotary_emb, rope_arg=rope_arg, dtype=dtype,
                device=device, hidden=int(config.hidden_size), tables={})
