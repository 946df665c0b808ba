"""The batched decode step (serve/batch.py) against its oracle: each sequence stepped alone by its own
lean runner, on random models and prompts of different lengths (sliding windows included)."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import make_tiny_model, tiny_config

from bitsmith.infer.lean import lean_runner
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.serve.batch import decode_step, ragged_step

EXACT = RuntimeOptions(int8_decode=False, kv_cache="fp32", prefill="exact")
ARCHS = {
    "llama": {},
    "qwen2": {},
    "gemma3_text": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                        final_logit_softcapping=30.0),
}


def random_model(arch: str, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **ARCHS[arch])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() == 1 else 0.08)
    return model


def run_both(model: torch.nn.Module, options: RuntimeOptions, seed: int, steps: int = 6,
             b: int | None = None) -> tuple[list, list]:
    """Prefill b (default 2..4) prompts of random lengths twice; step one copy batched and one alone per sequence."""
    g = torch.Generator().manual_seed(seed)
    b = b or int(torch.randint(2, 5, (1,), generator=g))
    prompts = [torch.randint(0, 100, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g) for _ in range(b)]
    batched = [lean_runner(model, 32, options) for _ in prompts]
    alone = [lean_runner(model, 32, options) for _ in prompts]
    got, want = [], []
    with torch.no_grad():
        for r1, r2, p in zip(batched, alone, prompts):
            r1(p), r2(p)
        for _ in range(steps):
            ids = torch.randint(0, 100, (b,), generator=g).tolist()
            got.append(decode_step(batched, ids))
            want.append(torch.stack([r(torch.tensor([t])) for r, t in zip(alone, ids)]))
    assert [r.pos for r in batched] == [r.pos for r in alone]
    return got, want


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("seed", [0, 1])
def test_batched_step_equals_each_sequence_alone(arch: str, seed: int) -> None:
    model = random_model(arch, seed)
    got, want = run_both(model, EXACT, seed)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0)


def test_batched_step_on_a_quantized_checkpoint(tmp_path) -> None:
    """Packed weights with the default int8-activation decode: the batched gemv against the fused
    single-sequence step (one native call per token); both round activations to int8 per row."""
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize
    from bitsmith.runtime.load import load_model
    from bitsmith.spec import QuantSpec

    src = make_tiny_model(tmp_path / "m", seed=3)
    ckpt = quantize(src, tmp_path / "q", QuantizePlan(QuantSpec.parse("w4g32")))
    options = RuntimeOptions()
    model = load_model(ckpt, options=options).model.eval()
    got, want = run_both(model, options, seed=7)
    wide = run_both(model, options, seed=8, steps=3, b=11)  # more rows than one gemv pass takes: sliced
    for a, b in zip(got + wide[0], want + wide[1]):
        torch.testing.assert_close(a, b, atol=5e-3, rtol=0)
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_mismatched_arguments_are_refused() -> None:
    model = random_model("llama", 0)
    runners = [lean_runner(model, 4, EXACT) for _ in range(2)]
    with pytest.raises(ValueError, match="one id per runner"):
        decode_step(runners, [1])
    for r in runners:
        r(torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="holds 4 positions"):
        decode_step(runners, [1, 2])
    with pytest.raises(ValueError, match="at least one token"):
        ragged_step([lean_runner(model, 8, EXACT)] * 2, [[1], []])


def run_ragged(model: torch.nn.Module, options: RuntimeOptions, seed: int, rounds: int = 4) -> tuple[list, list]:
    """Random mixes of prompt chunks (several tokens, some with all rows' logits) and single decode tokens
    for 2..5 runners, in one ragged step each round, against each runner's own forward on the same tokens."""
    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(2, 6, (1,), generator=g))
    batched = [lean_runner(model, 64, options) for _ in range(b)]
    alone = [lean_runner(model, 64, options) for _ in range(b)]
    got, want = [], []
    with torch.no_grad():
        for _ in range(rounds):
            lengths = [1 if torch.rand((), generator=g) < 0.5 else int(torch.randint(2, 12, (1,), generator=g))
                       for _ in range(b)]
            tokens = [torch.randint(0, 100, (n,), generator=g).tolist() for n in lengths]
            rows = [bool(torch.rand((), generator=g) < 0.5) for _ in range(b)]
            got += ragged_step(batched, tokens, rows)
            want += [r.forward(t, all_logits=a) for r, t, a in zip(alone, tokens, rows)]
    assert [r.pos for r in batched] == [r.pos for r in alone]
    return got, want


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ragged_step_equals_each_sequence_alone(arch: str, seed: int) -> None:
    """Chunked prefill and decode in one forward (sliding windows included: gemma3's window is 4)."""
    model = random_model(arch, seed)
    got, want = run_ragged(model, EXACT, seed)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0)


def test_ragged_step_on_a_quantized_checkpoint(tmp_path) -> None:
    """Packed weights: prompt chunks take the blocked BLAS path, decode rows the gemv; against each
    runner alone (exact float arithmetic on both sides, so the logits agree to float rounding)."""
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize
    from bitsmith.runtime.load import load_model
    from bitsmith.spec import QuantSpec

    src = make_tiny_model(tmp_path / "m", seed=4)
    ckpt = quantize(src, tmp_path / "q", QuantizePlan(QuantSpec.parse("w3g32")))
    model = load_model(ckpt, options=EXACT).model.eval()
    got, want = run_ragged(model, EXACT, seed=5, rounds=5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)
