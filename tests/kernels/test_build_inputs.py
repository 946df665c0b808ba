"""The native library's cache key covers every C++ file it is built from."""

from __future__ import annotations

from bitsmith.kernels import build


def test_every_source_and_header_is_in_the_cache_key() -> None:
    """A header left out of HEADERS would let an edited header reuse a library built before the edit."""
    on_disk = {p.name for p in build.CSRC.iterdir() if p.suffix in (".cpp", ".h")}
    listed = {p.name for p in (*build.SOURCES, *build.HEADERS)}
    assert on_disk == listed, f"not in kernels/build.py: {sorted(on_disk - listed)}; listed but missing: {sorted(listed - on_disk)}"
