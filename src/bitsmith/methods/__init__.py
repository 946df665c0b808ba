"""Quantization methods: pure functions of a weight tensor, each registered with what it needs.

The registry (:mod:`bitsmith.methods.base`) is re-exported here; importing this package imports the
built-in methods (rtn, hqq, gptq, vq) so that they register themselves.
"""

from bitsmith.methods import gptq, hqq, rtn, vq  # noqa: F401  (registration)
from bitsmith.methods.base import (
    METHODS,
    LayerStats,
    Method,
    MethodInfo,
    Needs,
    get_method,
    method_info,
    needs_calibration,
    register,
)

__all__ = ["METHODS", "LayerStats", "Method", "MethodInfo", "Needs", "get_method", "method_info",
           "needs_calibration", "register"]
