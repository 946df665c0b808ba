"""`bitsmith demo` (the main job) end to end on a tiny model: both variants quantized, scored and
timed, the table printed, the checkpoints left where it says."""

from pathlib import Path

from tests.tiny import make_tiny_model

from bitsmith.cli import main


def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path: Path, capsys) -> None:
    tiny = make_tiny_model(tmp_path / "tiny", seed=3)
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(tiny), "--specs", "w8,w4g32", "--windows", "1", "--new-tokens", "4",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("│")]
    cells = [[c.strip() for c in line.strip("│").split("│")] for line in rows]
    names = [c[0] for c in cells]
    assert "w8" in names and "w4g32" in names, printed
    for row in (c for c in cells if c[0] in ("w8", "w4g32")):  # every measured column holds a number
        assert all(float(v) >= 0 for v in row[1:] if v), row
    made = sorted(p.name for p in out.iterdir())
    assert made == ["tiny-w4g32", "tiny-w8"]
