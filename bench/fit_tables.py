"""Fit tables: the two seed claims (Llama-3-70B at 4 bits on 48 GB; on 24 GB only with offloading)
and the real local models, given as an alias, a local GGUF file and a local HF-style folder.

Each table is exactly what ``bitsmith fit MODEL --memory M --ctx C`` prints, arithmetic included.
Pure arithmetic: runs in seconds, no model weights are read (only GGUF metadata / config.json).

    .venv/bin/python bench/fit_tables.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def cases() -> list[tuple[str, list[str]]]:
    """(title, fit arguments) for every table."""
    from bitsmith.models.aliases import resolve_alias
    from bitsmith.models.sources import ModelSourceError

    out = [
        ("seed claim 1: Llama-3-70B, 4-bit on a 48 GB card", ["llama-3-70b", "--memory", "48GB", "--ctx", "8192"]),
        ("seed claim 2: Llama-3-70B on a 24 GB card (offloading)", ["llama-3-70b", "--memory", "24GB", "--ctx", "8192"]),
        ("seed claim 2 with an 8-bit KV cache", ["llama-3-70b", "--memory", "24GB", "--ctx", "8192", "--kv-bits", "8", "--bits", "4"]),
        ("alias smollm2-135m (read from its GGUF)", ["smollm2-135m", "--memory", "1GB", "--ctx", "8192"]),
        ("alias gemma3-270m (read from its GGUF)", ["gemma3-270m", "--memory", "1.2GB", "--ctx", "8192"]),
        ("alias qwen2.5-coder-1.5b (read from its GGUF)", ["qwen2.5-coder-1.5b", "--memory", "2GB", "--ctx", "8192"]),
    ]
    try:
        gguf = resolve_alias("gemma3-270m")
        out.append((f"local GGUF file {gguf.name}", [str(gguf), "--memory", "4GB", "--ctx", "32768", "--batch", "4"]))
    except ModelSourceError as err:
        print(f"(skipping the GGUF-file table: {err})", file=sys.stderr)
    out.append(("local HF folder (config.json of Qwen2.5-Coder-1.5B)", [str(_hf_folder()), "--memory", "4GB", "--ctx", "32768", "--kv-bits", "8"]))
    return out


def _hf_folder() -> Path:
    """A folder holding the HF config.json of the local Qwen2.5-Coder-1.5B (as its source reports it)."""
    from bitsmith.models import open_source

    folder = Path(tempfile.mkdtemp(prefix="fit-hf-")) / "Qwen2.5-Coder-1.5B-Instruct"
    folder.mkdir()
    config = open_source("qwen2.5-coder-1.5b").config
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    (folder / "config.json").write_text(json.dumps(data, indent=1, default=str))
    return folder


def main() -> int:
    from bitsmith.cli import main as cli

    status = 0
    for title, argv in cases():
        print(f"\n===== {title}\n$ bitsmith fit {' '.join(argv)}", flush=True)
        status |= cli(["fit", *argv])
        sys.stdout.flush()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
