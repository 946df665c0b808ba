"""Where bench scripts find the public-domain texts they measure on.

The texts ship inside the package (src/bitsmith/data, see its README) so that a fresh clone
measures on exactly the bytes the recorded results used; no bench script reads a path outside
the repository. docs/PROTOCOL.md says which slice is used for what.
"""

from __future__ import annotations

import math
from importlib.resources import files
from pathlib import Path

# The evaluation prose: the first 60,000 characters of Pride and Prejudice (never calibrated on).
PROSE = "pride_and_prejudice_60k.txt"
# The calibration text: the first 450,000 characters of the State of the Union addresses.
CALIBRATION = "sotu_calibration.txt"


def text_path(name: str = PROSE) -> Path:
    """The path of a text shipped in bitsmith/data (e.g. PROSE or CALIBRATION), checked to exist."""
    path = Path(str(files("bitsmith").joinpath("data", name)))
    if not path.is_file():
        shipped = sorted(p.name for p in path.parent.glob("*.txt"))
        raise FileNotFoundError(f"no shipped text {name!r} in {path.parent}; shipped: {', '.join(shipped)}")
    return path


def block_bpw(path: Path) -> float:
    """Bits per weight of a GGUF file's decoder-block matrices (PROTOCOL section 4): every stored byte
    of the ``blk.*`` tensors with two or more dimensions over the weights they hold. Norms, biases,
    the embedding and the head are left out. Reads only the header."""
    from bitsmith.io.gguf.header import read_header

    infos = [t for t in read_header(path).tensors if t.name.startswith("blk.") and len(t.shape) > 1]
    if not infos:
        raise ValueError(f"{path} holds no decoder-block matrices (blk.*), so it has no block bpw")
    weights = sum(math.prod(t.shape) for t in infos)
    return 8 * sum(t.n_bytes for t in infos) / weights


def report_block_bpw(report: dict, block_layers) -> float:
    """Bits per weight of a bitsmith checkpoint's decoder-block matrices (PROTOCOL section 4) from its
    report: the layers named in ``block_layers`` (``pipeline.common.quantizable_layers`` of the config),
    weighted by their weights. The w8 embedding and head, which the report's own total counts since
    session 15's calibrated path reports the embedding, are left out."""
    rows = [layer for layer in report.get("layers", []) if layer["name"] in block_layers]
    if not rows:
        raise ValueError("the checkpoint's report lists no decoder-block matrices, so it has no block bpw")
    weights = [math.prod(layer["shape"]) for layer in rows]
    return sum(w * layer["bits_per_weight"] for w, layer in zip(weights, rows)) / sum(weights)


WORK_ENV = "BITSMITH_BENCH_WORK"


def work_dir(name: str) -> Path:
    """Scratch folder ``name`` for a benchmark's checkpoints and files: under ``$BITSMITH_BENCH_WORK``,
    else ``~/.cache/bitsmith/bench`` (beside the tools `make bench-tools` installs), never a fixed
    machine path. Created on first use."""
    import os

    root = Path(os.environ.get(WORK_ENV) or "~/.cache/bitsmith/bench").expanduser()
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def best_us(fn, reps: int, flush=None) -> float:
    """The fastest of ``reps`` calls of ``fn``, in microseconds. ``flush`` (a large tensor) is read
    before each call to evict the weights from the caches, as decode meets them: once per token."""
    import time

    best = float("inf")
    for _ in range(reps):
        if flush is not None:
            flush.sum()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e6
