"""The transformers helpers every model source needs: stay offline, find the causal-LM class, and
never run Python code shipped inside a model folder.

Every transformers ``from_pretrained``/``from_config`` call in bitsmith passes
``trust_remote_code=False``: a folder whose ``config.json`` has an ``auto_map`` names its own Python
files, and transformers would otherwise ask on stdin whether to import them (answering "y" runs them).
:func:`refuse_remote_code` turns such a folder into a clear error before transformers sees it.

transformers is imported inside the functions, so importing this module stays light.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitsmith.models.errors import ModelSourceError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["causal_lm_class", "refuse_remote_code", "set_offline"]


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


def refuse_remote_code(config: dict[str, Any], where: Path) -> None:
    """Refuse a raw ``config.json`` (as read from ``where``) that only the folder's own Python code
    could build: an ``auto_map`` with a ``model_type`` this transformers does not know. A known
    ``model_type`` with an ``auto_map`` (some Qwen and Phi folders) is fine: transformers' own class
    is used and the folder's code is ignored."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if "auto_map" in config and not (isinstance(model_type, str) and model_type in CONFIG_MAPPING):
        raise ModelSourceError(
            f"{where}: this model needs its own Python code (auto_map, model_type {model_type!r}); "
            "bitsmith never runs code from a model folder; use a model whose architecture transformers "
            "supports (llama, qwen2, gemma3, mistral, ...)"
        )


def set_offline() -> None:
    """Never let transformers reach the network from library code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
