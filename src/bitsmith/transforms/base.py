"""The transform registry: exact re-parametrisations of a decoder block, applied before any method.

A transform changes a block's weights so that the float block computes the same function while
quantizing it afterwards (with any method) loses less. It registers itself where it is defined,
with what it needs from calibration; the pipeline applies a plan's transforms to each block, in
order, before its linears are quantized. Options named after a transform (``awq``, ``awq_grid``, ...)
belong to it, never to the method (:meth:`Transform.owns`).

A *basis* transform (``rotate``) leaves the float block alone and instead changes the basis each
linear is quantized in: it wraps the quantizer (:func:`register_basis_transform`), so it works with
every method and in both pipelines (calibrated or not), and the quantized tensor records the change
for the runtime to undo. It needs no calibration of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

from bitsmith.methods.base import Method, Needs

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bitsmith.spec import QuantSpec


class TransformFn(Protocol):
    def __call__(
        self, block: "nn.Module", hidden: "torch.Tensor", block_kwargs: dict, spec: "QuantSpec", options: dict,
        batch_size: int,
    ) -> Any: ...
    # block: loaded in float32, changed in place; hidden [N, L, H]: its calibration inputs, float32 or the
    # run's bf16 (convert the rows used: hidden.index_select(0, rows).float()); block_kwargs: what the model
    # passes to the block; returns a report (logged)


class WrapFn(Protocol):
    def __call__(self, method: Method, options: dict) -> Method: ...
    # the quantizer to use instead of ``method`` (a basis transform); options: the run's options


@dataclass(frozen=True)
class Transform:
    name: str
    apply: TransformFn | None  # None: a basis transform (``wrap`` only), the block is left alone
    needs: Needs = Needs.BLOCK_REPLAY
    wrap: WrapFn | None = None
    # the calibration text (a --calib value: a built-in name of calib.data or a path) a run uses when the
    # user names none; None: the library's default (calib.data.DEFAULT_CALIB_TEXT)
    calib_text: str | None = None
    # windows(samples, seq_len, options) -> the calibration sequences (indices) its searches read; None: all
    # of them. A run whose quantizer reads no statistics runs only those through the blocks
    # (pipeline.plan.QuantizePlan.calibration_windows)
    windows: Callable[[int, int, dict], list[int]] | None = None

    @property
    def changes_block(self) -> bool:
        """Whether it re-parametrises the float block (AWQ) rather than the quantizer's basis."""
        return self.apply is not None

    def owns(self, option: str) -> bool:
        """Whether ``option`` is this transform's: its own name (the switch) or ``<name>_*``."""
        return option == self.name or option.startswith(self.name + "_")


TRANSFORMS: dict[str, Transform] = {}


def register_transform(name: str, needs: Needs = Needs.BLOCK_REPLAY, calib_text: str | None = None,
                       windows: Callable[[int, int, dict], list[int]] | None = None,
                       ) -> Callable[[TransformFn], TransformFn]:
    def wrap(fn: TransformFn) -> TransformFn:
        TRANSFORMS[name] = Transform(name, fn, needs, calib_text=calib_text, windows=windows)
        return fn

    return wrap


def register_basis_transform(name: str) -> Callable[[WrapFn], WrapFn]:
    """Decorator: register a transform that wraps the quantizer (needs no calibration)."""
    def wrap(fn: WrapFn) -> WrapFn:
        TRANSFORMS[name] = Transform(name, None, Needs.NOTHING, fn)
        return fn

    return wrap


def wrapped_quantizer(method: Method, transforms: tuple[str, ...], options: dict) -> Method:
    """``method`` wrapped by each basis transform among ``transforms``, in order."""
    for name in transforms:
        wrap = get_transform(name).wrap
        if wrap is not None:
            method = wrap(method, options)
    return method


def get_transform(name: str) -> Transform:
    """The registration of ``name``; the built-ins register when :mod:`bitsmith.transforms` is imported."""
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; choose one of {', '.join(sorted(TRANSFORMS))}")
    return TRANSFORMS[name]


def transform_option(option: str) -> bool:
    """Whether ``option`` belongs to some registered transform (and so is not passed to methods)."""
    return any(t.owns(option) for t in TRANSFORMS.values())
