"""The transform registry: exact re-parametrisations of a decoder block, applied before any method.

A transform changes a block's weights so that the float block computes the same function while
quantizing it afterwards (with any method) loses less. It registers itself where it is defined,
with what it needs from calibration; the pipeline applies a plan's transforms to each block, in
order, before its linears are quantized. Options named after a transform (``awq``, ``awq_grid``, ...)
belong to it, never to the method (:meth:`Transform.owns`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

from bitsmith.methods.base import Needs

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bitsmith.spec import QuantSpec


class TransformFn(Protocol):
    def __call__(
        self, block: "nn.Module", hidden: "torch.Tensor", block_kwargs: dict, spec: "QuantSpec", options: dict,
        batch_size: int,
    ) -> Any: ...
    # block: loaded in float32, changed in place; hidden [N, L, H] float32: its calibration inputs;
    # block_kwargs: what the model passes to the block; returns a report (logged)


@dataclass(frozen=True)
class Transform:
    name: str
    apply: TransformFn
    needs: Needs = Needs.BLOCK_REPLAY

    def owns(self, option: str) -> bool:
        """Whether ``option`` is this transform's: its own name (the switch) or ``<name>_*``."""
        return option == self.name or option.startswith(self.name + "_")


TRANSFORMS: dict[str, Transform] = {}


def register_transform(name: str, needs: Needs = Needs.BLOCK_REPLAY) -> Callable[[TransformFn], TransformFn]:
    def wrap(fn: TransformFn) -> TransformFn:
        TRANSFORMS[name] = Transform(name, fn, needs)
        return fn

    return wrap


def get_transform(name: str) -> Transform:
    """The registration of ``name``; the built-ins register when :mod:`bitsmith.transforms` is imported."""
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; choose one of {', '.join(sorted(TRANSFORMS))}")
    return TRANSFORMS[name]


def transform_option(option: str) -> bool:
    """Whether ``option`` belongs to some registered transform (and so is not passed to methods)."""
    return any(t.owns(option) for t in TRANSFORMS.values())
