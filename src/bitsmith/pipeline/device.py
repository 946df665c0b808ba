"""Where the calibrated pipeline computes: ``QuantizePlan.device`` ("cpu", "cuda" or "cuda:N").

On an accelerator each decoder block goes to the device for its forwards, the calibration batches are
streamed there one at a time from the activations kept on the CPU (a batch of 8 x 512 tokens of a
1.5B model is 12.6 MB in bf16, a 7B's 33.5 MB: small next to a block, so a 24 GB card holds one block,
one batch, the stage's Hessian and the replayed outputs), the Hessians are summed there in float32,
the quantizer solves there, and the quantized tensors come back to the CPU to be written. The model
as a whole is never on the device. CPU-only paths (the native kernels, oneDNN's bf16 fpmath mode, the
AMX Hessian update) are taken only where the tensors are on the CPU.

Everything here is checked before any model is loaded (:func:`check_device`, :func:`check_device_plan`).
Importing this module is torch-free.
"""

from __future__ import annotations

import re
from typing import Any

CPU = "cpu"
NO_CUDA = "this torch has no CUDA: install a CUDA build of torch or use --device cpu"
_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def check_device(text: str) -> str:
    """``text`` as a device name ("cpu", "cuda", "cuda:N"), or a ValueError that says what is wrong:
    an unknown spelling, CUDA asked of a torch without it, an index beyond the visible devices."""
    name = str(text).strip().lower()
    match = _DEVICE.match(name)
    if match is None or (match.group(1) == CPU and match.group(2) is not None):
        raise ValueError(f"unknown device {text!r}; use cpu, cuda or cuda:N (N: the GPU's index)")
    if name == CPU:
        return CPU
    import torch

    if not torch.cuda.is_available():
        raise ValueError(NO_CUDA)
    count = torch.cuda.device_count()
    if match.group(2) is not None and int(match.group(2)) >= count:
        raise ValueError(f"device {name} does not exist: this machine has {count} CUDA device(s), "
                         f"cuda:0 to cuda:{count - 1}")
    return name


def check_device_plan(device: str, quantizer: str, transforms: tuple[str, ...], calibrated: bool) -> None:
    """Refuse a plan the device cannot run, before any work: off the CPU only the calibrated pipeline
    runs there, with a quantizer registered ``any_device`` (gptq, rtn) and no transform. The others
    (hqq, vq, awq, rotate) have CPU-only steps or were never checked on a device; running them on the
    CPU instead would be hours on a 7B where the user asked for a GPU, so they are refused, not moved."""
    if device == CPU:
        return
    from bitsmith.methods import METHODS

    if not calibrated:
        raise ValueError(f"--device {device} runs the calibrated pipeline (block forwards, Hessians, GPTQ) on the "
                         f"device; {quantizer} without calibration streams tensors on the CPU: pass --calib or "
                         "use --device cpu")
    if not METHODS[quantizer].any_device:
        able = ", ".join(sorted(n for n, info in METHODS.items() if info.any_device))
        raise ValueError(f"--method {quantizer} cannot run on {device} yet (only {able} can); use --device cpu")
    if transforms:
        raise ValueError(f"{', '.join(transforms)} cannot run on {device} yet; drop it or use --device cpu")


def batch_workers(device: Any) -> int | None:
    """Threads for the calibration batches of one pass (:func:`bitsmith.pipeline.batches.run_batches`):
    its default (one per core) on the CPU; one off it, where each operation already fills the device and
    batches run side by side would hold that many batches' activations at once (16 threads x a 7B MLP's
    8 x 512 x 18,944 intermediates is ~7 GB of a 24 GB card)."""
    return None if str(device) == CPU else 1


def to_device(value: Any, device: Any) -> Any:
    """``value`` with every tensor in it (nested tuples, lists and dicts; a block's call arguments:
    masks, rotary tables, positions) moved to ``device``; anything else as it is. On the tensors'
    own device the same objects come back (``Tensor.to`` returns the tensor itself)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value
