"""Calibration text written by the reference itself (recover/selfgen.py): the sampler draws from the
model's own next-token distribution (held to a step-by-step oracle without the KV cache), never draws a
banned id, is seeded, and is what distill tunes on with --calib generated."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.tiny import make_tiny_model

import bitsmith
from bitsmith.recover import DistillConfig, distill
from bitsmith.recover.selfgen import GENERATED, sample_windows, sequence_seed, start_token


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("selfgen")
    model = make_tiny_model(root / "m", "llama", hidden_size=64, num_hidden_layers=2)
    bitsmith.quantize(model, root / "q", "w2g32", "rtn")
    return root


def _oracle(model, first: int, samples: int, seq_len: int, seed: int, banned: list[int]) -> torch.Tensor:
    """The same draws from whole-prefix forwards (no cache), one sequence and one step at a time."""
    out = []
    for i in range(samples):
        gen = torch.Generator().manual_seed(sequence_seed(seed, i))
        seq = torch.tensor([[first]])
        for _ in range(1, seq_len):
            logits = model(input_ids=seq).logits[0, -1, :].float()
            logits[banned] = float("-inf")
            seq = torch.cat([seq, torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[None]], dim=1)
        out.append(seq)
    return torch.cat(out)


@pytest.mark.parametrize("samples, batch, seed", [(5, 2, 0), (3, 8, 7)])
def test_samples_follow_the_model_step_by_step(tiny, samples: int, batch: int, seed: int) -> None:
    loaded = bitsmith.load(tiny / "m")
    model = loaded.model.double().eval()  # float64: the cached and uncached logits agree far below any draw's margin
    first = start_token(loaded.tokenizer)
    vocab = model.get_output_embeddings().weight.shape[0]
    banned = [first, vocab - 1]
    got = sample_windows(model, loaded.tokenizer, samples, 12, seed, batch=batch, banned=frozenset(banned))
    assert got.shape == (samples, 12) and (got[:, 0] == first).all()
    assert not torch.isin(got[:, 1:], torch.tensor(banned)).any()
    with torch.no_grad():
        assert torch.equal(got, _oracle(model, first, samples, 12, seed, banned))
    # the windows do not depend on how many are sampled together
    assert torch.equal(got, sample_windows(model, loaded.tokenizer, samples, 12, seed, batch=1, banned=frozenset(banned)))
    again = sample_windows(model, loaded.tokenizer, samples, 12, seed, batch=batch, banned=frozenset(banned))
    other = sample_windows(model, loaded.tokenizer, samples, 12, seed + 1, batch=batch, banned=frozenset(banned))
    assert torch.equal(got, again) and not torch.equal(got, other)


def test_bad_sizes_and_tokenizers_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 tokens"):
        sample_windows(torch.nn.Identity(), object(), 4, 1)
    with pytest.raises(ValueError, match="neither a BOS nor an EOS"):
        start_token(object())


def test_distill_tunes_on_the_generated_windows(tiny, tmp_path, monkeypatch) -> None:
    import bitsmith.recover.distillation as distillation
    from bitsmith.infer.generate import eos_ids
    from bitsmith.runtime.options import RuntimeOptions

    seen = {}

    def capture(model, tokens, *args, **kwargs):
        seen["tokens"] = tokens
        raise KeyboardInterrupt

    monkeypatch.setattr(distillation, "reference_pass", capture)
    cfg = DistillConfig(steps=2, samples=3, seq_len=10, batch=2, calib_text=GENERATED, seed=4)
    with pytest.raises(KeyboardInterrupt):
        distill(tiny / "q", tiny / "m", tmp_path / "d", cfg)
    ref = bitsmith.load(tiny / "m", options=RuntimeOptions.for_measurement())
    want = sample_windows(ref.model.float().eval(), ref.tokenizer, 3, 10, 4, banned=eos_ids(ref.model, ref.tokenizer))
    assert torch.equal(seen["tokens"], want)


def test_generated_with_random_offsets_is_refused_before_work(tiny, tmp_path) -> None:
    with pytest.raises(ValueError, match="generated calibration has no text"):
        distill(tiny / "q", tiny / "m", tmp_path / "d", DistillConfig(calib_text=GENERATED, random_offsets=True))
    assert not (tmp_path / "d").exists()

