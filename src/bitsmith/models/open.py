"""Open what a user names as a model: a Hugging Face folder, a GGUF file, or an alias.

The one place that tells the kinds of source apart; each source module knows only its own kind.
"""
from __future__ import annotations

import os
from pathlib import Path

from bitsmith.models.aliases import resolve_alias
from bitsmith.models.errors import ModelSourceError
from bitsmith.models.gguf_source import open_gguf
from bitsmith.models.sources import ModelSource, open_hf_folder

__all__ = ["open_source"]


def open_source(model: str | Path) -> ModelSource:
    """Open a Hugging Face folder, a GGUF file, or an alias such as ``smollm2-135m``."""
    path = Path(model).expanduser()
    if path.is_dir():
        return open_hf_folder(path)
    if path.is_file():
        with path.open("rb") as f:
            magic = f.read(4)
        if magic == b"GGUF" or path.suffix.lower() == ".gguf":
            return open_gguf(path)
        raise ModelSourceError(
            f"{path} is neither a model folder nor a GGUF file; pass the folder that holds "
            "config.json and the *.safetensors files, or a .gguf file"
        )
    if path.suffix.lower() == ".gguf" or os.sep in str(model):
        raise ModelSourceError(f"{path} does not exist; check the path")
    return open_gguf(resolve_alias(str(model)))
