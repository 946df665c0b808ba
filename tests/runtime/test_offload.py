"""Offloaded execution: streamed blocks compute exactly what resident blocks compute."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bitsmith.runtime.offload import OffloadError, plan_offload
from tests.tiny import make_tiny_model


def test_plan_keeps_a_prefix_and_room_for_one_streamed_block() -> None:
    plan = plan_offload([10, 10, 10, 10], 25)
    assert plan.resident == (0,) and plan.streamed == (1, 2, 3)
    assert plan.peak_bytes <= 25
    assert plan_offload([10, 10, 10, 10], 40).streamed == ()
    assert plan_offload([10, 10, 10, 10], 10).resident == ()
    with pytest.raises(OffloadError, match="at least 30B"):
        plan_offload([10, 30, 10], 20)
    with pytest.raises(OffloadError, match="at least 1.3MB"):
        plan_offload([1_234_567], 10**6)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def checkpoint(request, tmp_path_factory) -> Path:
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize
    from bitsmith.spec import QuantSpec

    root = tmp_path_factory.mktemp(f"offload-{request.param}")
    src = make_tiny_model(root / "src", arch=request.param, num_hidden_layers=4)
    specs = {"model.layers.1.mlp.down_proj": QuantSpec.parse("w4g32nf"), "model.layers.2.self_attn.q_proj": QuantSpec.parse("w8")}
    return quantize(src, root / "ckpt", QuantizePlan(QuantSpec.parse("w4g32"), layer_specs=specs))


def _block_bytes(plan) -> int:
    return sum(plan.block_bytes)


def test_offloaded_forward_is_bit_exact(checkpoint: Path) -> None:
    from bitsmith.runtime.load import load_model

    resident = load_model(checkpoint)
    full = load_model(checkpoint, max_memory=10**12)
    assert full.offload.streamed == ()
    half = load_model(checkpoint, max_memory=_block_bytes(full.offload) // 2)
    assert half.offload.streamed and half.offload.peak_bytes <= half.offload.max_memory
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = resident.model(input_ids=ids).logits
        got = half.model(input_ids=ids).logits
        again = half.model(input_ids=ids).logits  # blocks are rebuilt on every call
    assert torch.equal(want, got) and torch.equal(want, again)
    # released after the block ran: the streamed blocks hold placeholders again
    streamed = half.model.model.layers[half.offload.streamed[0]]
    assert not any(type(m).__name__ == "QuantLinear" for m in streamed.modules())


def test_offloaded_generation_matches_resident(checkpoint: Path) -> None:
    from bitsmith.infer.generate import generate
    from bitsmith.runtime.load import load_model

    resident = load_model(checkpoint)
    plan = load_model(checkpoint, max_memory=10**12).offload
    half = load_model(checkpoint, max_memory=_block_bytes(plan) // 2)
    kw = dict(max_new_tokens=12, stop_at_eos=False)
    want = generate(resident.model, resident.tokenizer, "the cat sat on", **kw)
    got = generate(half.model, half.tokenizer, "the cat sat on", **kw)
    assert got.token_ids == want.token_ids


def test_max_memory_needs_a_checkpoint(tmp_path: Path) -> None:
    from bitsmith.runtime.load import load_model

    src = make_tiny_model(tmp_path / "src")
    with pytest.raises(ValueError, match="quantize it first"):
        load_model(src, max_memory=10**6)


def test_cli_generate_with_max_memory(checkpoint: Path, capsys) -> None:
    import json

    from bitsmith.cli import main

    assert main(["generate", str(checkpoint), "the cat sat on", "--max-new-tokens", "5", "--max-memory", "60KB", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["new_tokens"] >= 1
