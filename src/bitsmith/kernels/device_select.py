"""Which kernel a quantized layer gets on an accelerator: :func:`device_kernel`.

``RuntimeOptions.device_kernel`` (the user's ``$BITSMITH_DEVICE_KERNEL``) chooses the order:

- ``auto`` (default): torch's int4 tinygemm, then torch's int8pack (:mod:`bitsmith.kernels.torch_wo`),
  then the Triton kernel (``bitsmith.kernels.triton_gemm``, used when it and triton import), then the
  generic :class:`~bitsmith.kernels.device.DeviceKernel`, the first that takes the layer.
- ``torch``: the torch kernels, else the generic one (never Triton).
- ``triton``: the Triton kernel, else the generic one; refused when Triton cannot be imported.
- ``generic``: always the generic kernel (dequantize per call, then the device's matmul).

Each torch kernel, and the Triton kernel per spec, is first run once per device on a small random
layer against the dequantize-then-matmul oracle (:mod:`bitsmith.kernels.self_check`); if it fails
there (a GPU too old for tinygemm, a build without the op) or disagrees with the oracle, it is logged
once and never chosen on that device. Every (spec, shape) a device sees
is logged once with the kernel it got.
"""

from __future__ import annotations

import logging

import torch

from bitsmith.kernels.device import DeviceKernel, dequantize_packed
from bitsmith.kernels.self_check import kernel_passes, sample_layer
from bitsmith.kernels.torch_wo import TorchInt4Kernel, TorchInt8Kernel, int4_takes, int8_takes
from bitsmith.runtime.options import ENV, RuntimeOptions
from bitsmith.spec import QuantSpec

log = logging.getLogger(__name__)

CHECK_SHAPE = (32, 256)  # the self-check layer: whole tinygemm tiles on every device
CHECK_TOLERANCE = 0.05  # relative L2 error; bf16 arithmetic is ~4e-3, a wrong layout or offset is ~1
_LOGGED: set[tuple] = set()

TORCH_KERNELS = {  # name -> (its class, the function saying why it does not take a layer, the spec it checks with)
    "torch-int4": (TorchInt4Kernel, int4_takes, "w4g64"),
    "torch-int8": (TorchInt8Kernel, int8_takes, "w8"),
}


def torch_kernel_works(name: str, device: torch.device) -> bool:
    """Whether torch's ``name`` kernel runs on ``device`` and matches the oracle within CHECK_TOLERANCE
    (relative L2) on a random CHECK_SHAPE layer of its check spec; once per device (:mod:`self_check`)."""
    cls, _, spec_text = TORCH_KERNELS[name]
    spec = QuantSpec.parse(spec_text)

    def check() -> bool:
        layer = sample_layer(spec, *CHECK_SHAPE, torch.Generator().manual_seed(0))
        qweight, scale, zero = layer["qweight"], layer["scale"], layer["zero"]
        x = torch.randn(3, CHECK_SHAPE[1], generator=torch.Generator().manual_seed(1))
        want = x @ dequantize_packed(qweight, scale, zero, None, spec, CHECK_SHAPE[1], torch.float32).T
        got = cls(qweight, scale, zero, spec, CHECK_SHAPE[1], device)(x.to(device)).float().cpu()
        return float((got - want).norm() / want.norm()) <= CHECK_TOLERANCE

    return kernel_passes(name, device, spec, check)


def triton_module():
    """``bitsmith.kernels.triton_gemm``, or None when it or triton cannot be imported."""
    try:
        import bitsmith.kernels.triton_gemm as triton_gemm
    except ImportError:
        return None
    return triton_gemm


def note(device: torch.device, spec: QuantSpec, shape: tuple[int, int], kernel: str, why: str = "") -> None:
    """Log, once per device, spec and shape, which kernel a layer kind got (and why not a faster one)."""
    key = (str(device), str(spec), shape, kernel)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("%s [%d x %d] on %s: %s kernel%s", spec, *shape, device, kernel, f" ({why})" if why else "")


def device_kernel(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec,
                  in_features: int, device: torch.device, grid: torch.Tensor | None = None,
                  options: RuntimeOptions = RuntimeOptions()):
    """The kernel for these packed checkpoint tensors on ``device`` (order in the module docstring)."""
    choice, shape = options.device_kernel, (qweight.shape[0], in_features)
    skipped = []
    if choice in ("auto", "torch"):
        for name, (cls, takes, _) in TORCH_KERNELS.items():
            reason = takes(spec, grid, *shape, device)
            if reason is None and not torch_kernel_works(name, device):
                reason = f"{name} failed its self-check on {device}"
            if reason is None:
                kernel = cls(qweight, scale, zero, spec, in_features, device)
                bf16 = getattr(kernel, "compute_dtype", None) == torch.bfloat16
                note(device, spec, shape, name, "bf16 activations, scales and offsets" if bf16 else "")
                return kernel
            if spec.bits == (4 if name == "torch-int4" else 8):
                skipped.append(f"{name}: {reason}")
    if choice in ("auto", "triton"):
        triton_gemm = triton_module()
        if triton_gemm is None and choice == "triton":
            raise RuntimeError(f"{ENV['device_kernel']}=triton but bitsmith.kernels.triton_gemm or triton cannot be "
                               "imported; install triton or choose auto, torch or generic")
        if triton_gemm is not None and triton_gemm.supports(spec, grid, in_features, device):
            kernel = triton_gemm.TritonKernel(qweight, scale, zero, spec, in_features, device, grid)
            note(device, spec, shape, kernel.name)
            return kernel
    note(device, spec, shape, DeviceKernel.name, "; ".join(skipped))
    return DeviceKernel(qweight, scale, zero, spec, in_features, device, grid, options.compile)
