"""`bitsmith compare`, `eval --report` with several texts, and `bitsmith tasks` on tiny models."""

import json
import shutil
from pathlib import Path

import pytest
from tests.tiny import make_tiny_model, sample_text

from bitsmith.cli import main
from bitsmith.pipeline.plan import QuantizePlan
from bitsmith.pipeline.quantize import quantize
from bitsmith.spec import QuantSpec


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    tiny = make_tiny_model(root / "tiny")
    for spec in ("w8", "w3g32"):  # plain RTN, no clip search: quick
        quantize(tiny, root / spec, QuantizePlan(QuantSpec.parse(spec), options={"clip_search": False}))
    text = root / "words.txt"
    text.write_text(sample_text(800))
    return root, tiny, text


def test_compare_uses_checkpoint_source_and_writes_report(setup, capsys) -> None:
    root, tiny, text = setup
    out, report = root / "c.json", root / "report"
    args = ["compare", str(root / "w8"), str(root / "w3g32"), "--text", f"words={text}", "--text", "prose",
            "--ctx", "32", "--max-windows", "2", "--json", str(out), "--report", str(report)]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert data["reference"] == str(tiny)  # named by the checkpoints' reports
    assert set(data["domains"]) == {"words", "prose"}
    a, b = data["domains"]["words"]["A"], data["domains"]["words"]["B"]
    assert {"ppl", "ppl_ratio", "kld_mean", "kld_median", "kld_p99", "top1", "dprob_mean"} <= set(b)
    assert b["kld_mean"] > a["kld_mean"] > 0 and data["verdict"].startswith("B is")
    assert data["verdict"] in capsys.readouterr().out.splitlines()
    assert {p.name for p in report.iterdir()} >= {"report.md", "report.json", "pareto.png", "domains.png", "layers.png"}

    # eval with several texts into the same report folder: runs accumulate
    assert main(["eval", str(root / "w3g32"), "--reference", str(tiny), "--text", str(text), "--text", "prose",
                 "--ctx", "32", "--max-windows", "1", "--json", str(out), "--report", str(report)]) == 0
    per_domain = json.loads(out.read_text())["domains"]
    assert set(per_domain) == {"words", "prose"} and per_domain["words"]["kld_mean"] > 0
    assert len(json.loads((report / "report.json").read_text())["runs"]) == 2


def test_compare_defaults_to_a_as_reference(setup, tmp_path: Path) -> None:
    root, tiny, text = setup
    other = make_tiny_model(tmp_path / "other", seed=1)
    out = tmp_path / "c.json"
    assert main(["compare", str(tiny), str(other), "--text", str(text), "--ctx", "32", "--max-windows", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["reference"] == str(tiny)
    words = data["domains"]["words"]
    assert words["A"]["kld_mean"] == 0.0 and words["A"]["top1"] == 1.0 and words["B"]["kld_mean"] > 0.05


def test_compare_refuses_other_tokenizer(setup, tmp_path: Path, capsys) -> None:
    from transformers import AutoTokenizer

    root, tiny, text = setup
    changed = tmp_path / "changed"
    shutil.copytree(tiny, changed)
    tok = AutoTokenizer.from_pretrained(changed)
    tok.add_tokens(["zebra"])
    tok.save_pretrained(changed)
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(tiny), str(changed), "--text", str(text), "--ctx", "32"])
    assert exc.value.code == 1 and "different tokenizers" in capsys.readouterr().err


def test_complete_callable_cuts_at_stop_strings(setup) -> None:
    from bitsmith.eval.tasks import make_complete
    from bitsmith.runtime.load import load_model

    _, tiny, _ = setup
    loaded = load_model(tiny)
    complete = make_complete(loaded.model, loaded.tokenizer, chat=False)
    free = complete("the cat sat on the", 12, [])
    assert isinstance(free, str) and free.strip()
    word = free.split()[1]  # a word the greedy continuation produces (not its first)
    cut = complete("the cat sat on the", 12, [word])
    assert word not in cut and free.startswith(cut)
    assert isinstance(make_complete(loaded.model, loaded.tokenizer, chat=True)("the cat", 3, ["\n"]), str)


def test_tasks_command_json(setup, tmp_path: Path) -> None:
    from bitsmith.eval.tasks import run_tasks

    _, tiny, _ = setup
    out = tmp_path / "t.json"
    assert main(["tasks", str(tiny), "--humaneval", "--limit", "1", "--max-new-tokens", "4", "--no-chat", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["chat"] is False and "reasoning" not in data
    assert data["humaneval"]["n"] == 1 and data["humaneval"]["pass_at_1"] == 0.0
    assert set(data["humaneval"]["status"]) == {"passed", "failed", "error", "timeout"}
    # the reasoning half of the JSON contract, with a stand-in model that always answers "7"
    probe = run_tasks(lambda prompt, n, stop: "7", "fake", False, n_per_family=1).as_dict()["reasoning"]
    assert probe["n"] == 15 and set(probe["by_family"]) == {"arithmetic", "comparison", "counting", "sorting", "substitution"}
    assert set(probe["by_level"]) == {"1", "2", "3"} and 0 <= probe["accuracy"] <= 1
