"""Mixed precision with vector-codebook candidates (issue 19): ``--budget`` under ``--method vq`` prices
vq specs by their codebook and nearest entries and scalar specs by RTN, allocates both kinds, and the
vq pipeline writes exactly the allocated specs into a checkpoint that loads and runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.tiny import make_tiny_model, sample_text_file, tiny_tokenizer

from bitsmith.spec import QuantSpec

CANDIDATES = [QuantSpec.parse(s) for s in ("w2g32vq", "w3g32vq", "w4g32")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("budgetvq") / "m", "llama", hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    return sample_text_file(tmp_path_factory.mktemp("budgetvqtext"), 3000, seed=1)


@pytest.mark.parametrize("rows, cols", [(40, 64), (33, 96)])
def test_vq_pricing_is_nearest_vq_or_rtn(rows: int, cols: int) -> None:
    from bitsmith.methods import get_method
    from bitsmith.methods.vq import nearest_tensor
    from bitsmith.plan.sensitivity import make_quantizer

    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows))
    name, price = make_quantizer("vq")
    assert name == "vq-nearest"
    vq_spec, scalar = QuantSpec.parse("w2g32vq"), QuantSpec.parse("w3g32")
    assert torch.equal(price(weight, vq_spec), nearest_tensor(weight, vq_spec).weight())
    assert torch.equal(price(weight, scalar), get_method("rtn")(weight, scalar, None, {}).weight())
    # rotated: priced in the rotated basis, returned in the layer's own basis (an error, not a basis change)
    _, rotated = make_quantizer("vq", {"rotate": True})
    for spec in (vq_spec, scalar):
        q = rotated(weight, spec)
        assert not torch.equal(q, price(weight, spec))
        assert (q - weight).norm() < 0.8 * weight.norm()


def test_budget_allocates_vq_and_scalar_and_the_checkpoint_carries_them(tiny: Path, calib_file: Path,
                                                                        tmp_path: Path) -> None:
    from bitsmith.calib import CalibrationConfig
    from bitsmith.io.checkpoint import read_info
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize
    from bitsmith.plan.allocate import Budget
    from bitsmith.plan.sensitivity import plan_allocation, record_allocation
    from bitsmith.runtime.options import RuntimeOptions
    import bitsmith

    calib = CalibrationConfig(text=str(calib_file), samples=4, seq_len=64)
    start = QuantizePlan(QuantSpec.parse("w2g32vq"), "vq", {"rotate": True}, calib=calib)
    budget = Budget.parse("3.6bpw")
    plan, alloc = plan_allocation(tiny, start, budget, CANDIDATES, calib.batches(tiny_tokenizer()))
    grids = {s.grid for s in alloc.specs.values()}
    assert grids == {"vq", "uniform"}, alloc.counts()  # both kinds chosen at this budget
    assert plan.spec.grid == "vq" and plan.layer_specs == alloc.specs
    out = quantize(tiny, tmp_path / "mixed", plan)
    record_allocation(out, alloc)
    info = read_info(out)
    assert info.specs == alloc.specs
    assert info.report["bits_per_weight"] == pytest.approx(alloc.bits_per_weight)
    assert 0.9 * budget.bits_per_weight <= alloc.bits_per_weight <= budget.bits_per_weight
    # the mixed checkpoint runs on the native kernels as on the dequantize-then-matmul oracle
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    outs = {}
    for kernel in ("auto", "reference"):
        loaded = bitsmith.load(out, options=RuntimeOptions(kernel=kernel, prefill="exact", int8_decode=False))
        with torch.no_grad():
            outs[kernel] = loaded.model(ids).logits
    assert torch.allclose(outs["auto"], outs["reference"], atol=2e-4)


def test_cli_budget_with_vq_candidates(tiny: Path, calib_file: Path, tmp_path: Path) -> None:
    from bitsmith.cli import main
    from bitsmith.io.checkpoint import read_info

    out = tmp_path / "cli"
    rc = main(["quantize", str(tiny), "--method", "vq", "--spec", "w2g32vq", "--rotate", "--budget", "4.2bpw",
               "--candidates", "w2g32vq,w3g32vq,w4g32", "--out", str(out), "--calib", str(calib_file),
               "--calib-samples", "3", "--calib-len", "64"])
    assert rc == 0
    info = read_info(out)
    assert info.report["allocation"]["bits_per_weight"] <= 4.2
    pinned = info.report["allocation"]["pinned"]  # the embedding and head at the auto spec, outside the budget
    assert set(pinned) == {"model.embed_tokens", "lm_head"} and len(set(pinned.values())) == 2  # the table narrower
    allocated = {str(s) for name, s in info.specs.items() if name not in pinned}
    assert allocated <= {"w2g32vq", "w3g32vq", "w4g32"}


def test_vq_candidates_without_the_vq_method_are_refused_before_sensitivity(tiny: Path, calib_file: Path,
                                                                            tmp_path: Path, monkeypatch, capsys) -> None:
    import bitsmith.plan.sensitivity as sensitivity
    from bitsmith.cli import main

    def no_pass(*args, **kwargs):
        raise AssertionError("the sensitivity pass ran")

    monkeypatch.setattr(sensitivity, "estimate_sensitivity", no_pass)
    with pytest.raises(SystemExit) as exit_:
        main(["quantize", str(tiny), "--method", "rtn", "--budget", "3.6bpw", "--candidates", "w2g32vq,w4g32",
              "--out", str(tmp_path / "no"), "--calib", str(calib_file)])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "--method vq" in err and "Traceback" not in err
    assert not (tmp_path / "no").exists()


def test_budget_sensitivity_reads_the_text_the_vq_quantize_reads(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    """Without --calib, vq calibrates on the built-in prose + code text; the budget's sensitivity pass
    must score the layers on that text too, not on the prose default."""
    import bitsmith.plan.sensitivity as sensitivity
    from bitsmith.calib.data import PROSE_CODE, calibration_batches, read_calibration_text
    from bitsmith.cli import main
    from bitsmith.models import open_source

    seen = {}

    def stop(model, plan, budget, candidates, tokens, **kwargs):
        seen["tokens"] = tokens
        raise KeyboardInterrupt  # the cli turns it into exit code 130 before any quantizing

    monkeypatch.setattr(sensitivity, "plan_allocation", stop)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        main(["quantize", str(tiny), "--method", "vq", "--spec", "w2g32vq", "--budget", "4.2bpw",
              "--candidates", "w2g32vq,w4g32", "--out", str(tmp_path / "o"), "--calib-samples", "8",
              "--calib-len", "512", "--sensitivity-windows", "8"])
    tokenizer = open_source(tiny).tokenizer()
    expected = calibration_batches(tokenizer, read_calibration_text(PROSE_CODE), 8, 512)
    assert not torch.equal(expected, calibration_batches(tokenizer, read_calibration_text(None), 8, 512))  # reaches code
    assert torch.equal(seen["tokens"], expected)


def test_cli_budget_under_vq_takes_its_main_spec_from_the_candidates(tiny: Path, calib_file: Path, tmp_path: Path,
                                                                    capsys) -> None:
    """--budget replaces --spec: under --method vq the run needs no --spec (it once refused with "use a vq
    spec ... not w4g128", the unused default); candidates without a vq spec are refused before any work."""
    from bitsmith.cli import main
    from bitsmith.io.checkpoint import read_info

    common = ["quantize", str(tiny), "--method", "vq", "--budget", "3.6bpw", "--calib", str(calib_file),
              "--calib-samples", "4", "--calib-len", "64", "--sensitivity-windows", "2"]
    assert main([*common, "--candidates", "w4g32,w2g32vq,w3g32vq", "--out", str(tmp_path / "mixed")]) == 0
    specs = set(read_info(tmp_path / "mixed").specs.values())
    assert {s.grid for s in specs} <= {"vq", "uniform"} and any(s.grid == "vq" for s in specs)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*common, "--candidates", "w4g32,w8", "--out", str(tmp_path / "scalar")])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "needs a vq spec among --candidates" in err and "Traceback" not in err
    assert not (tmp_path / "scalar").exists()
