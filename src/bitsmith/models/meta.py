"""A model's architecture without its weights, on the meta device.

Enough to find the decoder blocks, their linears and the embedding/head names of a config
before (or without) reading any tensor.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig

__all__ = ["meta_model"]


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The architecture with no weights: enough to find blocks and layer names."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
