"""A model's architecture without its weights (on torch's meta device): enough to find blocks and layer names."""

from __future__ import annotations

import torch


def meta_model(config) -> torch.nn.Module:
    """The architecture with no weights: enough to find blocks and layer names."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
