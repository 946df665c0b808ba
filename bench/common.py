"""Where bench scripts find the public-domain texts they measure on.

The texts ship inside the package (src/bitsmith/data, see its README) so that a fresh clone
measures on exactly the bytes the recorded results used; no bench script reads a path outside
the repository. docs/PROTOCOL.md says which slice is used for what.
"""

from __future__ import annotations

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
