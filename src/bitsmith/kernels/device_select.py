"""Which kernel a quantized layer gets on an accelerator: :func:`device_kernel`.

``RuntimeOptions.device_kernel`` (the user's ``$BITSMITH_DEVICE_KERNEL``) chooses the order:

- ``auto`` (default): torch's int4 tinygemm, then torch's int8pack (:mod:`bitsmith.kernels.torch_wo`),
  then the Triton kernel (``bitsmith.kernels.triton_gemm``, used when it and triton import), then the
  generic :class:`~bitsmith.kernels.device.DeviceKernel`, the first that takes the layer.
- ``torch``: the torch kernels, else the generic one (never Triton).
- ``triton``: the Triton kernel, else the generic one; refused when Triton cannot be imported.
- ``generic``: always the generic kernel (dequantize per call, then the device's matmul).

Each torch kernel is first run once per device on a small random layer against the dequantize-then-
matmul oracle; if it fails there (a GPU too old for tinygemm, a build without the op) or disagrees
with the oracle, it is logged once and never chosen on that device. Every (spec, shape) a device sees
is logged once with the kernel it got.
"""

from __future__ import annotations

import logging

import torch

from bitsmith.formats.packing import pack
from bitsmith.kernels.device import DeviceKernel, dequantize_packed
from bitsmith.kernels.torch_wo import TorchInt4Kernel, TorchInt8Kernel, int4_takes, int8_takes
from bitsmith.runtime.options import ENV, RuntimeOptions
from bitsmith.spec import QuantSpec

log = logging.getLogger(__name__)

CHECK_SHAPE = (32, 256)  # the self-check layer: whole tinygemm tiles on every device
CHECK_TOLERANCE = 0.05  # relative L2 error; bf16 arithmetic is ~4e-3, a wrong layout or offset is ~1
_WORKS: dict[tuple[str, str], bool] = {}  # (kernel name, device) -> its self-check passed
_LOGGED: set[tuple] = set()

TORCH_KERNELS = {  # name -> (its class, the function saying why it does not take a layer, the spec it checks with)
    "torch-int4": (TorchInt4Kernel, int4_takes, "w4g64"),
    "torch-int8": (TorchInt8Kernel, int8_takes, "w8"),
}


def self_check_layer(spec: QuantSpec, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random packed codes, fp16 scales and zeros of a CHECK_SHAPE layer (on the CPU)."""
    gen = torch.Generator().manual_seed(seed)
    out_features, in_features = CHECK_SHAPE
    groups = spec.groups_per_row(in_features)
    codes = torch.randint(0, spec.qmax + 1, (out_features, in_features), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(out_features, groups, generator=gen) * 0.02 + 0.001).half()
    zero = (torch.rand(out_features, groups, generator=gen) * spec.qmax).half()
    return pack(codes, spec.bits), scale, zero


def torch_kernel_works(name: str, device: torch.device) -> bool:
    """Whether torch's ``name`` kernel runs on ``device`` and matches the oracle (checked once per device)."""
    key = (name, str(device))
    if key not in _WORKS:
        cls, _, spec_text = TORCH_KERNELS[name]
        spec = QuantSpec.parse(spec_text)
        qweight, scale, zero = self_check_layer(spec)
        x = torch.randn(3, CHECK_SHAPE[1], generator=torch.Generator().manual_seed(1))
        want = x @ dequantize_packed(qweight, scale, zero, None, spec, CHECK_SHAPE[1], torch.float32).T
        try:
            got = cls(qweight, scale, zero, spec, CHECK_SHAPE[1], device)(x.to(device)).float().cpu()
            error = float((got - want).norm() / want.norm())
        except Exception as exc:  # an old GPU, a torch build without the op: the generic kernel serves
            log.warning("%s does not run on %s (%s: %s); using other kernels there", name, device,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            error = float("inf")
        else:
            if not error <= CHECK_TOLERANCE:
                log.warning("%s on %s disagrees with the reference (relative error %.3g); using other kernels there",
                            name, device, error)
        _WORKS[key] = error <= CHECK_TOLERANCE
    return _WORKS[key]


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
