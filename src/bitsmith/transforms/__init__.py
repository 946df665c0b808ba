"""Transforms: change a block's weights (exactly, for the float model) so that any quantization
method loses less on them. A transform runs on one decoder block before its linears are quantized
and registers itself in :mod:`bitsmith.transforms.base`.

- :mod:`bitsmith.transforms.awq`, :mod:`bitsmith.transforms.awq_search`: activation-aware
  per-channel scaling and weight clipping (Lin et al. 2023).
- :mod:`bitsmith.transforms.rotate`: randomized Hadamard rotations of each linear's input (QuIP#-style
  incoherence processing), a basis transform that wraps any quantizer.
"""

from bitsmith.transforms.awq import (
    SCALE_PATTERNS,
    ScaleGroup,
    ScalePattern,
    find_scale_groups,
    fold_scale,
)
from bitsmith.transforms.awq_options import AwqOptions, AwqReport, ClipResult, ScaleResult
from bitsmith.transforms.awq_search import awq_transform, clip_search
from bitsmith.transforms.base import (
    TRANSFORMS, Transform, get_transform, register_basis_transform, register_transform, transform_option,
    wrapped_quantizer,
)
from bitsmith.transforms.rotate import rotated  # noqa: E402  (registration)

__all__ = [
    "SCALE_PATTERNS",
    "TRANSFORMS",
    "AwqOptions",
    "AwqReport",
    "ClipResult",
    "ScaleGroup",
    "ScalePattern",
    "ScaleResult",
    "Transform",
    "awq_transform",
    "clip_search",
    "find_scale_groups",
    "fold_scale",
    "get_transform",
    "register_basis_transform",
    "register_transform",
    "rotated",
    "transform_option",
    "wrapped_quantizer",
]
