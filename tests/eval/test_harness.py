"""lm-evaluation-harness on bitsmith-loaded models: the adapter's scores against a direct
log-softmax oracle, the shipped local tasks, the CLI (--lm-eval, --report) and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bitsmith.cli import main
from bitsmith.eval.harness import LOCAL_TASKS, HarnessError, split_tasks, tasks_dir
from bitsmith.pipeline.plan import QuantizePlan
from bitsmith.pipeline.quantize import quantize
from bitsmith.runtime.load import load_model
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.spec import QuantSpec

from tests.tiny import make_tiny_model

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("harness")
    return quantize(make_tiny_model(root / "tiny"), root / "ck", QuantizePlan(QuantSpec.parse("w4g32")))


class _Request:  # the one field of lm_eval's Instance the adapter reads
    def __init__(self, *args: object) -> None:
        self.args = args


def _oracle(model: torch.nn.Module, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Log-probability of ``continuation`` after ``context``, one position at a time."""
    total, greedy = 0.0, True
    for i, token in enumerate(continuation):
        with torch.no_grad():
            logits = model(torch.tensor([context + continuation[:i]])).logits[0, -1].double()
        logprobs = torch.log_softmax(logits, -1)
        total += float(logprobs[token])
        greedy &= int(logprobs.argmax()) == token
    return total, greedy


def test_adapter_scores_match_the_oracle(checkpoint: Path) -> None:
    from bitsmith.eval.harness_lm import TorchLM

    loaded = load_model(checkpoint, options=RuntimeOptions(int8_decode=False, prefill="exact"))  # same maths at any length
    lm = TorchLM(loaded.model, loaded.tokenizer)
    g = torch.Generator().manual_seed(0)
    requests = []
    for n_ctx, n_cont in ((5, 1), (9, 3), (2, 6)):
        ctx, cont = torch.randint(0, 100, (n_ctx,), generator=g).tolist(), torch.randint(0, 100, (n_cont,), generator=g).tolist()
        requests.append((("", ""), ctx, cont))
    for (score, greedy), (_, ctx, cont) in zip(lm._loglikelihood_tokens(requests), requests):
        want, want_greedy = _oracle(loaded.model, ctx, cont)
        assert score == pytest.approx(want, abs=1e-3) and greedy == want_greedy
    text = "the cat sat on the mat and the dog sat on the log"
    tokens = lm.tok_encode(text)
    want = _oracle(loaded.model, [lm.eot_token_id], tokens)[0]
    assert lm.loglikelihood_rolling([_Request(text)])[0] == pytest.approx(want, abs=1e-3)
    lm.max_length = 4  # windows of 4 tokens, each after the token before it
    windows = sum(_oracle(loaded.model, [([lm.eot_token_id] + tokens)[s]], tokens[s:s + 4])[0] for s in range(0, len(tokens), 4))
    assert lm.loglikelihood_rolling([_Request(text)])[0] == pytest.approx(windows, abs=1e-3)
    out = lm.generate_until([_Request("the cat", {"until": ["\n"], "max_gen_toks": 4})])
    assert isinstance(out[0], str) and "\n" not in out[0]


def test_harness_hflm_on_a_bitsmith_model_matches_the_oracle(checkpoint: Path) -> None:
    """The issue's path: lm-eval's own HFLM(pretrained=<model bitsmith loaded>) scores a quantized
    model (needs accelerate, which the lm-eval extra installs)."""
    pytest.importorskip("accelerate")
    from lm_eval.models.huggingface import HFLM

    from bitsmith.eval.harness import harness_lm

    loaded = load_model(checkpoint, options=RuntimeOptions(int8_decode=False, prefill="exact"))
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=2)
    assert isinstance(harness_lm(loaded), HFLM)  # bitsmith hands the harness its own HFLM when it can
    g = torch.Generator().manual_seed(1)
    requests = [(("", ""), torch.randint(3, 100, (6,), generator=g).tolist(), torch.randint(3, 100, (n,), generator=g).tolist())
                for n in (1, 3)]
    for (score, greedy), (_, ctx, cont) in zip(lm._loglikelihood_tokens(requests), requests):
        want, want_greedy = _oracle(loaded.model, ctx, cont)
        assert score == pytest.approx(want, abs=1e-3) and greedy == want_greedy


def test_shipped_task_data_is_well_formed() -> None:
    folder = tasks_dir()
    for task in LOCAL_TASKS:
        assert (folder / f"{task}.yaml").is_file()
    mc = [json.loads(line) for line in (folder / "bitsmith_cloze_mc.jsonl").read_text().splitlines()]
    assert len(mc) >= 50 and all(len(d["choices"]) == 4 and len(set(d["choices"])) == 4 and 0 <= d["label"] < 4 for d in mc)
    gen = [json.loads(line) for line in (folder / "bitsmith_cloze_gen.jsonl").read_text().splitlines()]
    assert len(gen) >= 30 and all(d["answer"].isalpha() and d["context"] for d in gen)


def test_cli_runs_both_local_tasks_into_the_report(checkpoint: Path, tmp_path: Path, capsys) -> None:
    out, report = tmp_path / "r.json", tmp_path / "report"
    assert main(["tasks", str(checkpoint), "--lm-eval", ",".join(LOCAL_TASKS), "--lm-eval-limit", "3",
                 "--report", str(report), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bitsmith_cloze_mc" in printed and "exact_match" in printed
    results = json.loads(out.read_text())["lm_eval"]
    assert 0 <= results["bitsmith_cloze_mc"]["acc,none"] <= 1
    assert 0 <= results["bitsmith_cloze_gen"]["exact_match,first_word"] <= 1
    md = (report / "report.md").read_text()
    assert "lm-evaluation-harness" in md and "bitsmith_cloze_gen" in md
    assert len(json.loads((report / "lm_eval.json").read_text())["runs"]) == 1


def test_refusals(checkpoint: Path) -> None:
    with pytest.raises(HarnessError, match="task names"):
        split_tasks(" , ")
    with pytest.raises(SystemExit):
        main(["tasks", str(checkpoint), "--lm-eval", "bitsmith_cloze_mc", "--lm-eval-limit", "0"])


@pytest.mark.slow  # indexes the harness's own task library (~25 s)
def test_unknown_task_is_refused_before_loading(tmp_path: Path) -> None:
    from bitsmith.eval.harness import parse_tasks

    with pytest.raises(HarnessError, match="no task nonexistent_task"):
        parse_tasks("bitsmith_cloze_mc,nonexistent_task")
