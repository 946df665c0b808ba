"""--budget with --output-spec: the embedding and head are pinned at the given spec, outside the
allocation. A bits/weight budget counts the allocated (decoder block) layers only, as every bits/weight
figure of the blocks is counted; a size budget counts the pinned tensors' stored bytes as fixed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitsmith.plan.allocate import reachable_bits
from bitsmith.spec import QuantSpec
from tests.tiny import make_tiny_model

CANDIDATES = "w2g32,w4g32"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("pinned") / "m")


def _blocks(tiny: Path) -> dict[str, tuple[int, int]]:
    from bitsmith.models import open_source
    from bitsmith.pipeline.common import quantizable_layers

    return quantizable_layers(open_source(tiny).config, False, False)


def test_budget_layers_splits_pinned_outputs(tiny) -> None:
    from bitsmith.models import open_source
    from bitsmith.pipeline.common import quantizable_layers
    from bitsmith.pipeline.outputs import with_output_spec
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.plan.sensitivity import budget_layers, fixed_bits

    w8 = QuantSpec.parse("w8")
    plan = with_output_spec(QuantizePlan(QuantSpec.parse("w4g32"), "rtn"), tiny, w8)
    source = open_source(tiny)
    free, pinned, fixed = budget_layers(source, plan)
    everything = quantizable_layers(source.config, plan.quantize_head, plan.quantize_embeddings)
    assert free == _blocks(tiny)
    assert set(pinned) == set(everything) - set(free) and len(pinned) == 2 and set(pinned.values()) == {w8}
    pinned_bits = sum(w8.stored_bits(*everything[n]) for n in pinned)
    assert fixed == fixed_bits(source, everything, plan.unquantized_dtype) + pinned_bits
    # without pinned outputs nothing changes: the blocks alone, the rest unquantized
    bare = QuantizePlan(QuantSpec.parse("w4g32"), "rtn")
    assert budget_layers(source, bare) == (free, {}, fixed_bits(source, free, bare.unquantized_dtype))


def _mixing_bpw(blocks: dict[str, tuple[int, int]]) -> float:
    """A bits/weight budget between the candidates' floor and top: the allocation must mix."""
    low, high = reachable_bits(blocks, [QuantSpec.parse(s) for s in CANDIDATES.split(",")])
    return (low + high) / 2 / sum(o * i for o, i in blocks.values())


def test_budget_with_output_spec_end_to_end(tiny, tmp_path, capsys) -> None:
    from bitsmith.cli import main
    from bitsmith.io.checkpoint import read_info

    blocks = _blocks(tiny)
    weights = sum(o * i for o, i in blocks.values())
    bpw = _mixing_bpw(blocks)
    out = tmp_path / "q"
    args = ["quantize", str(tiny), "--method", "rtn", "--candidates", CANDIDATES, "--budget", f"{bpw:.4f}bpw",
            "--output-spec", "w8", "--out", str(out)]
    assert main(args) == 0
    info = read_info(out)
    specs = {k: str(v) for k, v in info.specs.items()}
    assert specs["model.embed_tokens"] == specs["lm_head"] == "w8"
    assert {specs[n] for n in blocks} == set(CANDIDATES.split(","))
    used = sum(QuantSpec.parse(specs[n]).stored_bits(*blocks[n]) for n in blocks)
    assert used <= bpw * weights
    alloc = info.report["allocation"]
    assert alloc["weights"] == weights and alloc["pinned"] == {"model.embed_tokens": "w8", "lm_head": "w8"}
    assert abs(alloc["bits_per_weight"] - used / weights) < 1e-9


def test_budget_below_the_blocks_floor_is_refused_with_pinned_outputs(tiny, tmp_path, capsys, monkeypatch) -> None:
    """The floor is the blocks' own: the pinned w8 tensors do not make a budget unreachable, nor reachable."""
    import bitsmith.plan.sensitivity as sensitivity
    from bitsmith.cli import main

    monkeypatch.setattr(sensitivity, "estimate_sensitivity", lambda *a, **k: pytest.fail("sensitivity ran"))
    blocks = _blocks(tiny)
    low, _ = reachable_bits(blocks, [QuantSpec.parse(s) for s in CANDIDATES.split(",")])
    below = 0.99 * low / sum(o * i for o, i in blocks.values())
    with pytest.raises(SystemExit):
        main(["quantize", str(tiny), "--method", "rtn", "--candidates", CANDIDATES, "--budget", f"{below:.4f}bpw",
              "--output-spec", "w8", "--out", str(tmp_path / "q")])
    assert "cannot be met" in capsys.readouterr().err and not (tmp_path / "q").exists()


@pytest.mark.parametrize("outputs", ["default", "keep"])
def test_budget_pins_the_auto_outputs_unless_kept(tiny, tmp_path, outputs) -> None:
    """Without --output-spec a budget quantizes the embedding and head as a plain quantize does, at the
    auto spec for a body of the budget's bits/weight rounded down (pinned, outside the allocation);
    ``keep`` still leaves them unquantized."""
    import math

    from bitsmith.cli import main
    from bitsmith.io.checkpoint import read_info
    from bitsmith.models import open_source
    from bitsmith.pipeline.outputs import default_embedding_spec, default_output_spec

    blocks = _blocks(tiny)
    bpw = _mixing_bpw(blocks)
    out = tmp_path / "q"
    extra = [] if outputs == "default" else ["--output-spec", "keep"]
    assert main(["quantize", str(tiny), "--method", "rtn", "--candidates", CANDIDATES, "--budget", f"{bpw:.4f}bpw",
                 "--out", str(out), *extra]) == 0
    info = read_info(out)
    specs = {k: str(v) for k, v in info.specs.items()}
    assert {specs[n] for n in blocks} == set(CANDIDATES.split(","))
    if outputs == "keep":
        assert "model.embed_tokens" not in specs and "lm_head" not in specs
        return
    width = open_source(tiny).config.hidden_size
    body = QuantSpec.parse(f"w{math.floor(bpw)}")
    expected = {"model.embed_tokens": str(default_embedding_spec(body, width)), "lm_head": str(default_output_spec(body, width))}
    assert {n: specs[n] for n in expected} == expected
    assert info.report["allocation"]["pinned"] == expected
