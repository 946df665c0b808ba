"""The calibrated pipeline's allocator policy (pipeline.layerwise with kernels.alloc): freed heap pages kept
for reuse over the whole run, trimmed only beyond a slack. It must change no result."""

from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch
from tests.kernels.test_alloc import FreeLibc
from tests.tiny import make_tiny_model, sample_text, tiny_tokenizer

from bitsmith.calib import calibration_batches
from bitsmith.kernels import alloc
from bitsmith.pipeline import layerwise
from bitsmith.pipeline.layerwise import quantize_blocks
from bitsmith.pipeline.plan import QuantizePlan
from bitsmith.spec import QuantSpec


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("heap") / "llama", "llama", num_hidden_layers=2)


@pytest.fixture(scope="module")
def calib():
    return calibration_batches(tiny_tokenizer(), sample_text(2000), samples=7, seq_len=48)


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("free, in_loop", [(0, False), (1 << 30, False), ((1 << 30) + layerwise.HEAP_SLACK + 1, True)])
def test_run_keeps_the_heap_and_trims_only_beyond_the_slack(model, calib, tmp_path, monkeypatch, free, in_loop):
    """The thresholds are raised for the run and restored after; the trims at phase changes (after the
    capture, after the tensors outside the blocks) always happen, the per-stage (before and after each
    solve) and per-block ones only with more than the replay budget (1 GiB here) plus HEAP_SLACK free."""
    lib = FreeLibc(free)
    monkeypatch.setattr(alloc, "_glibc", lambda: lib)
    plan = replace(QuantizePlan(QuantSpec.parse("w4g32"), "gptq", batch_size=3), replay_bytes=1 << 30)
    quantize_blocks(model, tmp_path / "q", plan, calib)
    raised = [("mallopt", alloc.M_MMAP_THRESHOLD, layerwise.RUN_HEAP_THRESHOLD),
              ("mallopt", alloc.M_TRIM_THRESHOLD, (1 << 30) + layerwise.HEAP_SLACK)]
    restored = [("mallopt", alloc.M_MMAP_THRESHOLD, alloc.LEAN_THRESHOLD),
                ("mallopt", alloc.M_TRIM_THRESHOLD, alloc.LEAN_THRESHOLD), ("trim", 0)]
    assert lib.calls[:2] == raised and lib.calls[-3:] == restored
    inside = lib.calls[2:-3]
    assert all(c == ("trim", 0) for c in inside)
    stages_and_blocks = 2 * (4 + 4 + 1)  # 2 blocks of 4 stages, before and after each solve, and each block's end
    assert len(inside) == 2 + (stages_and_blocks if in_loop else 0)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("compute_dtype", ["fp32", "bf16"])
def test_policy_changes_no_result(model, calib, tmp_path, monkeypatch, threads, compute_dtype):
    """The same checkpoint with the policy (real glibc) and without it (no raised thresholds, a trim at
    every point, as before), at 1 and 2 threads (the batch forwards run in threads at 2)."""
    plan = replace(QuantizePlan(QuantSpec.parse("w4g32"), "gptq", batch_size=3), compute_dtype=compute_dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        kept = _tensors(quantize_blocks(model, tmp_path / "kept", plan, calib))

        @contextmanager
        def nothing(*thresholds):
            yield

        monkeypatch.setattr(layerwise, "heap_reuse", nothing)
        monkeypatch.setattr(layerwise, "HEAP_SLACK", 0)
        trimmed = _tensors(quantize_blocks(model, tmp_path / "trimmed", plan, calib))
    finally:
        torch.set_num_threads(before)
    assert set(kept) == set(trimmed)
    for name in kept:
        assert kept[name].dtype == trimmed[name].dtype and torch.equal(kept[name], trimmed[name]), name
