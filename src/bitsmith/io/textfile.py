"""The one reader for text a user hands bitsmith (``--text``, ``--calib``, folders of sources).

A binary file decoded leniently turns into replacement characters that tokenize and score like
any text, so a perplexity comes back for a file that is not text at all. This reader decodes
strictly: invalid UTF-8 or a NUL byte is an error that names the byte offset, and so is content
that decodes but is mostly control characters. Valid text comes back exactly as
``Path.read_text(encoding="utf-8")`` returns it (newlines translated the same way), so scores on
real text do not change. Lives in ``io`` (below ``eval`` and ``calib``) so both can use it.
"""
from __future__ import annotations

import re
from pathlib import Path

__all__ = ["NotTextError", "read_text_file"]

# Control characters other than tab, newline, vertical tab, form feed, carriage return and escape
# (ANSI colour codes in logs) are rare in text; more than this share of them means binary content.
MAX_CONTROL_SHARE = 0.01
CONTROL = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f]")


class NotTextError(ValueError):
    """A file given as text that is not UTF-8 text; the message names the file, the byte offset and
    the fix."""


def read_text_file(path: str | Path, what: str = "text file") -> str:
    """The UTF-8 text of ``path`` (``what`` names it in errors, e.g. "calibration text"), with
    ``\\r\\n`` and ``\\r`` read as ``\\n``; raises NotTextError for anything that is not text."""
    p = Path(path)
    raw = p.read_bytes()
    fix = "pass a plain-text file (convert text in another encoding with: iconv -t UTF-8)"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise NotTextError(f"{what} {p} is not UTF-8 text: byte 0x{raw[err.start]:02x} at byte offset "
                           f"{err.start:,} is invalid UTF-8 ({err.reason}); {fix}") from None
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise NotTextError(f"{what} {p} is not text: it holds a NUL byte at byte offset {nul:,} (a binary "
                           f"file?); {fix}")
    control = len(CONTROL.findall(text))
    if control > MAX_CONTROL_SHARE * len(text):
        raise NotTextError(f"{what} {p} is not text: {control:,} of its {len(text):,} characters are control "
                           f"characters (a binary file?); {fix}")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # what text-mode reading (universal newlines) gives
