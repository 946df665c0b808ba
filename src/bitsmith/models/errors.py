"""The one error type of model sources, and how its messages spell sizes.

Kept apart from the sources so that every module of :mod:`bitsmith.models` (and the file readers
below it) can raise it without importing the sources themselves.
"""
from __future__ import annotations

__all__ = ["ModelSourceError", "mb"]


class ModelSourceError(ValueError):
    """A model folder or file that cannot be used; the message names the fix."""


def mb(n: int) -> str:
    """A byte count as megabytes, the way error messages show file sizes."""
    return f"{n / 1e6:.1f} MB"
