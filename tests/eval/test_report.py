"""Reports: report.md / report.json / PNG plots, runs accumulating in one folder."""

import json
from pathlib import Path

import pytest

from bitsmith.eval.report import CAVEAT_DEQUANTIZED_GGUF, Run, VariantInfo, load_runs, write_report


def _metrics(kld: float, top1: float) -> dict:
    return {"ppl": 10.0 + kld, "tokens": 100, "kld_mean": kld, "kld_median": kld / 2, "kld_p99": kld * 5,
            "top1": top1, "ref_ppl": 10.0, "dprob_mean": -kld / 10, "ppl_ratio": 1 + kld / 10}


def _run(path: str, spec: str, bits: float, kld: float, layers: tuple = ()) -> Run:
    return Run(command="compare", reference="/models/ref", kl="exact", ctx=512,
               domains={"prose": {"source": "p&p", "tokens": 100}, "code": {"source": "he", "tokens": 100}},
               variants=(VariantInfo("B", path, spec, bits, layers),),
               results={"prose": {"B": _metrics(kld, 0.9)}, "code": {"B": _metrics(2 * kld, 0.8)}},
               verdict="B is slightly worse than A on code.", notes=(CAVEAT_DEQUANTIZED_GGUF,))


def test_report_files_and_accumulation(tmp_path: Path) -> None:
    layers = tuple({"name": f"model.layers.{i}.self_attn.{p}", "sqnr_db": 20.0 + i, "spec": "w4g128", "bits_per_weight": 4.25}
                   for i in range(3) for p in ("q_proj", "v_proj")) + ({"name": "lm_head", "sqnr_db": 25.0},)
    first = write_report(tmp_path, _run("/ckpt/w4", "w4g128", 4.25, 0.05, layers))
    assert {p.name for p in first.plots} == {"pareto.png", "domains.png", "layers.png"}
    for p in first.plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    md = first.markdown.read_text()
    assert "**Verdict:** B is slightly worse than A on code." in md
    assert "dequantized GGUF" in md and "| B | 4.25 | 10.05 |" in md and "![pareto](pareto.png)" in md

    second = write_report(tmp_path, _run("/ckpt/w3", "w3g128", 3.25, 0.3))
    data = json.loads(second.json.read_text())
    assert data["version"] == 1 and len(data["runs"]) == 2
    assert data["runs"][1]["results"]["code"]["B"]["kld_mean"] == 0.6
    assert [r.variants[0].spec for r in load_runs(tmp_path)] == ["w4g128", "w3g128"]
    md = second.markdown.read_text()
    assert "`/ckpt/w4`" in md and "`/ckpt/w3`" in md  # the all-variants table keeps earlier runs
    assert "layers.png" not in md  # the latest run has no per-layer report


def test_domain_bars_cover_every_variant_of_the_folder(tmp_path: Path) -> None:
    """Runs of `eval` add one variant each: the per-domain bars show all of them (latest result per
    variant, same reference as the latest run), highest bits first, labelled by spec."""
    from bitsmith.eval.report import domain_rows

    runs = [_run("/ckpt/w4", "w4g128", 4.25, 0.05), _run("/ckpt/w8", "w8", 8.0, 0.002), _run("/ckpt/w4", "w4g128", 4.25, 0.07)]
    other = _run("/ckpt/w3", "w3g128", 3.25, 0.3)
    other = Run(**{**other.__dict__, "reference": "/models/another"})
    domains, rows = domain_rows([runs[0], other, *runs[1:]])
    assert domains == ["prose", "code"] and list(rows) == ["w8", "w4g128"]  # other reference left out
    assert rows["w4g128"]["code"]["kld_mean"] == pytest.approx(0.14) and rows["w8"]["prose"]["top1"] == 0.9
    same_spec = [_run("/a/w4", "w4g128", 4.25, 0.05), _run("/b/w4", "w4g128", 4.25, 0.06)]
    assert list(domain_rows(same_spec)[1]) == ["/a/w4", "/b/w4"]  # one spec twice: told apart by path


def test_unreadable_report_json_is_refused(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a bitsmith report"):
        write_report(tmp_path, _run("/ckpt/w4", "w4g128", 4.25, 0.05))


def test_importing_the_report_module_stays_light() -> None:
    import subprocess
    import sys

    code = "import sys, bitsmith.eval.report; print('matplotlib' in sys.modules, 'torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == ["False", "False"]
