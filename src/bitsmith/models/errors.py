"""The one error type of model sources.

Kept apart from the sources so that every module of :mod:`bitsmith.models` (and the file readers
below it) can raise it without importing the sources themselves.
"""
from __future__ import annotations

__all__ = ["ModelSourceError"]


class ModelSourceError(ValueError):
    """A model folder or file that cannot be used; the message names the fix."""
