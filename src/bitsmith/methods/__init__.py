"""Quantization methods. Every method has one signature:

    method(weight: Tensor[out, in] float32, spec: QuantSpec, stats: LayerStats | None, options) -> QuantizedTensor

and registers itself in METHODS where it is defined. Calibration-free methods ignore ``stats``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor


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


METHODS: dict[str, Method] = {}

# Options that belong to the pipeline (the AWQ transform and its settings, the quantizer behind
# AWQ), not to a method; methods that validate their options drop these first.
PIPELINE_OPTIONS = frozenset({"awq", "quantizer"})


def method_options(options: dict | None) -> dict:
    """The options meant for a method: ``options`` without the pipeline's own keys."""
    return {k: v for k, v in (options or {}).items() if k not in PIPELINE_OPTIONS and not k.startswith("awq_")}


def register(name: str) -> Callable[[Method], Method]:
    def wrap(fn: Method) -> Method:
        METHODS[name] = fn
        return fn

    return wrap


def get_method(name: str) -> Method:
    # Import the built-in methods so they register themselves.
    from bitsmith.methods import gptq, hqq, rtn  # noqa: F401

    if name not in METHODS:
        choices = sorted({*METHODS, "awq"})  # awq: the pipeline's scaling transform, then a registered quantizer
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(choices)}")
    return METHODS[name]
