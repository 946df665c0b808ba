"""Results on disk: atomic, keyed, and what a re-run skips."""

import json

import pytest

from bitsmith.sweep.config import SweepError, Variant, expand_variants, task_memory_bytes
from bitsmith.sweep.store import ResultStore

KEY = {"model": "m", "texts": {"prose": "abc"}, "ctx": 64}


def test_saved_results_are_found_again_and_others_are_pending(tmp_path):
    store = ResultStore.open(tmp_path / "s", KEY)
    store.save({"name": "w4g128-rtn", "size_bytes": 1})
    again = ResultStore.open(tmp_path / "s", KEY)
    assert again.done(["w4g128-rtn", "w8-rtn"]) == {"w4g128-rtn": {"name": "w4g128-rtn", "size_bytes": 1}}
    assert not list((tmp_path / "s" / "results").glob(".*"))  # no temporary file left behind


def test_a_folder_of_another_sweep_or_no_sweep_is_refused(tmp_path):
    ResultStore.open(tmp_path / "s", KEY)
    with pytest.raises(SweepError, match="another ctx"):
        ResultStore.open(tmp_path / "s", {**KEY, "ctx": 128})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(SweepError, match="not a sweep folder"):
        ResultStore.open(tmp_path / "other", KEY)


def test_torn_or_foreign_result_files_count_as_unfinished(tmp_path):
    store = ResultStore.open(tmp_path / "s", KEY)
    results = tmp_path / "s" / "results"
    results.mkdir()
    (results / "a.json").write_text('{"key": ')  # torn (cannot happen through save, but a disk can)
    (results / "b.json").write_text(json.dumps({"key": {**KEY, "ctx": 1}, "result": {"name": "b"}}))
    (results / ".c.json.123.tmp").write_text("{}")  # a crash between write and rename
    store.save({"name": "d"})
    assert list(ResultStore.open(tmp_path / "s", KEY).done(["a", "b", "c", "d"])) == ["d"]
    assert not (results / ".c.json.123.tmp").exists()


def test_variants_are_checked_before_any_work():
    assert [v.name for v in expand_variants(["w8", "W4G128", "w8"], ["rtn", "hqq"])] == [
        "w8-rtn", "w4g128-rtn", "w8-hqq", "w4g128-hqq"]
    with pytest.raises(SweepError, match="--specs"):
        expand_variants(["w9"], ["rtn"])
    with pytest.raises(SweepError, match="unknown method 'gtpq'"):
        expand_variants(["w4"], ["gtpq"])
    with pytest.raises(SweepError, match="at least one"):
        expand_variants([], ["rtn"])
    assert Variant("gptq", "w3g128").name == "w3g128-gptq"


def test_task_memory_grows_with_the_model():
    small, large = task_memory_bytes(135_000_000, 49152, 512), task_memory_bytes(1_500_000_000, 151_936, 512)
    assert 1e9 < small < large and large > 4 * 1.5e9
