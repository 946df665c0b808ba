"""bitsmith: quantize open-weight LLMs, run them, and measure what they kept.

The front door (:mod:`bitsmith.api`): ``bitsmith.quantize``, ``bitsmith.load``, ``bitsmith.evaluate``
and ``bitsmith.QuantSpec``. ``import bitsmith`` stays light: torch and transformers are imported
on the first call, not here. It also registers bitsmith's quantizer with transformers (now if
transformers' quantizer table is loaded, else when it is: :mod:`bitsmith.integrations.hook`), so
``AutoModelForCausalLM.from_pretrained(<bitsmith checkpoint>)`` builds bitsmith's packed layers.
"""

from typing import Any

from bitsmith.integrations.hook import install as install_transformers_hook

__version__ = "0.1.0"
__all__ = ["QuantSpec", "evaluate", "load", "quantize"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from bitsmith import api

        return getattr(api, name)
    raise AttributeError(f"module 'bitsmith' has no attribute {name!r}")


install_transformers_hook()
