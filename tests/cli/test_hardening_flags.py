"""Rough edges of the command line: flags outside their range are refused with the range (never
silently replaced by a default), counts print as integers, rates only once they mean something, and
the list of methods names every method."""

import re
from pathlib import Path

import pytest
from tests.tiny import make_tiny_model, sample_text

from bitsmith.cli import main
from bitsmith.cli.common import MIN_RATE_SECONDS, fmt, rate_text, timed_progress
from bitsmith.plan.catalog import get_shape
from bitsmith.plan.fit import plan


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("flags") / "tiny")


@pytest.mark.parametrize("flags, message", [
    (["--group-size", "0"], "--group-size 0 is not a group size; use a positive number"),
    (["--group-size", "-32"], "--group-size -32 is not a group size"),
    (["--bits", "9"], "--bits 9 is not a width bitsmith quantizes to; use 2 to 8, or 16"),
    (["--bits", "1"], "--bits 1 is not a width"),
])
def test_fit_refuses_flags_outside_their_range(tiny: Path, flags: list, message: str, capsys) -> None:
    assert main(["fit", str(tiny), "--memory", "1GB", *flags]) == 1
    assert message in capsys.readouterr().err


def test_plan_refuses_group_size_zero_instead_of_ignoring_it() -> None:
    shape = get_shape("llama-3-8b")
    with pytest.raises(ValueError, match="group size must be a positive number"):
        plan(shape, 24 * 10**9, levels=(4,), group_size=0)
    with pytest.raises(ValueError, match="levels must be bit widths from 2 to 8, or 16"):
        plan(shape, 24 * 10**9, levels=(9,))
    assert plan(shape, 24 * 10**9, levels=(4,), group_size=32).level(4).bits_per_weight == 5.0


@pytest.mark.parametrize("flag", ["--cache-topk", "--max-windows"])
def test_zero_is_refused_not_read_as_the_default(tiny: Path, tmp_path: Path, flag: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tiny), "--reference", str(tiny), "--reference-cache", str(tmp_path / "cache"), flag, "0"])
    assert exc.value.code == 2
    assert f"argument {flag}: must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_cache_k_zero_is_an_error_in_the_library(tiny: Path, tmp_path: Path) -> None:
    from bitsmith.eval.domains import Domain, evaluate_domains_cached
    from bitsmith.runtime.load import load_model

    loaded = load_model(tiny)
    domain = Domain("prose", sample_text(300), "sample")
    with pytest.raises(ValueError, match="top-k must be at least 1, got 0"):
        evaluate_domains_cached(tmp_path / "cache", str(tiny), lambda: loaded.model, {"m": loaded.model},
                                loaded.tokenizer, [domain], ctx=32, max_windows=1, k=0)


def test_token_counts_print_as_integers(tiny: Path, tmp_path: Path, capsys) -> None:
    assert fmt(15360) == "15,360" and fmt(62) == "62" and fmt(215.04) == "215.0" and fmt(None) == "-"
    text = tmp_path / "text.txt"
    text.write_text(sample_text(1200))
    capsys.readouterr()
    assert main(["eval", str(tiny), "--text", str(text), "--ctx", "64", "--max-windows", "3",
                 "--report", str(tmp_path / "report")]) == 0
    line = capsys.readouterr().out
    assert re.search(r"tokens=189(\s|$)", line), line
    assert "; 189 scored tokens per model." in (tmp_path / "report" / "report.md").read_text()


class _Bar:
    def __init__(self) -> None:
        self.rates: list[str] = []

    def update(self, task, **fields) -> None:
        self.rates.append(fields["rate"])


def test_no_rate_over_a_near_zero_interval(monkeypatch) -> None:
    assert rate_text(1000, 1e-6) == ""
    assert rate_text(1500, 1.0, since_done=500) == "1,000 tok/s"
    clock = iter([10.0, 10.0 + MIN_RATE_SECONDS / 10, 10.0 + 2.0])
    monkeypatch.setattr("time.perf_counter", lambda: next(clock))
    bar = _Bar()
    update = timed_progress(bar, task=0)
    update(512, 10_000)  # the work before the first update was never timed: no rate
    update(1024, 10_000)  # 512 tokens in 0.05 s: too short to mean anything
    update(4608, 10_000)  # 4,096 tokens in 2 s since the first update
    assert bar.rates == ["", "", "2,048 tok/s"]


def test_unknown_method_lists_every_method(tiny: Path, tmp_path: Path, capsys) -> None:
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.spec import QuantSpec

    with pytest.raises(ValueError, match="choose one of awq, gptq, hqq, rtn"):
        QuantizePlan(QuantSpec.parse("w4g32"), "foo")
    with pytest.raises(SystemExit):
        main(["quantize", str(tiny), "--method", "foo", "--spec", "w4g32", "--out", str(tmp_path / "q")])
    assert "awq" in capsys.readouterr().err
