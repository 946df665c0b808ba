"""Distillation against the reference's top k (large vocabularies): the loss is eval.refcache's lower
bound, equal to the exact KL (and its gradient) when k = V, never above it otherwise; a run on it
keeps the house rules (the reported loss never rises, the checkpoint has it, resume == uninterrupted),
on a llama and on a Gemma-3 (sandwich norms, tied embeddings) alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.recover.resume import resumed_and_whole
from tests.tiny import make_tiny_model, sample_text

import bitsmith
from bitsmith.calib.data import CalibrationConfig
from bitsmith.eval.refcache import topk_and_rest
from bitsmith.recover import DistillConfig, distill
from bitsmith.recover.distillation import calibration_loss, reference_pass
from bitsmith.recover.reference import ReferenceTargets, TargetStore, kl_loss, topk_kl_loss
from bitsmith.runtime.options import RuntimeOptions


def random_pair(seed: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference and quantized logits spread like a small LM's (std 3, noise std 1)."""
    gen = torch.Generator().manual_seed(seed)
    ref = 3 * torch.randn(shape, generator=gen)
    return ref, ref + torch.randn(shape, generator=gen)


def targets_of(ref_logits: torch.Tensor, k: int | None) -> ReferenceTargets:
    store = TargetStore(tuple(ref_logits.shape[:2]), k)
    store.add(0, ref_logits)
    return store.targets


@pytest.mark.parametrize("seed,shape", [(0, (2, 7, 301)), (1, (3, 5, 1000)), (2, (1, 13, 257))])
def test_topk_loss_at_k_equal_v_is_the_exact_kl_and_gradient(seed: int, shape: tuple[int, ...]) -> None:
    ref_logits, logits = random_pair(seed, shape)
    vocab = shape[-1]
    values, ids, rest = topk_and_rest(torch.log_softmax(ref_logits, -1), vocab)
    exact_logits, top_logits = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    exact = kl_loss(exact_logits, torch.log_softmax(ref_logits, -1))
    bound = topk_kl_loss(top_logits, values, ids, rest)
    exact.backward()
    bound.backward()
    assert abs(float(bound.detach()) - float(exact.detach())) <= 1e-3 * float(exact.detach())  # float16 log-probs, renormalised
    assert torch.allclose(top_logits.grad, exact_logits.grad, rtol=1e-2, atol=1e-3 * float(exact_logits.grad.abs().max()))


@pytest.mark.parametrize("k", [1, 16, 64, 256])
def test_topk_loss_is_a_lower_bound_that_tightens_with_k(k: int) -> None:
    ref_logits, logits = random_pair(7, (2, 9, 4000))
    exact = float(kl_loss(logits, torch.log_softmax(ref_logits, -1)))
    bounds = [float(targets_of(ref_logits, kk).kl(logits)) for kk in (k, 2 * k)]
    assert 0 < bounds[0] <= bounds[1] * (1 + 1e-6) and bounds[1] <= exact * (1 + 1e-3)


def test_target_store_fills_ragged_batches_like_one_pass() -> None:
    ref_logits, _ = random_pair(3, (5, 6, 500))
    store = TargetStore((5, 6), 32)
    for start in (0, 2, 4):  # batches of 2, the last one ragged
        store.add(start, ref_logits[start:start + 2])
    values, ids, rest = topk_and_rest(torch.log_softmax(ref_logits, -1), 32)
    got = store.targets
    assert torch.equal(got.logp, values) and torch.equal(got.ids, ids) and torch.equal(got.rest, rest)
    assert got[2:4].ids.shape == (2, 6, 32) and torch.equal(got[2:4].rest, rest[2:4])
    whole = targets_of(ref_logits, 500)  # k >= V: the whole vocabulary, the exact loss
    assert whole.ids is None and whole.logp.shape == (5, 6, 500)


def test_config_says_when_the_top_k_is_kept() -> None:
    cfg = DistillConfig(ref_topk=256, ref_topk_above=65_536)
    assert cfg.topk_for(49_152) is None and cfg.topk_for(65_536) is None and cfg.topk_for(262_144) == 256
    with pytest.raises(ValueError, match="ref_topk"):
        DistillConfig(ref_topk=0).validate()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("topk")
    text = root / "calib.txt"
    text.write_text(sample_text(1500, seed=4))
    calib = CalibrationConfig(text=str(text), samples=4, seq_len=16)
    out = {"text": text}
    for arch, extra in (("llama", {}), ("gemma3_text", {"tie_word_embeddings": True, "intermediate_size": 128})):
        model = make_tiny_model(root / arch, arch, hidden_size=64, num_hidden_layers=2, **extra)
        bitsmith.quantize(model, root / f"{arch}-vq", "w2g32vq", "vq", options={"rotate": True}, calibration=calib)
        out[arch] = (model, root / f"{arch}-vq")
    return out


def config(models, **kw) -> DistillConfig:  # top 16 of the tiny vocabulary's 117
    base = dict(steps=4, lr=1e-2, samples=4, seq_len=16, batch=2, check_every=2, calib_text=str(models["text"]),
                block_steps=4, block_lr=1e-2, ref_topk=16, ref_topk_above=0)
    return DistillConfig(**{**base, **kw})


def losses(model: Path, folder: Path, cfg: DistillConfig) -> tuple[float, float]:
    """(KL~ against the top 16, exact KL) of the checkpoint at ``folder`` on the calibration tokens."""
    exact = RuntimeOptions.for_measurement()
    loaded, ref = bitsmith.load(folder, options=exact), bitsmith.load(model, options=exact)
    tokens = CalibrationConfig(text=cfg.calib_text, samples=cfg.samples, seq_len=cfg.seq_len).batches(loaded.tokenizer)
    top = reference_pass(ref.model, tokens, cfg.batch, False, cfg.ref_topk)[0]
    full = reference_pass(ref.model, tokens, cfg.batch, False, None)[0]
    assert top.ids is not None and full.ids is None
    return (calibration_loss(loaded.model, tokens, top, cfg.batch),
            calibration_loss(loaded.model, tokens, full, cfg.batch))


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_distill_on_the_top_k_keeps_the_house_rules(models, tmp_path: Path, arch: str) -> None:
    model, start = models[arch]
    cfg = config(models)
    result = distill(start, model, tmp_path / "d", cfg)
    accepted = [p["kld"] for p in result.curve if p["accepted"]]
    assert all(b < a for a, b in zip(accepted, accepted[1:])) and result.best_loss == accepted[-1]
    assert result.best_loss < result.initial_loss
    bound_before, exact_before = losses(model, start, cfg)
    bound_after, exact_after = losses(model, result.path, cfg)
    assert abs(bound_before - result.initial_loss) <= 1e-5 * result.initial_loss
    assert abs(bound_after - result.best_loss) <= 1e-5 * result.initial_loss  # the checkpoint has the reported loss
    assert bound_before <= exact_before * (1 + 1e-3) and bound_after <= exact_after * (1 + 1e-3)  # a lower bound
    assert exact_after < exact_before  # and the exact KL falls with it here


def test_resume_on_the_top_k_equals_uninterrupted(models, tmp_path: Path) -> None:
    model, start = models["gemma3_text"]
    resumed, whole = resumed_and_whole(start, model, tmp_path, config(models))
    assert resumed.curve == whole.curve
