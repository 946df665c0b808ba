"""Incoherence processing as a basis transform: every quantized linear is quantized in a randomized
Hadamard basis (:mod:`bitsmith.hadamard`), with any method.

``rotate=true`` (``bitsmith quantize --rotate``) wraps the quantizer:
for a weight ``W`` [out, in] it quantizes ``W' = W R^T`` (``R = H diag(s)``, ``s`` the seeded signs
of the layer's input width, ``H`` block-diagonal normalized Hadamard) with the layer's statistics
rotated alike (GPTQ's Hessian ``R H R^T``; HQQ/RTN importance by block means when no Hessian is
given), and returns the codes of ``W'`` with the rotation attached. The pipeline swaps
``QuantizedTensor.weight()`` (``Q(W') R``, the original basis) into the float block, so later stages'
statistics see the real quantized layer; the runtime applies ``R`` to the activation before the
packed matmul (:class:`bitsmith.nn.qlinear.InputRotated`).

Options: ``rotate`` (the switch), ``rotate_seed`` (int, default 0). AWQ and rotate are not combined
(:func:`check_combination`): AWQ searches its scales by quantizing *unrotated* weights, so the scales
it keeps are tuned for a basis the rotated model never uses, and the rotation already spreads the
outlier input channels that AWQ's scaling protects.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from bitsmith.hadamard import Rotation
from bitsmith.methods.base import LayerStats, Method
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor
from bitsmith.transforms.base import register_basis_transform

NAME = "rotate"
SEED_OPTION = "rotate_seed"
EXCLUSIVE = ("awq",)  # block transforms that do not combine with a rotation (see the module docstring)


def rotate_stats(stats: LayerStats | None, rotation: Rotation) -> LayerStats | None:
    """The statistics of the rotated inputs ``R x``: exact from a Hessian, block means otherwise."""
    if stats is None:
        return None
    hessian = None if stats.hessian is None else rotation.rotate_hessian(stats.hessian.float())
    if hessian is not None and stats.tokens:
        importance = hessian.diagonal() / stats.tokens
    elif stats.importance is not None:
        importance = rotation.rotate_importance(stats.importance)
    else:
        importance = None
    return LayerStats(hessian, importance, stats.tokens)


def rotation_for(width: int, seed: int) -> Rotation | None:
    """The rotation of a layer with ``width`` inputs, or None when no Hadamard block fits (odd width)."""
    rotation = None
    if width % 2 == 0:
        rotation = Rotation.seeded(width, seed)
    return rotation


def quantize_rotated(method: Method, weight: torch.Tensor, spec: QuantSpec, stats: LayerStats | None,
                     options: dict, seed: int) -> QuantizedTensor:
    """``method`` on ``W R^T`` with rotated statistics; the result carries the rotation."""
    rotation = rotation_for(weight.shape[1], seed)
    if rotation is None:
        return method(weight, spec, stats, options)
    qt = method(rotation.rotate_weight(weight.float()), spec, rotate_stats(stats, rotation), options)
    return replace(qt, rotation=rotation)


def rotated(method: Method, seed: int = 0) -> Method:
    """``method`` quantizing in the rotated basis; keeps its ``many`` (GPTQ's stacked stage) when it has one."""

    def run(weight: torch.Tensor, spec: QuantSpec, stats: LayerStats | None, options: dict) -> QuantizedTensor:
        return quantize_rotated(method, weight, spec, stats, options, seed)

    many = getattr(method, "many", None)
    if many is not None:
        def run_many(weights: list[torch.Tensor], spec: QuantSpec, stats: LayerStats | None,
                     options: dict) -> list[QuantizedTensor]:
            # a stage's linears share their input width, so one rotation serves them all
            rotation = rotation_for(weights[0].shape[1], seed)
            if rotation is None:
                return many(weights, spec, stats, options)
            qts = many([rotation.rotate_weight(w.float()) for w in weights], spec, rotate_stats(stats, rotation), options)
            return [replace(qt, rotation=rotation) for qt in qts]

        run.many = run_many  # type: ignore[attr-defined]
    run.inner = method  # type: ignore[attr-defined]  (reports compare against the plain method)
    return run


def seed_of(options: dict[str, Any]) -> int:
    value = options.get(SEED_OPTION, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{SEED_OPTION} must be a non-negative integer, got {value!r}")
    return value


@register_basis_transform(NAME)
def rotate_transform(method: Method, options: dict) -> Method:
    return rotated(method, seed_of(options))


def check_combination(transforms: tuple[str, ...]) -> None:
    """Refuse rotate together with a transform it does not combine with (before any work)."""
    clash = [t for t in EXCLUSIVE if t in transforms]
    if NAME in transforms and clash:
        raise ValueError(f"{NAME} cannot be combined with {', '.join(clash)}: AWQ searches its scales on unrotated "
                         "weights, so they would be tuned for the wrong basis; use --rotate with rtn, hqq or gptq, "
                         f"or {clash[0]} without --rotate")
