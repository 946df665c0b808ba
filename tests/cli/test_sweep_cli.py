"""`bitsmith sweep` end to end in this process (--workers 0), and its one-line errors before any work."""

import json
from pathlib import Path

import pytest
from tests.tiny import make_tiny_model, sample_text

from bitsmith.cli import main


def test_sweep_runs_reports_and_resumes(tmp_path: Path, capsys) -> None:
    model = make_tiny_model(tmp_path / "tiny")
    (tmp_path / "a.txt").write_text(sample_text(500, 3))
    args = ["sweep", str(model), "--specs", "w8,w2g32", "--methods", "rtn", "--text", f"a={tmp_path / 'a.txt'}",
            "--ctx", "64", "--max-windows", "2", "--workers", "0", "--max-kld", "0.01", "--budget-memory", "2GB",
            "--no-clip-search", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "recommendation: w8-rtn is the smallest variant" in printed and "w2g32-rtn, exceeds it on a" in printed
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["recommendation"]["name"] == "w8-rtn" and len(report["results"]) == 2
    assert main(args) == 0
    assert "2/2 variants done (0 now, 2 from earlier runs)" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--specs", "w9"], "--specs"),
    (["--methods", "gtpq"], "unknown method 'gtpq'"),
    (["--workers", "-1"], "--workers"),
])
def test_bad_requests_fail_in_one_line_before_any_work(tmp_path: Path, capsys, flags, message) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "no-such-model", *flags, "--out", str(tmp_path / "out")])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
