"""The continuous parameters of a loaded checkpoint, made trainable with the codes frozen.

:func:`make_tunable` swaps every quantized linear of a loaded model (a QuantLinear, or an
InputRotated around one) for a :class:`TunableLinear` that computes ``x W^T + b`` with
``W = (codes - zero) * scale`` (or ``grid[codes] * scale``) rebuilt from float parameters on every
forward, so gradients reach the scales and zeros (and a vq layer's codebook); codes stay uint8 buffers. Norm weights (1-D
parameters of modules whose class name says "Norm") are trained as they are. Everything else is
frozen. :func:`tuned_tensors` gives the tuned layers back as QuantizedTensors for the writer.

The product runs through :class:`RebuiltLinear`, which keeps only the layer's input for the backward
pass and builds ``W`` again there. Why: plain autograd keeps ``W`` and the intermediates that built it
(``codes - zero`` and the expanded scales, each as large as ``W`` in float32) for every layer until the
backward pass, about three float32 copies of the model: 16 GB on Qwen2.5-Coder-1.5B, which ran a
24 GB machine out of memory at 2 x 256 tokens. Rebuilding one layer's ``W`` costs an elementwise pass,
small next to the two matrix products of its backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitsmith.hadamard import Rotation
from bitsmith.primitives import expand_groups
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor


class TunableLinear(nn.Module):
    """A quantized linear whose scale (and zero) are float32 parameters; the codes are frozen."""

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.spec: QuantSpec = qt.spec
        self.out_features, self.in_features = qt.shape
        self.register_buffer("codes", qt.codes.clone(), persistent=False)
        self.scale = nn.Parameter(qt.scale.float().clone())
        self.zero = None if qt.zero is None else nn.Parameter(qt.zero.float().clone())
        if qt.spec.grid == "vq":  # a per-layer learned codebook: tuned like the scales (it is stored in fp16)
            self.grid = nn.Parameter(qt.grid.float().clone())
        else:  # a fixed shared grid (nf4 and the like) stays as it is
            self.register_buffer("grid", None if qt.grid is None else qt.grid.float().clone(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone(), persistent=False)
        self.rotation = qt.rotation

    def weight(self) -> torch.Tensor:
        """The dequantized weight in the codes' basis, float32 [out, in], differentiable in scale/zero."""
        return self.build(self.scale, self.zero, self.grid)

    def build(self, scale: torch.Tensor, zero: torch.Tensor | None, grid: torch.Tensor | None) -> torch.Tensor:
        """``W`` from these scale / zero / grid tensors and the layer's frozen codes."""
        scale = expand_groups(scale, self.spec, self.in_features)
        if self.spec.grid == "vq":  # vector codes: whole codebook rows
            return grid[self.codes.long()].reshape(self.out_features, self.in_features) * scale
        if grid is not None:
            return grid[self.codes.long()] * scale
        if zero is None:
            zero = torch.full_like(self.scale, (self.spec.qmax + 1) / 2)
        return (self.codes.float() - expand_groups(zero, self.spec, self.in_features)) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is not None:
            x = self.rotation.apply(x)
        return RebuiltLinear.apply(x.float(), self, self.bias, self.scale, self.zero, self.grid)

    def quantized(self) -> QuantizedTensor:
        """The layer as stored: scale and zero rounded to fp16, as the checkpoint keeps them."""
        zero = None if self.zero is None else self.zero.detach().half()
        grid = None if self.grid is None else self.grid.detach().half()
        return QuantizedTensor(self.codes, self.scale.detach().half(), zero, self.spec, grid, self.rotation)


class RebuiltLinear(torch.autograd.Function):
    """``x W^T + b`` with ``W = layer.build(scale, zero, grid)``, keeping only ``x`` and the small
    parameters for the backward pass, where ``W`` is built again (module docstring). Gradients are
    those of ``F.linear(x, layer.build(...), b)`` under plain autograd (tests/recover/test_tunable.py
    holds them to float32 rounding); ``b`` is a frozen buffer and gets none."""

    @staticmethod
    def forward(ctx, x, layer, bias, scale, zero, grid):  # noqa: D102  (torch's signature)
        with torch.no_grad():
            w = layer.build(scale, zero, grid)
        ctx.layer = layer
        ctx.save_for_backward(x, scale, zero, grid)
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102
        x, scale, zero, grid = ctx.saved_tensors
        wants = ctx.needs_input_grad[3:]
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().requires_grad_(want) for t, want in zip((scale, zero, grid), wants)]
            w = ctx.layer.build(*leaves)
        grad_x = grad_y @ w.detach() if ctx.needs_input_grad[0] else None
        grads: list[torch.Tensor | None] = [None, None, None]
        if any(wants):
            grad_w = grad_y.reshape(-1, grad_y.shape[-1]).T @ x.reshape(-1, x.shape[-1])
            asked = [i for i, want in enumerate(wants) if want]
            for i, g in zip(asked, torch.autograd.grad(w, [leaves[i] for i in asked], grad_w)):
                grads[i] = g
        return grad_x, None, None, *grads


def _quantized_of(module: nn.Module) -> tuple[QuantizedTensor, torch.Tensor | None] | None:
    """(QuantizedTensor with its rotation, bias) of a loaded quantized linear, None for anything else."""
    from bitsmith.nn.qlinear import InputRotated, QuantLinear

    rotation: Rotation | None = None
    if isinstance(module, InputRotated):
        rotation, module = module.rotation, module.inner
    if type(module) is not QuantLinear:
        return None
    qt = module.quantized()
    if rotation is not None:
        qt = QuantizedTensor(qt.codes, qt.scale, qt.zero, qt.spec, qt.grid, rotation)
    return qt, module.bias


def make_tunable(net: nn.Module, names: list[str]) -> dict[str, TunableLinear]:
    """Swap the quantized linears ``names`` of ``net`` for TunableLinears (returned by name); every
    parameter is frozen except theirs and the norm weights (see :func:`norm_weights`)."""
    from bitsmith.nn.qlinear import set_submodule

    for p in net.parameters():
        p.requires_grad_(False)
    tunable = {}
    for name in names:
        found = _quantized_of(net.get_submodule(name))
        if found is None:
            continue  # an embedding (a lookup table) or a layer the loader kept unquantized
        tunable[name] = TunableLinear(*found)
        set_submodule(net, name, tunable[name])
    for p in norm_weights(net).values():
        p.requires_grad_(True)
    return tunable


def norm_weights(net: nn.Module) -> dict[str, nn.Parameter]:
    """The 1-D weights of the model's norms (RMSNorm / LayerNorm), by parameter name."""
    found = {}
    for mname, module in net.named_modules():
        weight = getattr(module, "weight", None)
        if "norm" in type(module).__name__.lower() and isinstance(weight, nn.Parameter) and weight.dim() == 1:
            found[f"{mname}.weight" if mname else "weight"] = weight
    return found


def trainable(net: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter being tuned, by name, in a stable order (the optimizer's and the saved state's)."""
    return {n: p for n, p in net.named_parameters() if p.requires_grad}


def round_to_storage(tunable: dict[str, TunableLinear]) -> None:
    """Round the tuned scales, zeros and vq codebooks to fp16, the dtype the checkpoint stores them in,
    so that the loss measured on the parameters is the loss of the checkpoint that will be written
    (norm weights are stored in fp32 and need no rounding)."""
    with torch.no_grad():
        for layer in tunable.values():
            for p in (layer.scale, layer.zero, layer.grid):
                if isinstance(p, nn.Parameter):
                    p.copy_(p.half().float())
