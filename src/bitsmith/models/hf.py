"""The transformers helpers every model source needs: stay offline, find the causal-LM class.

transformers is imported inside the functions, so importing this module stays light.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from bitsmith.models.errors import ModelSourceError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["causal_lm_class", "set_offline"]


def causal_lm_class(config: PretrainedConfig) -> type:
    """The AutoModelForCausalLM class for a config, or a clear error."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ModelSourceError(
            f"unsupported architecture {config.model_type!r}: transformers has no causal language "
            "model for it; bitsmith quantizes decoder LLMs (llama, qwen2, gemma3, mistral, ...)"
        ) from None


def set_offline() -> None:
    """Never let transformers reach the network from library code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
