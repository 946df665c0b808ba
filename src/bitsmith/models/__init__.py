"""Model sources (HF safetensors folders, GGUF files, aliases) and architecture-as-data.

- :mod:`~bitsmith.models.open`: :func:`open_source`, the front door for a model argument;
- :mod:`~bitsmith.models.sources` (the interface and HF folders), :mod:`~bitsmith.models.gguf_source`,
  :mod:`~bitsmith.models.aliases`: the kinds of source;
- :mod:`~bitsmith.models.family`: the one table of model-family facts, with a generic fallback;
- :mod:`~bitsmith.models.arch`: build a model from a source, find its blocks and linears;
- :mod:`~bitsmith.models.meta`: the architecture alone, on the meta device;
- :mod:`~bitsmith.models.context`: the model's context length, and the check every command makes
  before feeding it a sequence;
- :mod:`~bitsmith.models.hf`, :mod:`~bitsmith.models.errors`: transformers helpers (never running a
  model folder's own code) and the error type.

Heavy dependencies (torch, transformers, gguf) are imported inside functions, so importing this
package stays light.
"""
from bitsmith.models.aliases import ALIASES, alias_names, cache_dir, resolve_alias
from bitsmith.models.arch import block_linears, build_model, embedding_and_head_names, find_blocks
from bitsmith.models.errors import ModelSourceError
from bitsmith.models.family import Family, family_of
from bitsmith.models.meta import meta_model
from bitsmith.models.open import open_source
from bitsmith.models.sources import ModelSource

__all__ = [
    "ALIASES",
    "Family",
    "ModelSource",
    "ModelSourceError",
    "alias_names",
    "block_linears",
    "build_model",
    "cache_dir",
    "embedding_and_head_names",
    "family_of",
    "find_blocks",
    "meta_model",
    "open_source",
    "resolve_alias",
]
