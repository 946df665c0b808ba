"""Matmul with packed quantized weights.

``reference_linear`` is the oracle every fast path is tested against: unpack, dequantize to
float32, then ``F.linear``. ``prepare`` picks a kernel for a QuantizedTensor once, at load time:

- ``native`` (:mod:`bitsmith.kernels.cpu`): compiled C++/OpenMP reading the packed codes; every spec.
- ``torch-chunked``: torch only, dequantizing a few MB of rows at a time; used without a compiler.
- ``reference``: the oracle itself.
- off the CPU (``model.to("cuda")``), :func:`move` asks :func:`bitsmith.kernels.device_select.device_kernel`:
  torch's int4/int8 weight-only kernels (:mod:`bitsmith.kernels.torch_wo`), a Triton kernel, or the generic
  ``device`` kernel (:mod:`bitsmith.kernels.device`: packed codes on the device, dequantized there in row
  blocks), as ``RuntimeOptions.device_kernel`` says.

``RuntimeOptions.kernel`` (``auto``, the default, or ``native``, ``torch``, ``reference``) forces a
choice; the options are a parameter of every ``prepare`` call (the user's ``$BITSMITH_KERNEL`` reaches
them through :meth:`~bitsmith.runtime.options.RuntimeOptions.from_env` at the entry points).
"""

from __future__ import annotations

from typing import Protocol

import torch

from bitsmith.formats.packing import pack, unpack
from bitsmith.kernels.torch_path import ChunkedKernel, ReferenceKernel, reference_linear
from bitsmith.runtime.options import ENV, RuntimeOptions
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

__all__ = ["Kernel", "KERNEL_ENV", "kernel_device", "move", "prepare", "prepare_packed", "reference_linear"]

KERNEL_ENV = ENV["kernel"]  # the variable RuntimeOptions.from_env reads the kernel choice from
DEFAULT_OPTIONS = RuntimeOptions()


class Kernel(Protocol):
    """x [..., in] float -> y [..., out] (no bias), plus the way back to the stored tensors."""

    name: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def quantized(self) -> QuantizedTensor: ...

    def to_state(self, prefix: str) -> dict[str, torch.Tensor]: ...


def prepare_packed(
    qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec, in_features: int,
    options: RuntimeOptions = DEFAULT_OPTIONS,
) -> Kernel:
    """The fastest kernel for tensors as a checkpoint stores them (``QuantizedTensor.to_state``)."""
    choice = options.kernel
    if choice in ("auto", "native"):
        from bitsmith.kernels.build import native_library

        lib = native_library()
        if lib is not None:
            from bitsmith.kernels.cpu import NativeKernel

            return NativeKernel(lib, qweight, scale, zero, spec, in_features, options.int8_decode, options.threads,
                                options.prefill)
        if choice == "native":
            raise RuntimeError(f"{KERNEL_ENV}=native but the native kernels could not be built; see the log")
    qt = QuantizedTensor(unpack(qweight, spec.bits, in_features), scale, zero, spec)
    return ReferenceKernel(qt) if choice == "reference" else ChunkedKernel(qt)


def prepare(qt: QuantizedTensor, options: RuntimeOptions = DEFAULT_OPTIONS) -> Kernel:
    """The fastest kernel available for this tensor (see the module docstring)."""
    choice = options.kernel
    if choice == "reference":
        return ReferenceKernel(qt)
    if qt.spec.grid == "vq" and choice in ("auto", "native"):  # vector codes: csrc/codebook.cpp
        from bitsmith.kernels.codebook import prepare_codebook

        kernel = prepare_codebook(qt, options.threads, options.int8_decode, options.prefill)
        if kernel is not None:
            return kernel
    if choice == "torch" or qt.grid is not None:  # the native kernels know uniform codes only
        return ChunkedKernel(qt)
    if qt.spec.bits == 8 and qt.shape[1] % 8 == 0 and qt.codes.dtype == torch.uint8 and qt.codes.is_contiguous():
        packed = qt.codes  # 8-bit whole runs: the packed layout is the codes themselves, shared not copied
    else:
        packed = pack(qt.codes, qt.spec.bits)
    return prepare_packed(packed, qt.scale, qt.zero, qt.spec, qt.shape[1], options)


def kernel_device(kernel: Kernel) -> torch.device:
    """Where a kernel's tensors live (the CPU kernels do not say: they are all on the CPU)."""
    return getattr(kernel, "device", torch.device("cpu"))


def move(kernel: Kernel, device: torch.device | str, spec: QuantSpec, in_features: int,
         options: RuntimeOptions = DEFAULT_OPTIONS) -> Kernel:
    """The kernel for the same packed tensors on ``device``: the device selector's choice off the CPU
    (:func:`~bitsmith.kernels.device_select.device_kernel`), the fastest CPU kernel (:func:`prepare_packed`)
    back on it. No-op when already there."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if kernel_device(kernel) == device:
        return kernel
    state = kernel.to_state("w")
    qweight, scale, zero, grid = state["w.qweight"], state["w.scale"], state.get("w.zero"), state.get("w.grid")
    if device.type != "cpu":
        from bitsmith.kernels.device_select import device_kernel

        return device_kernel(qweight, scale, zero, spec, in_features, device, grid, options)
    cpu = (lambda t: None if t is None else t.cpu())  # noqa: E731
    if grid is not None:
        return prepare(QuantizedTensor.from_state(cpu(qweight), cpu(scale), cpu(zero), spec, in_features, cpu(grid)), options)
    return prepare_packed(cpu(qweight), cpu(scale), cpu(zero), spec, in_features, options)
