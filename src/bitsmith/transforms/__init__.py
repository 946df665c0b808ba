"""Transforms: change a block's weights (exactly, for the float model) so that any quantization
method loses less on them. A transform runs on one decoder block before its linears are quantized.

- :mod:`bitsmith.transforms.awq`: activation-aware per-channel scaling and weight clipping
  (Lin et al. 2023).
"""

from bitsmith.transforms.awq import (
    SCALE_PATTERNS,
    AwqOptions,
    AwqReport,
    ClipResult,
    ScaleGroup,
    ScalePattern,
    ScaleResult,
    awq_transform,
    clip_search,
    find_scale_groups,
    fold_scale,
)

__all__ = [
    "SCALE_PATTERNS",
    "AwqOptions",
    "AwqReport",
    "ClipResult",
    "ScaleGroup",
    "ScalePattern",
    "ScaleResult",
    "awq_transform",
    "clip_search",
    "find_scale_groups",
    "fold_scale",
]
