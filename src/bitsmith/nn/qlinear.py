"""QuantLinear: a drop-in for nn.Linear that computes from quantized weights, and the one
module-swap helper."""

from __future__ import annotations

import torch
from torch import nn

from bitsmith.hadamard import Rotation, fwht
from bitsmith.kernels import DEFAULT_OPTIONS, Kernel, kernel_device, move, prepare, prepare_packed
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor


class QuantLinear(nn.Module):
    """y = x W^T + b from a quantized W. Only the kernel's tensors stay resident: for the native
    kernel that is the packed codes plus fp16 scale and zero, exactly the checkpoint's bytes; the
    unpacked QuantizedTensor is rebuilt on demand by :meth:`quantized`. ``options`` choose the kernel
    (and are kept: moving the module between devices picks the kernel again with them)."""

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                 options: RuntimeOptions = DEFAULT_OPTIONS) -> None:
        super().__init__()
        self._attach(prepare(qt, options), qt.shape, qt.spec, bias, options)

    def _attach(self, kernel: Kernel, shape: tuple[int, int], spec: QuantSpec, bias: torch.Tensor | None,
                options: RuntimeOptions) -> None:
        self.out_features, self.in_features = shape
        self.spec = spec
        self.options = options
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self._kernel = kernel

    @classmethod
    def from_state(
        cls,
        qweight: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        spec: QuantSpec,
        in_features: int,
        bias: torch.Tensor | None = None,
        options: RuntimeOptions = DEFAULT_OPTIONS,
    ) -> "QuantLinear":
        """Build from checkpoint tensors (``QuantizedTensor.to_state``) without unpacking the codes."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._attach(prepare_packed(qweight, scale, zero, spec, in_features, options), (qweight.shape[0], in_features),
                       spec, bias, options)
        return module

    @property
    def kernel_name(self) -> str:
        return self._kernel.name

    def quantized(self) -> QuantizedTensor:
        """The weights as a QuantizedTensor (rebuilt from the kernel's packed tensors on each call)."""
        return self._kernel.quantized()

    @property
    def qt(self) -> QuantizedTensor:
        """Same as :meth:`quantized`; kept for code written against the earlier attribute."""
        return self.quantized()

    def to_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """Checkpoint tensors, identical to ``self.quantized().to_state(prefix)`` but without a repack."""
        return self._kernel.to_state(prefix)

    @property
    def device(self) -> torch.device:
        return kernel_device(self._kernel)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """``module.to(device)`` / ``.cuda()`` / ``.cpu()`` move the packed weights too (the kernel is not a
        parameter, so torch would not); a dtype change leaves them as they are (codes stay codes)."""
        super()._apply(fn, recurse)
        target = fn(torch.empty(0, device=self.device)).device  # .half() keeps the device, .cuda() moves
        self._kernel = move(self._kernel, target, self.spec, self.in_features, self.options)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._kernel(x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec}, "
            f"kernel={self._kernel.name}"
        )


class InputRotated(nn.Module):
    """``inner(R x)``: a layer quantized in a randomized Hadamard basis (``quantize --rotate``). ``R``
    is applied online with the fast Walsh-Hadamard transform in float32 (:mod:`bitsmith.hadamard`),
    then cast back to the input's dtype for ``inner`` (a QuantLinear over the rotated weight's codes).
    Not a QuantLinear, so the fused decode step (which reads QuantLinear kernels directly) leaves
    these layers on the per-layer path."""

    def __init__(self, inner: nn.Module, rotation: Rotation) -> None:
        super().__init__()
        self.inner = inner
        self.block = rotation.block
        self.register_buffer("signs", rotation.signs.float().clone(), persistent=False)
        self.in_features, self.out_features = rotation.width, getattr(inner, "out_features", None)

    @property
    def rotation(self) -> Rotation:
        return Rotation(self.signs.cpu(), self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(fwht(x.float() * self.signs, self.block).to(x.dtype))

    def extra_repr(self) -> str:
        return f"hadamard_block={self.block}"


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the module at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
