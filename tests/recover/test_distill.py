"""Recovery by distillation: the reported calibration loss never increases, the written checkpoint
has exactly that loss, the codes stay frozen, and resume == uninterrupted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.recover.resume import resumed_and_whole
from tests.tiny import make_tiny_model, sample_text

import bitsmith
from bitsmith.calib.data import CalibrationConfig
from bitsmith.io.checkpoint import CheckpointError
from bitsmith.recover import DistillConfig, distill
from bitsmith.recover.blockwise import reference_block_outputs
from bitsmith.recover.distillation import calibration_loss, reference_logprobs, reference_pass, state_dir_for
from bitsmith.recover.reference import kl_loss
from bitsmith.runtime.options import RuntimeOptions


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill")
    model = make_tiny_model(root / "m", "llama", hidden_size=64, num_hidden_layers=2)
    text = root / "calib.txt"
    text.write_text(sample_text(1500, seed=3))
    bitsmith.quantize(model, root / "q", "w2g32", "rtn", options={"rotate": True})
    bitsmith.quantize(model, root / "q4", "w4g32", "rtn")  # asymmetric with zeros, unrotated
    bitsmith.quantize(model, root / "vq", "w2g32vq", "vq", options={"rotate": True},
                      calibration=CalibrationConfig(text=str(text), samples=4, seq_len=16))
    return {"model": model, "text": text, "q": root / "q", "q4": root / "q4", "vq": root / "vq"}


def config(setup, **kw) -> DistillConfig:
    base = dict(steps=6, lr=1e-2, samples=4, seq_len=16, batch=2, check_every=2, calib_text=str(setup["text"]))
    return DistillConfig(**{**base, **kw})


def measured(setup, folder: Path, cfg: DistillConfig) -> float:
    exact = RuntimeOptions.for_measurement()
    loaded = bitsmith.load(folder, options=exact)
    ref = bitsmith.load(setup["model"], options=exact)
    tokens = CalibrationConfig(text=cfg.calib_text, samples=cfg.samples, seq_len=cfg.seq_len).batches(loaded.tokenizer)
    return calibration_loss(loaded.model, tokens, reference_logprobs(ref.model, tokens, cfg.batch), cfg.batch)


@pytest.mark.parametrize("which", ["q", "q4"])
def test_loss_decreases_and_checkpoint_has_the_reported_loss(setup, tmp_path: Path, which: str) -> None:
    cfg = config(setup)
    result = distill(setup[which], setup["model"], tmp_path / "d", cfg)
    accepted = [p["kld"] for p in result.curve if p["accepted"]]
    assert all(b < a for a, b in zip(accepted, accepted[1:]))  # strictly better at each accepted check
    assert result.best_loss == accepted[-1] and result.best_loss < result.initial_loss
    assert abs(measured(setup, result.path, cfg) - result.best_loss) <= 1e-5 * result.initial_loss
    assert abs(measured(setup, setup[which], cfg) - result.initial_loss) <= 1e-5 * result.initial_loss
    before, after = load_file(str(setup[which] / "model.safetensors")), load_file(str(result.path / "model.safetensors"))
    assert before.keys() == after.keys()
    qweights = [k for k in before if k.endswith(".qweight")]
    assert qweights and all(torch.equal(before[k], after[k]) for k in qweights)  # codes frozen
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith(".scale"))  # scales tuned
    info = bitsmith.load(result.path).info
    assert info.options["distill"]["kld"] == result.best_loss and info.rotations.keys() == bitsmith.load(setup[which]).info.rotations.keys()
    assert not state_dir_for(tmp_path / "d").exists()  # the work state is removed once the checkpoint is written


def test_a_step_that_raises_the_loss_is_rejected(setup, tmp_path: Path) -> None:
    result = distill(setup["q"], setup["model"], tmp_path / "d", config(setup, lr=3.0, steps=4, check_every=1))
    rejected = [p for p in result.curve if not p["accepted"]]
    assert rejected  # a huge rate overshoots ...
    assert all(p["kld"] >= min(q["kld"] for q in result.curve[: result.curve.index(p)]) for p in rejected)
    assert result.best_loss == min(p["kld"] for p in result.curve)  # ... and the written state is the best one
    assert [p["lr"] for p in result.curve][-1] < 3.0
    assert abs(measured(setup, result.path, config(setup)) - result.best_loss) <= 1e-5 * result.initial_loss


def test_resume_equals_uninterrupted(setup, tmp_path: Path) -> None:
    cfg = config(setup)
    whole = distill(setup["q"], setup["model"], tmp_path / "whole", cfg)

    class Stop(Exception):
        pass

    def stop_after_4(step: int, total: int, last: dict) -> None:
        if step == 5:  # one step past the check at 4: that step is lost and redone on resume
            raise Stop

    with pytest.raises(Stop):
        distill(setup["q"], setup["model"], tmp_path / "part", cfg, progress=stop_after_4)
    assert (state_dir_for(tmp_path / "part") / "state.pt").exists() and not (tmp_path / "part").exists()
    resumed = distill(setup["q"], setup["model"], tmp_path / "part", cfg, resume=True)
    assert resumed.curve == whole.curve
    a, b = load_file(str(whole.path / "model.safetensors")), load_file(str(resumed.path / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings(setup, tmp_path: Path) -> None:
    def stop(step: int, total: int, last: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(setup["q"], setup["model"], tmp_path / "d", config(setup), progress=stop)
    with pytest.raises(CheckpointError, match="other inputs or settings"):
        distill(setup["q"], setup["model"], tmp_path / "d", config(setup, lr=5e-3), resume=True)


def test_bad_requests_fail_before_work(setup, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="steps"):
        distill(setup["q"], setup["model"], tmp_path / "d", config(setup, steps=0))
    with pytest.raises(CheckpointError, match="not a bitsmith checkpoint"):
        distill(setup["model"], setup["model"], tmp_path / "d", config(setup))
    with pytest.raises(ValueError, match="itself quantized"):
        distill(setup["q"], setup["q4"], tmp_path / "d", config(setup))
    (tmp_path / "exists").mkdir()
    with pytest.raises(CheckpointError):
        distill(setup["q"], setup["model"], tmp_path / "exists", config(setup))


def test_cli_prints_the_curve(setup, tmp_path: Path, capsys) -> None:
    from bitsmith.cli import main

    rc = main(["distill", str(setup["q"]), "--reference", str(setup["model"]), "--out", str(tmp_path / "d"),
               "--steps", "2", "--samples", "2", "--seq-len", "16", "--batch", "2", "--lr", "0.01",
               "--calib", str(setup["text"])])
    captured = capsys.readouterr()
    printed = captured.out + captured.err  # the curve goes to the console (stderr), the path to stdout
    assert rc == 0 and "step     0  KLD" in printed and "step     1  KLD" in printed and "calibration KLD" in printed
    assert (tmp_path / "d" / "bitsmith.json").exists()
    with pytest.raises(SystemExit) as exit_info:  # a user mistake: one line, no traceback
        main(["distill", str(setup["q"]), "--reference", str(setup["model"]), "--out", str(tmp_path / "e"), "--steps", "0"])
    assert exit_info.value.code == 1 and "steps must be at least 1" in capsys.readouterr().err


def test_block_stage_then_end_to_end_on_a_vq_checkpoint(setup, tmp_path: Path) -> None:
    cfg = config(setup, block_steps=6, steps=4)
    result = distill(setup["vq"], setup["model"], tmp_path / "d", cfg)
    blocks = result_blocks(result.path)
    assert [b["block"] for b in blocks] == [0, 1]
    assert all(b["error_after"] <= b["error_before"] for b in blocks)  # no block's error rises ...
    assert any(b["accepted"] and b["error_after"] < b["error_before"] for b in blocks)  # ... and some fall
    stage = [p for p in result.curve if p.get("stage") == "blocks"]
    assert len(stage) == 1 and result.curve.index(stage[0]) == 1  # measured end to end after the block stage
    accepted = [p["kld"] for p in result.curve if p["accepted"]]
    assert all(b < a for a, b in zip(accepted, accepted[1:])) and result.best_loss == accepted[-1]
    assert result.best_loss < result.initial_loss
    assert abs(measured(setup, result.path, cfg) - result.best_loss) <= 1e-5 * result.initial_loss
    before, after = load_file(str(setup["vq"] / "model.safetensors")), load_file(str(result.path / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith(".qweight"))  # indices frozen
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith(".grid"))  # codebooks tuned


def result_blocks(path: Path) -> list[dict]:
    import json

    return json.loads((path / "bitsmith.json").read_text())["options"]["distill"]["blocks"]


def test_block_stage_that_does_not_help_end_to_end_is_undone(setup, tmp_path: Path) -> None:
    """A huge block rate wrecks the blocks' outputs; whatever the block records say, the end-to-end
    check after the stage decides, and a rejected stage leaves the starting parameters in place."""
    cfg = config(setup, block_steps=3, block_lr=50.0, steps=1, lr=1e-6, check_every=1)
    result = distill(setup["q"], setup["model"], tmp_path / "d", cfg)
    stage = next(p for p in result.curve if p.get("stage") == "blocks")
    assert stage["accepted"] == (stage["kld"] < result.initial_loss)
    assert result.best_loss <= result.initial_loss
    assert abs(measured(setup, result.path, cfg) - result.best_loss) <= 1e-5 * result.initial_loss


def test_block_stage_alone(setup, tmp_path: Path) -> None:
    cfg = config(setup, block_steps=6, steps=0)
    result = distill(setup["q"], setup["model"], tmp_path / "d", cfg)
    assert [p.get("stage") for p in result.curve] == [None, "blocks"]  # the start, then the stage's check
    # the start is measured in the forward that also captures the blocks' inputs: the same loss
    assert abs(measured(setup, setup["q"], cfg) - result.initial_loss) <= 1e-5 * result.initial_loss
    assert result.best_loss == min(p["kld"] for p in result.curve)
    assert abs(measured(setup, result.path, cfg) - result.best_loss) <= 1e-5 * result.initial_loss
    with pytest.raises(ValueError, match="steps must be at least 1"):
        distill(setup["q"], setup["model"], tmp_path / "e", config(setup, steps=0))


def test_resume_inside_the_block_stage_equals_uninterrupted(setup, tmp_path: Path) -> None:
    cfg = config(setup, block_steps=4, steps=4)
    resumed, whole = resumed_and_whole(setup["vq"], setup["model"], tmp_path, cfg)
    assert resumed.curve == whole.curve and result_blocks(resumed.path) == result_blocks(whole.path)


def test_reference_logprobs_are_the_float32_ones_rounded_to_float16(setup) -> None:
    """Filled in place batch by batch (5 samples in batches of 2: a ragged last batch), each value the
    float32 log-softmax of one whole-set forward, rounded once."""
    ref = bitsmith.load(setup["model"], options=RuntimeOptions.for_measurement())
    tokens = CalibrationConfig(text=str(setup["text"]), samples=5, seq_len=12).batches(ref.tokenizer)
    stored = reference_logprobs(ref.model, tokens, 2)
    with torch.no_grad():
        oracle = torch.log_softmax(ref.model(input_ids=tokens, use_cache=False).logits.float(), dim=-1)
    assert stored.dtype == torch.float16 and stored.shape == oracle.shape
    assert torch.allclose(stored.float(), oracle, rtol=2 ** -10, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_from_float16_reference_matches_float32(seed: int) -> None:
    """Storing the reference log-probs in float16 moves the KL by less than 1e-3 of itself, on a
    49k vocabulary with logits spread like a small LM's (std 3) and a quantized model's (noise std 1)."""
    gen = torch.Generator().manual_seed(seed)
    ref_logits = 3 * torch.randn(3, 17, 49152, generator=gen)
    logits = ref_logits + torch.randn(ref_logits.shape, generator=gen)
    ref_logp = torch.log_softmax(ref_logits, dim=-1)
    exact = float(kl_loss(logits, ref_logp))
    assert exact > 0.1
    assert abs(float(kl_loss(logits, ref_logp.half())) - exact) <= 1e-3 * exact


def test_one_reference_pass_gives_both_the_logprobs_and_the_block_targets(setup) -> None:
    """The combined pass equals the two separate passes (its oracles) bit for bit, ragged last batch."""
    ref = bitsmith.load(setup["model"], options=RuntimeOptions.for_measurement())
    tokens = CalibrationConfig(text=str(setup["text"]), samples=5, seq_len=12).batches(ref.tokenizer)
    logp, targets = reference_pass(ref.model, tokens, 2, blocks=True)
    assert logp.ids is None and torch.equal(logp.logp, reference_logprobs(ref.model, tokens, 2))
    separate = reference_block_outputs(ref.model, tokens, 2)
    assert len(targets) == len(separate) == 2 and all(len(t) == 3 for t in targets)
    assert all(torch.equal(a, b) for ta, tb in zip(targets, separate) for a, b in zip(ta, tb))
    assert reference_pass(ref.model, tokens, 2, blocks=False)[1] is None


@pytest.mark.parametrize("random_offsets, seed", [(False, 0), (True, 0), (True, 5)])
def test_distill_reads_the_calibration_windows_it_is_given(setup, tmp_path: Path, monkeypatch, random_offsets: bool,
                                                           seed: int) -> None:
    """--calib-random: windows drawn across the whole text with the seed, as quantize's --calib-random
    draws them (the default stays consecutive from the start)."""
    import bitsmith.recover.distillation as distillation

    seen = {}

    def capture(model, tokens, *args, **kwargs):
        seen["tokens"] = tokens
        raise KeyboardInterrupt

    monkeypatch.setattr(distillation, "reference_pass", capture)
    cfg = config(setup, random_offsets=random_offsets, seed=seed)
    with pytest.raises(KeyboardInterrupt):
        distill(setup["q"], setup["model"], tmp_path / "d", cfg)
    want = CalibrationConfig(text=cfg.calib_text, samples=cfg.samples, seq_len=cfg.seq_len, seed=seed,
                             random_offsets=random_offsets).batches(bitsmith.load(setup["q"]).tokenizer)
    assert torch.equal(seen["tokens"], want)
    if random_offsets:
        assert not torch.equal(want, CalibrationConfig(text=cfg.calib_text, samples=cfg.samples,
                                                       seq_len=cfg.seq_len).batches(bitsmith.load(setup["q"]).tokenizer))


@pytest.mark.parametrize("flags, want", [(["--calib-random", "--seed", "3"], {"random_offsets": True, "seed": 3}),
                                         (["--calib", "generated", "--seed", "2"], {"calib_text": "generated", "seed": 2})])
def test_cli_calibration_flags_reach_the_config(setup, tmp_path: Path, monkeypatch, flags: list[str], want: dict) -> None:
    import bitsmith.recover as recover
    from bitsmith.cli import main

    seen = {}

    def capture(checkpoint, reference, out, config, **kwargs):
        seen["config"] = config
        raise KeyboardInterrupt

    monkeypatch.setattr(recover, "distill", capture)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        main(["distill", str(setup["q"]), "--reference", str(setup["model"]), "--out", str(tmp_path / "d"), *flags])
    assert {k: getattr(seen["config"], k) for k in want} == want


def test_a_model_with_biased_projections_keeps_its_biases(tmp_path: Path) -> None:
    """Qwen2's q/k/v projections carry biases (frozen, not part of the quantized tensor): the distilled
    checkpoint holds every tensor the input did, biases unchanged, and loads (it once lacked them)."""
    model = make_tiny_model(tmp_path / "m", "qwen2", hidden_size=64, num_hidden_layers=2)
    text = tmp_path / "calib.txt"
    text.write_text(sample_text(800, seed=4))
    bitsmith.quantize(model, tmp_path / "q", "w4g32", "rtn")
    cfg = DistillConfig(steps=2, lr=1e-2, samples=4, seq_len=16, batch=2, calib_text=str(text))
    result = distill(tmp_path / "q", model, tmp_path / "d", cfg)
    before, after = load_file(str(tmp_path / "q" / "model.safetensors")), load_file(str(result.path / "model.safetensors"))
    biases = [k for k in before if k.endswith("proj.bias")]
    assert biases and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in biases)
    assert bitsmith.load(result.path).model is not None
