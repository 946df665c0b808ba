"""Coverage-guided fuzzing (atheris, i.e. libFuzzer for Python) of bitsmith's binary header readers.

A header reader meets files from the internet: whatever the bytes, it must return a header or raise
one of bitsmith's own errors (an exception class defined in a ``bitsmith`` module, whose message
names the fix). Anything else -- IndexError, OverflowError, RecursionError, MemoryError, a hang -- is
a crash.

    python bench/fuzz/fuzz_readers.py TARGET [--collect] [libFuzzer flags] [CORPUS_DIR ...]

TARGET is one of :data:`TARGETS`. Useful libFuzzer flags: ``-max_total_time=30`` (seconds),
``-timeout=5`` (a hang), ``-rss_limit_mb=2048``, ``-artifact_prefix=bench/fuzz/crashes/``. Without a
corpus directory the run starts from a valid seed file written here. ``--collect`` records every
distinct crash (by exception type and raising line) under ``bench/fuzz/crashes/`` and keeps going,
instead of stopping at the first one as libFuzzer does.

Each target is one small adapter from bytes on disk to the reader function, so that when a reader
moves (the io/ and models/ restructuring) only its adapter changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable

import atheris

with atheris.instrument_imports(include=["bitsmith"]):
    import bitsmith.io.checkpoint  # noqa: F401  (instrumented for coverage feedback)
    import bitsmith.io.safetensors  # noqa: F401
    import bitsmith.io.gguf.header  # noqa: F401

CRASH_DIR = Path(__file__).resolve().parent / "crashes"


# -- adapters: bytes in a file -> the reader under test (repoint these after a move) -------------


def read_gguf(path: Path) -> object:
    """The one GGUF header reader, both ways: arrays skipped (sources, inspect) and read (export)."""
    from bitsmith.io.gguf.header import read_header

    read_header(path)
    return read_header(path, arrays=True)


def read_safetensors(path: Path) -> object:
    from bitsmith.io.safetensors import read_header

    return read_header(path)


def read_checkpoint(path: Path) -> object:
    """The fuzzed bytes as the one shard (``model.safetensors``) of a checkpoint folder: the shard
    header's ``__metadata__`` (format, version, the quantization JSON) is what ``read_info`` parses."""
    from bitsmith.io.checkpoint import read_info

    return read_info(path.parent)


# -- seeds: one small valid file per format ------------------------------------------------------


def _gguf_string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def seed_gguf() -> bytes:
    """GGUF v3: two metadata values (a string, a uint32 alignment, an array) and one F32 [2, 4] tensor."""
    kv = (_gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string("llama")
          + _gguf_string("general.alignment") + struct.pack("<II", 4, 32)
          + _gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + _gguf_string("a") + _gguf_string("b"))
    tensor = _gguf_string("t.weight") + struct.pack("<IQQIQ", 2, 4, 2, 0, 0)
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 3) + kv + tensor
    head += b"\0" * (-len(head) % 32)
    return head + struct.pack("<8f", *range(8))


def seed_safetensors() -> bytes:
    header = {"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "y": {"dtype": "U8", "shape": [3], "data_offsets": [16, 19]}, "__metadata__": {"format": "pt"}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + struct.pack("<4f", 1, 2, 3, 4) + b"\1\2\3"


def seed_checkpoint() -> bytes:
    """A bitsmith checkpoint's shard: one w4g32 layer (qweight, scale, zero) and the format metadata."""
    quant = {"method": "rtn", "options": {}, "tensors": {"l": {"spec": "w4g32", "shape": [2, 32]}}}
    meta = {"format": "bitsmith", "format_version": "1", "quantization": json.dumps(quant)}
    header = {"l.qweight": {"dtype": "U8", "shape": [2, 16], "data_offsets": [0, 32]},
              "l.scale": {"dtype": "F16", "shape": [2, 1], "data_offsets": [32, 36]},
              "l.zero": {"dtype": "F16", "shape": [2, 1], "data_offsets": [36, 40]}, "__metadata__": meta}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(32) + struct.pack("<4e", 1, 1, 8, 8)


TARGETS: dict[str, tuple[Callable[[Path], object], Callable[[], bytes], str]] = {
    "gguf": (read_gguf, seed_gguf, ".gguf"),
    "safetensors": (read_safetensors, seed_safetensors, ".safetensors"),
    "checkpoint": (read_checkpoint, seed_checkpoint, ""),
}


def is_expected(exc: BaseException) -> bool:
    """bitsmith's own errors (a class defined in a bitsmith module) are the reader doing its job."""
    return isinstance(exc, Exception) and type(exc).__module__.split(".")[0] == "bitsmith"


def crash_key(exc: BaseException) -> str:
    """Exception type and the innermost bitsmith line it came from: one entry per distinct bug."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "bitsmith" in f.filename]
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    return f"{type(exc).__name__}@{where}"


def make_test(target: str, collect: bool) -> Callable[[bytes], None]:
    reader, _, suffix = TARGETS[target]
    folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    path = folder / f"bitsmith-fuzz-{os.getpid()}{suffix}"
    if target == "checkpoint":  # a folder of its own, whose one shard is the input
        path = folder / f"bitsmith-fuzz-{os.getpid()}-checkpoint" / "model.safetensors"
        path.parent.mkdir(exist_ok=True)
    seen: set[str] = set()

    def test_one_input(data: bytes) -> None:
        path.write_bytes(data)
        try:
            reader(path)
        except Exception as exc:  # noqa: BLE001 -- sorting expected errors from crashes is the point
            if is_expected(exc):
                return
            if not collect:
                raise
            key = crash_key(exc)
            if key not in seen:
                seen.add(key)
                CRASH_DIR.mkdir(exist_ok=True)
                name = f"{target}-{key.replace('@', '-').replace(':', '-')}-{hashlib.sha1(data).hexdigest()[:8]}"
                (CRASH_DIR / name).write_bytes(data)
                print(f"\nCRASH {key}: {exc!r:.200} -> {CRASH_DIR / name}", flush=True)

    return test_one_input


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: {argv[0]} {{{','.join(TARGETS)}}} [--collect] [libFuzzer flags] [CORPUS_DIR ...]")
    target, rest = argv[1], argv[2:]
    collect = "--collect" in rest
    rest = [a for a in rest if a != "--collect"]
    if not any(not a.startswith("-") for a in rest):  # no corpus given: start from the valid seed
        corpus = Path(tempfile.mkdtemp(prefix=f"bitsmith-fuzz-{target}-"))
        (corpus / "seed").write_bytes(TARGETS[target][1]())
        rest.append(str(corpus))
    sys.setrecursionlimit(2000)  # deep JSON nesting must end as an error, not exhaust the C stack
    atheris.Setup([argv[0], *rest], make_test(target, collect))
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
