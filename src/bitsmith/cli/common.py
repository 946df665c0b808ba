"""Helpers shared by the subcommands: error reporting, progress bars, number formatting, JSON output."""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
out = Console()


class CommandFailed(Exception):
    """Raised inside friendly_errors to exit non-zero with a one-line message."""


@contextlib.contextmanager
def friendly_errors() -> Iterator[None]:
    """User mistakes (bad files, specs, folders) become one line on stderr and exit code 1."""
    try:
        yield
    except (ValueError, FileNotFoundError, FileExistsError, CommandFailed, OSError) as exc:
        msg = " ".join((str(exc) or exc.__class__.__name__).split())  # one line, never wrapped
        sys.stderr.write(f"error: {msg}\n")
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        sys.exit(130)


def progress_bar(transient: bool = True) -> Progress:
    """rich's live bar on a terminal; elsewhere (a log file, CI) plain lines every ``LINE_INTERVAL_S``."""
    if not console.is_terminal:
        from bitsmith.cli.progress import LineProgress

        return LineProgress(console.file, console=console)  # type: ignore[return-value]  # the subset of Progress the commands use
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=transient,
    )


def fmt(value: float | None, digits: int = 4) -> str:
    """A metric for a table or a ``key=value`` line: counts as integers with thousands separators
    (``15,360``, never ``15,360.0``), floats to ``digits`` significant digits or one decimal."""
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if abs(value) >= 100:
        return f"{value:,.1f}"
    return f"{value:.{digits}g}"


def dir_size_mb(path) -> float:
    from pathlib import Path

    p = Path(path)
    if p.is_file():
        return p.stat().st_size / 1e6
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e6


MIN_RATE_SECONDS = 0.5  # a rate over a shorter interval is noise (it once showed 245,799,298 tok/s)


def rate_text(done: int, seconds: float, since_done: int = 0) -> str:
    """``"1,234 tok/s"`` for the tokens done beyond ``since_done`` over ``seconds``; empty until
    MIN_RATE_SECONDS have passed."""
    if seconds < MIN_RATE_SECONDS:
        return ""
    return f"{(done - since_done) / seconds:,.0f} tok/s"


def timed_progress(bar: Progress, task: Any) -> Callable[[int, int], None]:
    """A progress callback that shows tokens/s, timed from its first call: callers often create it
    when the first update arrives, so the work before that call was never timed and must not count."""
    import time

    first: tuple[float, int] | None = None  # (time, tokens done) at the first update

    def update(done: int, total: int) -> None:
        nonlocal first
        now = time.perf_counter()
        if first is None:
            first = (now, done)
        bar.update(task, completed=done, total=total, rate=rate_text(done, now - first[0], first[1]))

    return update


def write_json(dest: str, payload: Any) -> None:
    """JSON to a file, or to stdout for '-'."""
    import json

    text = json.dumps(payload)
    if dest == "-":
        print(text)
    else:
        with open(dest, "w", encoding="utf-8") as f:
            f.write(text + "\n")
