"""Plain progress lines for logs: what a long job writes when stderr is not a terminal."""

import io

from bitsmith.cli.common import progress_bar
from bitsmith.cli.progress import LineProgress, clock


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_lines_are_throttled_per_task_and_the_end_is_always_written():
    stream, now = io.StringIO(), Clock()
    bar = LineProgress(stream, interval=30.0, now=now)
    with bar:
        a = bar.add_task("humaneval", total=164, rate="")
        bar.update(a, completed=1)  # first update: a line (the log shows the job started)
        now.t += 10
        bar.update(a, completed=5)  # 10 s later: throttled
        now.t += 25
        bar.update(a, completed=41)  # 35 s after the last line: written, with time left
        b = bar.add_task("reasoning", total=None, rate="")
        bar.update(b, completed=3, rate="3 tok/s")  # another task has its own clock
        now.t += 1
        bar.update(a, completed=164)  # completion: always written, once
        bar.update(a, completed=164)
    lines = stream.getvalue().splitlines()
    assert lines == [
        "humaneval: 1/164 (1%)  0:00 elapsed",  # no estimate from the first seconds
        "humaneval: 41/164 (25%)  0:35 elapsed, ~1:45 left",
        "reasoning: 3  3 tok/s  0:00 elapsed",
        "humaneval: 164/164 (100%)  0:36 elapsed",
    ]


def test_advance_and_total_updates():
    stream, now = io.StringIO(), Clock()
    bar = LineProgress(stream, interval=0.0, now=now)
    t = bar.add_task("quantize w4g128", total=None)
    bar.update(t, advance=2, rate="model.layers.0.mlp")
    bar.update(t, total=4, advance=2)
    assert stream.getvalue().splitlines() == ["quantize w4g128: 2  model.layers.0.mlp  0:00 elapsed",
                                              "quantize w4g128: 4/4 (100%)  model.layers.0.mlp  0:00 elapsed"]


def test_clock_formats_hours():
    assert clock(5) == "0:05" and clock(125) == "2:05" and clock(3723) == "1:02:03"


def test_progress_bar_writes_lines_when_stderr_is_not_a_terminal(monkeypatch):
    from rich.console import Console

    from bitsmith.cli import common

    stream = io.StringIO()
    # a console of its own: setting the shared console's file would pin it to this test's stream afterwards
    monkeypatch.setattr(common, "console", Console(file=stream))  # a StringIO is not a terminal
    with progress_bar() as bar:
        task = bar.add_task("sweep", total=2, rate="")
        bar.update(task, completed=2)
    assert stream.getvalue().strip().startswith("sweep: 2/2 (100%)")
    assert bar.console is common.console  # distill prints its curve through bar.console
