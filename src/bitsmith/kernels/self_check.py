"""Once per device: does a device kernel run there, and does it agree with the reference?

The device selector (:mod:`bitsmith.kernels.device_select`) offers a layer a kernel that has not been
run on that device before (torch's int4/int8 weight-only ops, the Triton GEMM) only after one small
random layer went through it and matched the dequantize-then-matmul oracle. Each kernel brings only
its check (which layer, which tolerance); the verdict, its cache per (kernel, device, spec) and the one
warning when a kernel fails (an old GPU, a torch build without the op, a compiler bug) live here.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from bitsmith.formats.packing import pack
from bitsmith.spec import QuantSpec

log = logging.getLogger(__name__)

_VERDICTS: dict[tuple[str, str, str], bool] = {}  # (kernel, device, spec) -> passed, once per process


def sample_layer(spec: QuantSpec, out_features: int, in_features: int, gen: torch.Generator) -> dict:
    """Random tensors as a checkpoint stores one layer (``qweight``, ``scale``, ``zero``, ``grid``; absent
    ones None): codes over every level, fp16 scales of both signs, fractional fp16 zeros, a random
    fp16 grid or codebook where the spec has one. For the self-checks and the tests."""
    codes = torch.randint(0, spec.levels, (out_features, in_features // spec.vq_dim), generator=gen, dtype=torch.uint8)
    groups = spec.groups_per_row(in_features)
    sign = torch.randint(0, 2, (out_features, groups), generator=gen) * 2 - 1
    layer = {"qweight": pack(codes, spec.index_bits),
             "scale": ((torch.rand(out_features, groups, generator=gen) * 0.09 + 0.01) * sign).half(),
             "zero": None, "grid": None}
    if spec.has_zero:
        layer["zero"] = (torch.rand(out_features, groups, generator=gen) * spec.qmax).half()
    if spec.grid == "vq":
        layer["grid"] = torch.randn(spec.levels, spec.vq_dim, generator=gen).half()
    elif spec.grid != "uniform":
        layer["grid"] = torch.sort(torch.randn(spec.levels, generator=gen)).values.half()
    return layer


def kernel_passes(kernel: str, device: torch.device | str, spec: QuantSpec, check: Callable[[], bool]) -> bool:
    """``check()``'s verdict for ``kernel`` on ``device`` with ``spec``, computed once per process. An
    exception counts as a failure; either failure is logged once as a warning, and the caller keeps
    another kernel for the layer."""
    key = (kernel, str(device), str(spec))
    if key not in _VERDICTS:
        try:
            passed = bool(check())
        except Exception as exc:  # compilation or launch errors of any kind: fall back, never fail the load
            log.warning("%s does not run on %s for %s (%s: %s); using another kernel there", kernel, device, spec,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            passed = False
        else:
            if not passed:
                log.warning("%s disagrees with the reference on %s for %s; using another kernel there",
                            kernel, device, spec)
        _VERDICTS[key] = passed
    return _VERDICTS[key]
