"""bitsmith: quantize open-weight LLMs, run them, and measure what they kept.

The front door (:mod:`bitsmith.api`): ``bitsmith.quantize``, ``bitsmith.load``, ``bitsmith.evaluate``
and ``bitsmith.QuantSpec``. ``import bitsmith`` stays light: torch and transformers are imported
on the first call, not here.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["QuantSpec", "evaluate", "load", "quantize"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from bitsmith import api

        return getattr(api, name)
    raise AttributeError(f"module 'bitsmith' has no attribute {name!r}")
