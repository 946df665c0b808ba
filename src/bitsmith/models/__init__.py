"""Model sources (HF safetensors folders, GGUF files, aliases) and architecture-as-data.

Heavy dependencies (torch, transformers, gguf) are imported inside functions, so importing this
package stays light.
"""
from bitsmith.models.aliases import ALIASES, alias_names, cache_dir, resolve_alias
from bitsmith.models.arch import block_linears, build_model, embedding_and_head_names, find_blocks
from bitsmith.models.sources import ModelSource, ModelSourceError, open_source

__all__ = [
    "ALIASES",
    "ModelSource",
    "ModelSourceError",
    "alias_names",
    "block_linears",
    "build_model",
    "cache_dir",
    "embedding_and_head_names",
    "find_blocks",
    "open_source",
    "resolve_alias",
]
