"""--allocation-from: a recorded allocation quantizes the model again with exactly its specs and no
sensitivity pass; a checkpoint without one, another model's, or one given beside --budget is refused
before any work, with a message that says what to give instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitsmith.plan.allocate import reachable_bits
from bitsmith.spec import QuantSpec
from tests.tiny import make_tiny_model

CANDIDATES = "w2g32,w4g32"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("reuse") / "m")


@pytest.fixture(scope="module")
def budgeted(tiny, tmp_path_factory) -> Path:
    """A checkpoint made with a mixing --budget (both candidates allocated)."""
    from bitsmith.cli import main
    from bitsmith.models import open_source
    from bitsmith.pipeline.common import quantizable_layers

    blocks = quantizable_layers(open_source(tiny).config, False, False)
    low, high = reachable_bits(blocks, [QuantSpec.parse(s) for s in CANDIDATES.split(",")])
    bpw = (low + high) / 2 / sum(o * i for o, i in blocks.values())
    out = tmp_path_factory.mktemp("budgeted") / "q"
    assert main(["quantize", str(tiny), "--method", "rtn", "--candidates", CANDIDATES, "--budget", f"{bpw:.4f}bpw",
                 "--out", str(out)]) == 0
    return out


def test_replayed_allocation_gives_the_same_checkpoint(tiny, budgeted, tmp_path, no_sensitivity) -> None:
    from bitsmith.cli import main
    from bitsmith.io.checkpoint import read_info
    from safetensors.torch import load_file

    out = tmp_path / "again"
    assert main(["quantize", str(tiny), "--method", "rtn", "--allocation-from", str(budgeted), "--out", str(out)]) == 0
    first, again = read_info(budgeted), read_info(out)
    assert {k: str(v) for k, v in again.specs.items()} == {k: str(v) for k, v in first.specs.items()}
    assert len({str(v) for v in first.specs.values()}) >= 3  # both candidates and the pinned output spec
    recorded, replayed = first.report["allocation"], again.report["allocation"]
    assert replayed["replayed_from"] == str(budgeted)
    assert replayed["specs"] == recorded["specs"] and replayed["bits_per_weight"] == recorded["bits_per_weight"]
    a, b = load_file(budgeted / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # rtn: the same specs give the same tensors


def test_a_checkpoint_without_an_allocation_is_refused(tiny, tmp_path, capsys, no_sensitivity) -> None:
    from bitsmith.cli import main

    plain = tmp_path / "plain"
    assert main(["quantize", str(tiny), "--method", "rtn", "--spec", "w4g32", "--out", str(plain)]) == 0
    for source, words in [(plain, "records no allocation"), (tiny, "not a bitsmith checkpoint")]:
        with pytest.raises(SystemExit):
            main(["quantize", str(tiny), "--method", "rtn", "--allocation-from", str(source), "--out", str(tmp_path / "q")])
        assert words in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_budget_beside_allocation_from_is_refused(tiny, budgeted, tmp_path, capsys, no_sensitivity) -> None:
    from bitsmith.cli import main

    with pytest.raises(SystemExit):
        main(["quantize", str(tiny), "--method", "rtn", "--allocation-from", str(budgeted), "--budget", "3bpw",
              "--out", str(tmp_path / "q")])
    assert "not both" in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_another_models_allocation_is_refused(budgeted, tmp_path, capsys, no_sensitivity) -> None:
    from bitsmith.cli import main

    deeper = make_tiny_model(tmp_path / "deeper", num_hidden_layers=3)
    with pytest.raises(SystemExit):
        main(["quantize", str(deeper), "--method", "rtn", "--allocation-from", str(budgeted), "--out", str(tmp_path / "q")])
    assert "another model" in capsys.readouterr().err and not (tmp_path / "q").exists()
