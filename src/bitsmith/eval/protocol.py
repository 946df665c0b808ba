"""Fixed numbers of the measurement protocol, importable without torch.

The CLI's ``--help`` shows these defaults, so they live apart from the evaluation code (which
imports torch) and are defined once.
"""
from __future__ import annotations

__all__ = ["MAX_CHARS"]

MAX_CHARS = 60_000  # docs/PROTOCOL.md: the first 60,000 characters of each dev text
