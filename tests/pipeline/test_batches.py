"""Batches in parallel threads (pipeline.batches): the order the caller sees, and a calibrated run
that equals the same run with every batch on the caller's thread."""

import threading

import pytest
import torch
from safetensors.torch import load_file
from tests.tiny import make_tiny_model, sample_text, tiny_tokenizer

from bitsmith.calib import calibration_batches
from bitsmith.pipeline import layerwise, stages
from bitsmith.pipeline.batches import run_batches
from bitsmith.pipeline.layerwise import quantize_blocks
from bitsmith.pipeline.plan import QuantizePlan
from bitsmith.spec import QuantSpec


def test_run_batches_order_first_alone_and_no_grad() -> None:
    log = []
    lock = threading.Lock()

    def fn(b: int) -> int:
        with lock:
            log.append((b, torch.is_grad_enabled(), torch.get_num_threads()))
        return 10 * b

    before = torch.get_num_threads()
    got = list(run_batches(fn, 7, workers=3))
    assert got == [(b, 10 * b) for b in range(7)]
    assert log[0][0] == 0 and all(not grad for _, grad, _ in log)
    assert all(n == 1 for b, _, n in log if b > 0) and torch.get_num_threads() == before
    assert list(run_batches(fn, 0)) == []
    log.clear()  # 4 batches in waves of 2: 0 | 1, 2 | 3, and a wave of one keeps every thread, as batch 0
    assert list(run_batches(fn, 4, workers=2)) == [(b, 10 * b) for b in range(4)]
    threads = {b: n for b, _, n in log}
    assert threads[1] == threads[2] == 1 and threads[0] == threads[3] == before


def _sequential(fn, count, workers=None):
    """The oracle: every batch on the caller's thread, with torch's own intra-op threads."""
    for b in range(count):
        with torch.no_grad():
            yield b, fn(b)


@pytest.mark.parametrize("arch,method", [("llama", "gptq"), ("qwen2", "gptq"), ("gemma3_text", "rtn")])
def test_threaded_batches_equal_sequential(tmp_path, monkeypatch, arch, method) -> None:
    model = make_tiny_model(tmp_path / arch, arch, num_hidden_layers=2)
    calib = calibration_batches(tiny_tokenizer(), sample_text(2000), samples=7, seq_len=40)  # 3 + 3 + 1
    plan = QuantizePlan(QuantSpec.parse("w4g32"), method, batch_size=3)
    fast = quantize_blocks(model, tmp_path / "fast", plan, calib)
    monkeypatch.setattr(stages, "run_batches", _sequential)
    monkeypatch.setattr(layerwise, "run_batches", _sequential)
    slow = quantize_blocks(model, tmp_path / "slow", plan, calib)
    a, b = load_file(str(fast / "model.safetensors")), load_file(str(slow / "model.safetensors"))
    assert set(a) == set(b)
    for name in a:  # one intra-op thread vs several may round a GEMM differently: the same to float noise
        if a[name].is_floating_point():
            torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-3, msg=name)
        else:
            assert (a[name] != b[name]).float().mean() < 0.01, name
