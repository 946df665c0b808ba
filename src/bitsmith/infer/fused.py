"""The fused decode step: one native call (csrc/decode.cpp ``bs_decode_step``) runs every decoder layer
of a :class:`~bitsmith.infer.lean.LeanRunner` for one new token.

A small model's lean decode step is bound by the dispatch of ~35 small torch ops per layer, not by its
matrix products. When every layer of the lean plan is native-kernel quantized (q/k/v and gate/up fused
into one kernel each), float32 and on the CPU, :func:`fused_decoder` describes the layers once as C
structs (packed weights, biases, norm weights, the runner's KV cache and rotary tables) and decoding a
token becomes: embedding (torch), ``bs_decode_step`` (all layers, K/V written into the same cache
tensors the torch prefill fills, and the final norm and head when the head is a native-kernel
quantized linear too, as the w6g128 or w8 head quantize gives by default: one parallel region per token), then
the head in torch only when it is not (a float head) and Gemma's logit softcap.

Anything outside that (torch or other kernels, bf16, another device, attention logit softcapping, an
activation other than SiLU/GELU) keeps the torch path; the reason is logged once per plan.
``RuntimeOptions(fused_decode=False)`` (the user's ``$BITSMITH_FUSED_DECODE=0``) turns the fused step off
in the runner (A/B timing). The step computes as the layers' kernels do: int8 activations and thread
count come from the kernels (``NativeKernel.int8_decode`` / ``threads``), so both decode paths agree.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from bitsmith.infer.plan import Joined, Layer, Norm, Plan

__all__ = ["DecodeState", "FusedDecoder", "fused_decoder", "fused_reason"]

log = logging.getLogger(__name__)

_P, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}  # decode.cpp's ACT_* codes


class _Mat(ctypes.Structure):
    _fields_ = [("packed", _P), ("scale", _P), ("zero", _P), ("bias", _P),
                ("out", _I), ("in_", _I), ("bits", _I), ("group", _I)]


class _NormS(ctypes.Structure):
    _fields_ = [("weight", _P), ("eps", _D)]


class _LayerS(ctypes.Structure):
    _fields_ = [(n, _NormS) for n in ("in_norm", "post_attn_norm", "pre_mlp_norm", "post_mlp_norm", "q_norm", "k_norm")] + \
               [(n, _Mat) for n in ("qkv", "o", "gate_up", "down")] + \
               [(n, _P) for n in ("keys", "values", "cos", "sin")] + \
               [(n, _I) for n in ("heads", "kv_heads", "head_dim", "window", "act", "max_len", "kv_half")] + \
               [("scaling", _D)]


class _HeadS(ctypes.Structure):
    _fields_ = [("norm", _NormS), ("head", _Mat), ("logits", _P)]


class _Unfusable(Exception):
    pass


class DecodeState(Protocol):
    """What the fused step reads from a runner (:class:`bitsmith.infer.lean.LeanRunner`): its plan,
    KV cache ([kv_heads, max_len, head_dim] per layer) and rotary tables; written in place."""

    plan: Plan
    keys: list[Tensor]
    values: list[Tensor]
    tables: dict[str, tuple[Tensor, Tensor]]
    max_len: int


def _activation_code(act: Any) -> int:
    x = torch.linspace(-6, 6, 97)
    with torch.no_grad():
        y = act(x)
    for name, fn in (("silu", F.silu), ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh")), ("gelu", F.gelu)):
        if torch.allclose(fn(x), y, rtol=1e-6, atol=1e-6):
            return ACTIVATIONS[name]
    raise _Unfusable(f"MLP activation {act!r} is not SiLU or GELU")


def _native(kernel: Any, what: str) -> Any:
    from bitsmith.kernels.cpu import NativeKernel

    if not isinstance(kernel, NativeKernel):
        raise _Unfusable(f"{what} is not a native-kernel quantized linear ({type(kernel).__name__})")
    if not hasattr(kernel._lib, "bs_decode_step"):
        raise _Unfusable("the native library has no bs_decode_step")
    return kernel


def _float_vec(t: Tensor | None, n: int, what: str) -> Tensor | None:
    if t is None:
        return None
    t = t.detach()
    if t.device.type != "cpu" or t.numel() != n:
        raise _Unfusable(f"{what} is not a CPU vector of {n}")
    return t.to(torch.float32).contiguous()


def _matrix(call: Any, what: str, keep: list) -> _Mat:
    """A fused Joined (q/k/v, gate/up) or a QuantLinear's bound forward -> the C matrix description."""
    from bitsmith.nn.qlinear import QuantLinear

    if isinstance(call, Joined):
        kernel, bias = _native(call.kernel, what), call.bias
    elif type(getattr(call, "__self__", None)) is QuantLinear and getattr(call, "__func__", None) is QuantLinear.forward:
        module = call.__self__
        kernel, bias = _native(module._kernel, what), module.bias
    else:
        raise _Unfusable(f"{what} is not a fused native kernel or a quantized linear")
    bias = _float_vec(bias, kernel.out_features, f"{what} bias")
    keep += [kernel, bias]
    packed, scale, zero, out, inp, bits, group = kernel._weight_args()
    return _Mat(packed, scale, zero, None if bias is None else bias.data_ptr(), out, inp, bits, group)


