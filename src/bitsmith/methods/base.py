"""The method registry: what a quantization method is, what it needs, and how it is found by name.

Every method has one signature::

    method(weight: Tensor[out, in] float32, spec: QuantSpec, stats: LayerStats | None, options) -> QuantizedTensor

and registers itself where it is defined, with what it needs from calibration (:class:`Needs`) and
its typed options. Questions such as "does gptq need calibration data?" are answered here, from the
registrations, never from a list kept elsewhere. Calibration-free methods ignore ``stats`` or use
its per-channel importance when given.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Protocol

import torch

from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor


class Needs(Enum):
    """What a method (or a transform) needs from the calibration data, from least to most."""

    NOTHING = "nothing"  # calibration-free (statistics are used when given, never required)
    ACTIVATION_STATS = "activation statistics"  # per-channel input importance
    HESSIAN = "a Hessian"  # sum of x x^T over the calibration tokens, per layer
    BLOCK_REPLAY = "block replay"  # runs the whole decoder block on its calibration inputs


@dataclass(frozen=True)
class LayerStats:
    """What calibration tells a method about a linear layer's inputs."""

    hessian: torch.Tensor | None = None  # [in, in], sum of x x^T over calibration tokens (GPTQ)
    importance: torch.Tensor | None = None  # [in], mean squared input per channel
    tokens: int = 0


class Method(Protocol):
    def __call__(
        self, weight: torch.Tensor, spec: QuantSpec, stats: LayerStats | None, options: dict
    ) -> QuantizedTensor: ...


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: the function, what it needs, its typed options (a frozen dataclass
    with ``from_dict``, or None when it reads its few options itself), and the built-in calibration
    text it uses when the user names none (None: the library's default). ``any_device``: the method
    computes on the device of the weight it is given (torch operations only off the CPU, its native
    kernels skipped there), so the calibrated pipeline may run it on an accelerator (``--device``).
    ``half_weights``: the method takes a bf16/fp16 weight as it is and makes it float32 a slice at a time,
    so the pipeline may hand it a large tensor (the head) in its source dtype, half the bytes of float32.
    ``reads_stats(options, spec)``: whether the method reads ``stats`` at all with these options and spec
    (None: whenever given). A calibrated run whose quantizer reads none runs only the calibration sequences
    its transforms read through the blocks (:meth:`~bitsmith.pipeline.plan.QuantizePlan.calibration_windows`)."""

    name: str
    fn: Method
    needs: Needs = Needs.NOTHING
    options: type | None = None
    calib_text: str | None = None
    any_device: bool = False
    half_weights: bool = False
    reads_stats: "Callable[[dict, QuantSpec], bool] | None" = None


METHODS: dict[str, MethodInfo] = {}


def register(name: str, needs: Needs = Needs.NOTHING, options: type | None = None,
             calib_text: str | None = None, any_device: bool = False,
             half_weights: bool = False,
             reads_stats: "Callable[[dict, QuantSpec], bool] | None" = None) -> Callable[[Method], Method]:
    """Decorator: register ``fn`` under ``name``; it stays a plain function."""

    def wrap(fn: Method) -> Method:
        METHODS[name] = MethodInfo(name, fn, needs, options, calib_text, any_device, half_weights, reads_stats)
        return fn

    return wrap


def method_info(name: str) -> MethodInfo:
    """The registration of ``name``. The built-in methods register when :mod:`bitsmith.methods`
    is imported, which importing this module always does first (it is that package's submodule)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def get_method(name: str) -> Method:
    return method_info(name).fn


def needs_calibration(name: str) -> bool:
    """Whether method ``name`` cannot run without calibration data."""
    return method_info(name).needs is not Needs.NOTHING
