"""The sweep driver on a tiny random model, in this process (the serial executor): every variant
scored, the report written, and a sweep cut short resumes with only the unfinished variants."""

import json

import pytest

from bitsmith.sweep.config import SweepConfig, SweepError, expand_variants
from bitsmith.sweep.driver import Budget, run_sweep
from bitsmith.sweep.executor import SerialExecutor, make_executor
from tests.tiny import make_tiny_model, sample_text


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    model = make_tiny_model(root / "tiny")
    for name, seed in (("a", 1), ("b", 2)):
        (root / f"{name}.txt").write_text(sample_text(700, seed))
    return root, model


def _config(root, model, specs=("w8", "w3g32", "w2g32"), methods=("rtn",), **kw):
    kw = {"ctx": 64, "max_windows": 3, **kw}
    return SweepConfig(model=str(model), variants=expand_variants(list(specs), list(methods)),
                       domains=(f"a={root / 'a.txt'}", f"b={root / 'b.txt'}"), **kw)


class StopAfter(SerialExecutor):
    """A driver that dies (KeyboardInterrupt) after ``n`` finished tasks, as a killed sweep does."""

    def __init__(self, n):
        self.n = n

    def run(self, fn, jobs, resources):
        for i, outcome in enumerate(super().run(fn, jobs, resources)):
            yield outcome
            if i + 1 == self.n:
                raise KeyboardInterrupt


class Recording(SerialExecutor):
    def __init__(self):
        self.seen = []

    def run(self, fn, jobs, resources):
        self.seen += [j.variant.name for j in jobs]
        self.resources = resources
        yield from super().run(fn, jobs, resources)


def test_a_killed_sweep_reruns_only_the_unfinished_variants(setup, tmp_path):
    root, model = setup
    config = _config(root, model)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, tmp_path / "out", StopAfter(1), max_kld=0.05)
    stored = sorted(p.stem for p in (tmp_path / "out" / "results").glob("*.json"))
    assert stored == ["w8-rtn"]
    rerun = Recording()
    outcome = run_sweep(config, tmp_path / "out", rerun, max_kld=0.05, budget=Budget("1GB", 256))
    assert rerun.seen == ["w3g32-rtn", "w2g32-rtn"]
    assert outcome.reused == ["w8-rtn"] and sorted(outcome.ran) == ["w2g32-rtn", "w3g32-rtn"]
    assert [r["name"] for r in outcome.results] == ["w8-rtn", "w3g32-rtn", "w2g32-rtn"]
    assert rerun.resources.memory >= 1e9 and rerun.resources.num_cpus == 1
    # quality falls with the width, on both domains
    for d in ("a", "b"):
        klds = [r["domains"][d]["kld_mean"] for r in outcome.results]
        assert 0 <= klds[0] < klds[1] < klds[2]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["recommendation"]["name"] == outcome.recommendation.name
    assert set(report["frontier"]) == {"a", "b"} and report["fits"]["w8-rtn"]["fits"] is True
    md = (tmp_path / "out" / "report.md").read_text()
    assert "**Recommendation**" in md and "## a" in md and (tmp_path / "out" / "pareto.png").stat().st_size > 0
    third = Recording()  # everything done: nothing runs, the report is drawn again
    assert run_sweep(config, tmp_path / "out", third, max_kld=0.05).ran == [] and third.seen == []
    assert not (tmp_path / "out" / "checkpoints" / "w8-rtn").exists()  # not kept unless asked


def test_a_complete_checkpoint_left_by_a_crash_is_scored_without_quantizing(setup, tmp_path):
    root, model = setup
    config = _config(root, model, specs=("w4g32",), keep_checkpoints=True)
    first = run_sweep(config, tmp_path / "out", SerialExecutor(), max_kld=1.0).results[0]
    assert first["reused_checkpoint"] is False
    (tmp_path / "out" / "results" / "w4g32-rtn.json").unlink()  # crashed after quantizing, before storing
    again = run_sweep(config, tmp_path / "out", SerialExecutor(), max_kld=1.0).results[0]
    assert again["reused_checkpoint"] is True
    assert again["domains"] == first["domains"]


def test_other_settings_in_the_same_folder_are_refused_before_any_work(setup, tmp_path):
    root, model = setup
    run_sweep(_config(root, model, specs=("w8",)), tmp_path / "out", SerialExecutor(), max_kld=1.0)
    never = Recording()
    with pytest.raises(SweepError, match="another ctx"):
        run_sweep(_config(root, model, specs=("w8",), ctx=32), tmp_path / "out", never, max_kld=1.0)
    assert never.seen == []
    with pytest.raises(SweepError, match="max-kld"):
        run_sweep(_config(root, model), tmp_path / "x", never, max_kld=0)
    with pytest.raises(ValueError):
        run_sweep(_config(root, model), tmp_path / "y", never, max_kld=0.1, budget=Budget("lots"))
    assert not (tmp_path / "y").exists()


def test_a_failing_variant_is_reported_and_the_rest_go_on(setup, tmp_path, monkeypatch):
    import bitsmith.sweep.driver as driver

    root, model = setup
    real = driver.run_variant

    def flaky(job):
        if job.variant.spec == "w3g32":
            raise RuntimeError("worker ran out of memory")
        return real(job)

    monkeypatch.setattr(driver, "run_variant", flaky)
    outcome = run_sweep(_config(root, model), tmp_path / "out", SerialExecutor(), max_kld=1.0)
    assert list(outcome.failures) == ["w3g32-rtn"] and "out of memory" in outcome.failures["w3g32-rtn"]
    assert [r["name"] for r in outcome.results] == ["w8-rtn", "w2g32-rtn"]
    assert "w3g32-rtn" in (tmp_path / "out" / "report.md").read_text()


def test_serial_executor_without_ray():
    assert isinstance(make_executor(0), SerialExecutor)
    with pytest.raises(SweepError, match="--workers"):
        make_executor(-1)