def _norm(norm: Norm | None, n: int, what: str, keep: list) -> _NormS:
    if norm is None:
        return _NormS(None, 0.0)
    weight = _float_vec(norm.weight, n, what)
    keep.append(weight)
    return _NormS(weight.data_ptr(), float(norm.eps))


def _layer_spec(layer: Layer, i: int, hidden: int, keep: list) -> dict[str, Any]:
    """Everything of one layer that does not depend on the runner (cache, tables)."""
    where = f"layer {i}"
    if layer.softcap is not None:
        raise _Unfusable(f"{where}: attention logit softcapping")
    if layer.heads % layer.kv_heads or layer.head_dim % 2:
        raise _Unfusable(f"{where}: {layer.heads} heads over {layer.kv_heads} KV heads of {layer.head_dim}")
    qn, kn = layer.heads * layer.head_dim, layer.kv_heads * layer.head_dim
    spec = dict(qkv=_matrix(layer.qkv, f"{where} q/k/v", keep), o=_matrix(layer.o, f"{where} o_proj", keep),
                gate_up=_matrix(layer.gate_up, f"{where} gate/up", keep),
                down=_matrix(layer.down, f"{where} down_proj", keep))
    qkv, o, gu, down = spec["qkv"], spec["o"], spec["gate_up"], spec["down"]
    inter = down.in_
    shapes = [(qkv.in_, hidden), (qkv.out, qn + 2 * kn), (o.in_, qn), (o.out, hidden), (gu.in_, hidden),
              (gu.out, 2 * inter), (down.out, hidden)]
    if any(a != b for a, b in shapes):
        raise _Unfusable(f"{where}: matrix shapes do not chain ({shapes})")
    spec.update(
        in_norm=_norm(layer.in_norm, hidden, f"{where} input norm", keep),
        post_attn_norm=_norm(layer.post_attn_norm, hidden, f"{where} post-attention norm", keep),
        pre_mlp_norm=_norm(layer.pre_mlp_norm, hidden, f"{where} pre-MLP norm", keep),
        post_mlp_norm=_norm(layer.post_mlp_norm, hidden, f"{where} post-MLP norm", keep),
        q_norm=_norm(layer.q_norm, layer.head_dim, f"{where} q_norm", keep),
        k_norm=_norm(layer.k_norm, layer.head_dim, f"{where} k_norm", keep),
        heads=layer.heads, kv_heads=layer.kv_heads, head_dim=layer.head_dim, window=layer.window or 0,
        act=_activation_code(layer.act), scaling=float(layer.scaling),
    )
    return spec


def _head_spec(plan: Plan, lib: Any, options: tuple[bool, int | None]) -> dict[str, Any] | None:
    """The final norm and head as C descriptions when the head is a native-kernel quantized linear of
    the layers' library and options (6-8-bit heads, as quantize and llama.cpp keep them); else None and
    torch runs the head after the step (a float head, another kernel: the head's own reason)."""
    from bitsmith.nn.qlinear import QuantLinear

    keep: list = []
    try:
        if not isinstance(plan.head, QuantLinear):
            raise _Unfusable(f"the head is a {type(plan.head).__name__}, not a quantized linear")
        head = _matrix(plan.head.forward, "head", keep)
        kernel = keep[0]
        if kernel._lib is not lib or (kernel.int8_decode, kernel.threads) != options:
            raise _Unfusable("the head's kernel was prepared with other options than the layers'")
        if head.in_ != plan.hidden:
            raise _Unfusable(f"the head takes {head.in_} features, the model has {plan.hidden}")
        norm = _norm(plan.final_norm, plan.hidden, "final norm", keep)
    except _Unfusable as err:
        log.info("the fused decode step leaves the head to torch: %s", err)
        return None
    return {"norm": norm, "head": head, "vocab": head.out, "keep": keep}


