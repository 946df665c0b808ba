"""Progress for long commands when stderr is not a terminal (a log file, ``nohup``, CI): plain lines.

rich's live bar draws nothing into a file, so an hour-long ``bitsmith tasks`` or ``quantize`` written to a
log said nothing until it finished. :class:`LineProgress` takes the same calls the subcommands make on a
rich ``Progress`` (``add_task``, ``update``, used as a context manager) and writes one line per task at most
every ``interval`` seconds, plus one when a task completes::

    humaneval: 40/164 (24%) 2:31 elapsed, ~9:22 left
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

LINE_INTERVAL_S = 30.0  # a long job's log gets a line at most this often per task (and one at the end)
ETA_AFTER_S = 10.0  # no time-left estimate before this: one item's time (a model load inside it) says little


def clock(seconds: float) -> str:
    """``1:02:03`` or ``2:03``."""
    s = int(seconds)
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    fields: dict[str, Any]
    started: float
    last_line: float | None = None
    finished: bool = False


@dataclass
class LineProgress:
    """A rich ``Progress`` look-alike that writes plain lines to ``stream``."""

    stream: TextIO
    interval: float = LINE_INTERVAL_S
    now: Callable[[], float] = time.monotonic
    console: Any = None  # rich's Progress has one: commands print lines between updates through ``bar.console``
    tasks: list[_Task] = field(default_factory=list)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        self.tasks.append(_Task(description, total, completed, dict(fields), self.now()))
        return len(self.tasks) - 1

    def update(self, task_id: int, *, completed: float | None = None, total: float | None = None,
               advance: float | None = None, description: str | None = None, **fields: Any) -> None:
        task = self.tasks[task_id]
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        if description is not None:
            task.description = description
        task.fields.update(fields)
        now = self.now()
        done = task.total is not None and task.completed >= task.total
        if done and not task.finished:
            task.finished = True
            self._line(task, now)
        elif not done and (task.last_line is None or now - task.last_line >= self.interval):
            self._line(task, now)

    def _line(self, task: _Task, now: float) -> None:
        task.last_line = now
        elapsed = now - task.started
        parts = [f"{task.description}: {task.completed:,.0f}"]
        if task.total:
            parts[0] += f"/{task.total:,.0f} ({task.completed / task.total:.0%})"
        rate = str(task.fields.get("rate") or "")
        if rate:
            parts.append(rate)
        timing = f"{clock(elapsed)} elapsed"
        if task.total and 0 < task.completed < task.total and elapsed >= ETA_AFTER_S:
            timing += f", ~{clock(elapsed * (task.total - task.completed) / task.completed)} left"
        parts.append(timing)
        self.stream.write("  ".join(parts) + "\n")
        self.stream.flush()
