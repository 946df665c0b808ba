"""Hardening: an impossible --budget and an unusable --out are refused before the sensitivity pass
(minutes on a real model), the refusal names the reachable range, and the pass itself reports
progress (done/total) instead of a spinner. Also: the destination rule in both quantize loops, and a
second concurrent calibrated run to one --out is refused before it touches the work folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from bitsmith.calib import calibration_batches
from bitsmith.io.checkpoint import CheckpointError
from bitsmith.plan.allocate import AllocationError, Budget
from bitsmith.spec import QuantSpec
from tests.tiny import make_tiny_model, sample_text, tiny_tokenizer

CANDIDATES = "w2g64,w3g64,w4g64,w8"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def _cli(tiny: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", str(tiny), "--method", "rtn", "--candidates", CANDIDATES, "--out", str(out), *extra]


# the tiny model needs at least ~44.6 kB (its embedding and head pinned at the auto w4g64 and w6g64)
@pytest.mark.parametrize("budget", ["0.5bpw", "1.9bpw", "1kB", "44kB"])
def test_impossible_budget_is_refused_before_sensitivity(tiny, tmp_path, no_sensitivity, capsys, budget) -> None:
    from bitsmith.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(_cli(tiny, tmp_path / "q", "--budget", budget))
    text = capsys.readouterr().err
    assert exit_.value.code == 1 and not (tmp_path / "q").exists()
    assert f"the budget {Budget.parse(budget)} cannot be met" in text
    assert re.search(r"take 2\.\d{3} to 8\.\d{3} bits/weight", text), text
    assert re.search(r"checkpoint of [\d.]+ [kM]B to [\d.]+ [kM]B", text), text


def test_reachable_range_is_exact() -> None:
    from bitsmith.plan.allocate import check_budget, reachable_bits

    shapes = {"a": (64, 128), "b": (32, 64)}
    cands = [QuantSpec.parse(s) for s in CANDIDATES.split(",")]
    low, high = reachable_bits(shapes, cands)
    assert low == sum(QuantSpec.parse("w2g64").stored_bits(*s) for s in shapes.values())
    assert high == sum(QuantSpec.parse("w8").stored_bits(*s) for s in shapes.values())
    weights = 64 * 128 + 32 * 64
    check_budget(Budget(bits_per_weight=low / weights), shapes, cands)  # exactly the floor: reachable
    check_budget(Budget(bits_per_weight=100.0), shapes, cands)  # above the range: every layer gets its best
    with pytest.raises(AllocationError, match=r"2\.500 to 8\.\d+ bits/weight"):
        check_budget(Budget(bits_per_weight=(low - 1) / weights), shapes, cands)
    fixed = 8000
    check_budget(Budget(total_bytes=(low + fixed) // 8), shapes, cands, fixed)
    with pytest.raises(AllocationError, match=r"of which 1\.0 kB are fixed"):
        check_budget(Budget(total_bytes=(low + fixed) // 8 - 1), shapes, cands, fixed)
    signs = 128 + 64  # a rotation's sign per input channel of each layer: stored whatever the specs
    check_budget(Budget(bits_per_weight=(low + signs) / weights), shapes, cands, sign_bits=signs)
    with pytest.raises(AllocationError, match=r"2\.519 to 8\.\d+ bits/weight, with 0\.019 bits/weight of rotation signs"):
        check_budget(Budget(bits_per_weight=low / weights), shapes, cands, sign_bits=signs)
    with pytest.raises(AllocationError, match="rotation signs"):
        check_budget(Budget(total_bytes=(low + fixed) // 8), shapes, cands, fixed, sign_bits=signs)


@pytest.mark.parametrize("overwrite", [False, True])
def test_existing_out_is_refused_before_sensitivity(tiny, tmp_path, no_sensitivity, capsys, overwrite) -> None:
    """Without --overwrite any existing --out; with it, a folder bitsmith did not write."""
    from bitsmith.cli import main

    out = tmp_path / "q"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        main(_cli(tiny, out, "--budget", "3.5bpw", *(["--overwrite"] if overwrite else [])))
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and (out / "notes.txt").read_text() == "mine"
    assert ("did not write" if overwrite else "already exists") in err


def test_sensitivity_reports_progress(tiny) -> None:
    from bitsmith.models import open_source
    from bitsmith.pipeline.common import quantizable_layers
    from bitsmith.plan.sensitivity import estimate_sensitivity, float_model

    source = open_source(tiny)
    layers = quantizable_layers(source.config)
    net = float_model(source, layers)
    tokens = calibration_batches(tiny_tokenizer(), sample_text(400), samples=3, seq_len=16)
    cands = [QuantSpec.parse("w4g64"), QuantSpec.parse("w8")]
    for estimator, cap, total in (("fisher", None, 3), ("fisher", 1, 3 * len(layers)), ("measured", None, len(layers))):
        seen = []
        estimate_sensitivity(net, layers, cands, tokens, estimator=estimator, fisher_bytes=cap,
                             progress=lambda what, done, n: seen.append((done, n)))
        assert seen == [(i + 1, total) for i in range(total)], estimator


def test_foreign_out_with_overwrite_is_refused_before_any_work(tiny, tmp_path, monkeypatch) -> None:
    """Both loops apply the destination rule first: a folder bitsmith did not write is refused even
    with --overwrite, before the source is opened."""
    import bitsmith.models as models
    from bitsmith.pipeline.layerwise import quantize_blocks
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(models, "open_source", lambda *a, **k: pytest.fail("the source was opened"))
    plan = QuantizePlan(QuantSpec.parse("w4g32"), "rtn")
    with pytest.raises(CheckpointError, match="did not write"):
        quantize(tiny, out, plan, overwrite=True)
    with pytest.raises(CheckpointError, match="did not write"):
        quantize_blocks(tiny, out, plan, torch.zeros(2, 8, dtype=torch.long), overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_second_concurrent_resume_is_refused_before_the_work_folder(tiny, tmp_path, monkeypatch) -> None:
    """While a calibrated run writes --out, a second one (with --resume) to the same --out is refused
    at once, without opening the shared ``<out>.partial`` work folder; the first run then finishes."""
    import bitsmith.pipeline.layerwise as layerwise
    from bitsmith.pipeline.layerwise import quantize_blocks
    from bitsmith.pipeline.plan import QuantizePlan

    opened = []
    real_open = layerwise.WorkState.open
    monkeypatch.setattr(layerwise.WorkState, "open",
                        staticmethod(lambda *a, **k: opened.append(a[0]) or real_open(*a, **k)))
    calib = calibration_batches(tiny_tokenizer(), sample_text(600), samples=4, seq_len=32)
    plan = QuantizePlan(QuantSpec.parse("w4g32"), "gptq", batch_size=4)
    out, refusals = tmp_path / "q", []

    def second_run(name: str, done: int, total: int) -> None:
        if done == 1:
            with pytest.raises(CheckpointError, match="another bitsmith run") as err:
                quantize_blocks(tiny, out, plan, calib, resume=True)
            refusals.append(err.value)

    path = quantize_blocks(tiny, out, plan, calib, progress=second_run)
    assert refusals and len(opened) == 1  # only the first run opened the work folder
    assert path == out and (out / "model.safetensors").exists()


def test_a_rotating_plan_counts_its_sign_bits_before_sensitivity(tiny, no_sensitivity) -> None:
    """A budget at exactly the candidates' floor is reachable without --rotate and refused with it (the
    signs are stored whatever the specs), before any sensitivity work."""
    from bitsmith.models import open_source
    from bitsmith.pipeline.common import quantizable_layers
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.plan.allocate import reachable_bits
    from bitsmith.plan.sensitivity import check_plan_budget, rotation_sign_bits

    cands = [QuantSpec.parse(s) for s in CANDIDATES.split(",")]
    layers = quantizable_layers(open_source(tiny).config, False, False)
    floor = Budget(bits_per_weight=reachable_bits(layers, cands)[0] / sum(o * i for o, i in layers.values()))
    spec = QuantSpec.parse("w2g64")
    check_plan_budget(tiny, QuantizePlan(spec, "gptq"), floor, cands)
    rotating = QuantizePlan(spec, "gptq", {"rotate": True})
    assert rotation_sign_bits(layers, rotating.options) > 0
    with pytest.raises(AllocationError, match="rotation signs"):
        check_plan_budget(tiny, rotating, floor, cands)