def _plan_specs(plan: Plan) -> tuple[list[dict[str, Any]], list, Any, bool, int | None, dict | None] | str:
    """The per-layer C descriptions of a plan (with the library, int8 switch and thread count its
    kernels share, and the head's description when it runs in the step too), or why it cannot be
    fused; computed once per plan."""
    if plan.fused is not None:
        return plan.fused
    try:
        if plan.dtype != torch.float32:
            raise _Unfusable(f"the model runs in {plan.dtype}, the fused step in float32")
        if plan.device.type != "cpu":
            raise _Unfusable(f"the model is on {plan.device}")
        keep: list = []
        specs = [_layer_spec(layer, i, plan.hidden, keep) for i, layer in enumerate(plan.layers)]
        libs = {id(k._lib) for k in keep if hasattr(k, "_lib")}
        if len(libs) != 1:
            raise _Unfusable("the layers' kernels come from different native libraries")
        kernels = [k for k in keep if hasattr(k, "_lib")]
        options = {(k.int8_decode, k.threads) for k in kernels}
        if len(options) != 1:
            raise _Unfusable("the layers' kernels were prepared with different options")
        shared = options.pop()
        result: Any = (specs, keep, kernels[0]._lib, *shared, _head_spec(plan, kernels[0]._lib, shared))
    except _Unfusable as err:
        result = str(err)
        log.info("fused decode step not used: %s; decoding with the torch lean path", err)
    plan.fused = result
    return result


def fused_reason(plan: Plan) -> str | None:
    """Why ``plan`` cannot use the fused decode step, or None when it can."""
    specs = _plan_specs(plan)
    return specs if isinstance(specs, str) else None


class FusedDecoder:
    """Decode one token of a runner with one native call; the C structs are built once here."""

    def __init__(self, runner: DecodeState, specs: list[dict[str, Any]], keep: list, lib: Any, int8_decode: bool,
                 threads: int | None, head: dict[str, Any] | None = None) -> None:
        plan = runner.plan
        self.plan, self.lib = plan, lib
        self.int8_decode, self.threads = int8_decode, threads
        self._keep = list(keep)  # what the structs point into stays alive as long as this decoder
        self.layers = (_LayerS * len(specs))()
        for i, (spec, keys, values, layer) in enumerate(zip(specs, runner.keys, runner.values, plan.layers)):
            cos, sin = runner.tables[layer.rope]
            if cos.shape[-1] != layer.head_dim or not (keys.is_contiguous() and values.is_contiguous()):
                raise _Unfusable(f"layer {i}: rotary tables or cache are not [.., {layer.head_dim}] contiguous")
            s = self.layers[i]
            for name, value in spec.items():
                setattr(s, name, value)
            s.keys, s.values, s.cos, s.sin = keys.data_ptr(), values.data_ptr(), cos.data_ptr(), sin.data_ptr()
            s.max_len = runner.max_len
            if keys.dtype not in (torch.float32, torch.float16) or values.dtype != keys.dtype:
                raise _Unfusable(f"layer {i}: a {keys.dtype} KV cache (the fused step reads float32 or float16)")
            s.kv_half = int(keys.dtype == torch.float16)
            self._keep += [keys, values, cos, sin]
        self.head = None
        if head is not None:  # final norm + head in the step; logits land in a fresh tensor each call
            self.head = _HeadS(head["norm"], head["head"], None)
            self.vocab = head["vocab"]
            self._keep += head["keep"]
        head_ptr = None if self.head is None else ctypes.byref(self.head)
        self.scratch = torch.empty(int(lib.bs_decode_scratch(self.layers, len(specs), head_ptr)), dtype=torch.float32)
        self.h = torch.empty(1, plan.hidden, dtype=torch.float32)
        self._args = (self.layers, len(specs), self.h.data_ptr())
        self._head_ptr = head_ptr

    def __call__(self, ids: Tensor, pos: int) -> Tensor:
        """ids [1] at position ``pos`` -> logits [V]; the cache gets position ``pos`` of every layer."""
        plan = self.plan
        with torch.no_grad():
            self.h.copy_(plan.embed(ids[None])[0])
            threads = self.threads or torch.get_num_threads()
            if self.head is not None:
                logits = torch.empty(1, self.vocab, dtype=torch.float32)  # callers keep each step's logits
                self.head.logits = logits.data_ptr()
                self.lib.bs_decode_step(*self._args, pos, self.scratch.data_ptr(), threads, int(self.int8_decode),
                                        self._head_ptr)
            else:
                self.lib.bs_decode_step(*self._args, pos, self.scratch.data_ptr(), threads, int(self.int8_decode), None)
                logits = plan.head(plan.final_norm(self.h))
        if plan.final_softcap:
            logits = torch.tanh(logits / plan.final_softcap) * plan.final_softcap
        return logits[0]


def fused_decoder(runner: DecodeState) -> FusedDecoder | None:
    """The fused step for this runner, or None when the plan is outside it (reason logged once per plan)."""
    specs = _plan_specs(runner.plan)
    if isinstance(specs, str):
        return None
    try:
        return FusedDecoder(runner, *specs)
    except _Unfusable as err:
        log.info("fused decode step not used: %s; decoding with the torch lean path", err)
        return None
