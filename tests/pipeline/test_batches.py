"""Batches in parallel threads (pipeline.batches): the order the caller sees, and a calibrated run
that equals the same run with every batch on the caller's thread."""

import threading

import pytest
import torch
from safetensors.torch import load_file
from tests.tiny import make_tiny_model, sample_text, tiny_tokenizer

from bitsmith.calib import calibration_batches
from bitsmith.methods import native
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


def _sequential_each(fn, count, consume=None, workers=None):
    """The oracle of for_each_batch: every batch and its consumption on the caller's thread."""
    for b, result in _sequential(fn, count):
        if consume is not None:
            consume(b, result)


@pytest.mark.parametrize("arch,method", [("llama", "gptq"), ("qwen2", "gptq"), ("gemma3_text", "rtn")])
def test_threaded_batches_equal_sequential(tmp_path, monkeypatch, arch, method) -> None:
    model = make_tiny_model(tmp_path / arch, arch, num_hidden_layers=2)
    calib = calibration_batches(tiny_tokenizer(), sample_text(2000), samples=7, seq_len=40)  # 3 + 3 + 1
    plan = QuantizePlan(QuantSpec.parse("w4g32"), method, batch_size=3)
    fast = quantize_blocks(model, tmp_path / "fast", plan, calib)
    monkeypatch.setattr(stages, "run_batches", _sequential)
    monkeypatch.setattr(stages, "for_each_batch", _sequential_each)
    monkeypatch.setattr(layerwise, "for_each_batch", _sequential_each)
    slow = quantize_blocks(model, tmp_path / "slow", plan, calib)
    a, b = load_file(str(fast / "model.safetensors")), load_file(str(slow / "model.safetensors"))
    assert set(a) == set(b)
    for name in a:  # one intra-op thread vs several may round a GEMM differently: the same to float noise
        if a[name].is_floating_point():
            torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-3, msg=name)
        else:
            assert (a[name] != b[name]).float().mean() < 0.01, name


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("count", [0, 1, 2, 3, 4, 7, 8])
def test_for_each_batch_consumes_in_order_with_run_batches_thread_counts(workers: int, count: int) -> None:
    """Every batch consumed once, in batch order, with its own result; each forward at the intra-op thread
    count run_batches gives it (batch 0 and a lone last batch: all; the others: one); nothing under grad."""
    from bitsmith.pipeline.batches import for_each_batch

    lock, threads, consumed = threading.Lock(), {}, []
    expected = {}
    for b, n in run_batches(lambda b: torch.get_num_threads(), count, workers):
        expected[b] = n

    def fn(b: int) -> int:
        assert not torch.is_grad_enabled()
        with lock:
            threads[b] = torch.get_num_threads()
        return 10 * b

    def consume(b: int, result: int) -> None:
        assert not torch.is_grad_enabled()
        consumed.append((b, result))

    before = torch.get_num_threads()
    for_each_batch(fn, count, consume, workers)
    assert consumed == [(b, 10 * b) for b in range(count)]
    assert threads == expected and torch.get_num_threads() == before


def test_for_each_batch_raises_the_first_error_and_stops() -> None:
    """An error in a forward or in consume reaches the caller; no later batch is consumed after it."""
    from bitsmith.pipeline.batches import for_each_batch

    before = torch.get_num_threads()
    for where in ("fn", "consume"):
        consumed = []

        def fn(b: int) -> int:
            if where == "fn" and b == 3:
                raise RuntimeError("boom")
            return b

        def consume(b: int, result: int) -> None:
            if where == "consume" and b == 3:
                raise RuntimeError("boom")
            consumed.append(b)

        with pytest.raises(RuntimeError, match="boom"):
            for_each_batch(fn, 9, consume, workers=2)
        assert consumed == [0, 1, 2] and torch.get_num_threads() == before


SUMMED_ON: set[bool] = set()  # whether a Hessian update ran on the main thread (True) or a worker (False)


def _quantize(tmp_path, name: str, model, calib, workers: int, invariant: bool | None, monkeypatch):
    """A GPTQ run with ``workers`` batch workers on both paths; ``invariant=False`` forces the waves."""
    from bitsmith.calib.stats import StatsAccumulator
    from bitsmith.pipeline import batches

    with monkeypatch.context() as m:
        m.setattr(stages, "run_batches", lambda fn, count, w=None: batches.run_batches(fn, count, workers))
        m.setattr(stages, "for_each_batch", lambda fn, count, consume=None, w=None:
                  batches.for_each_batch(fn, count, consume, workers))
        m.setattr(layerwise, "for_each_batch", lambda fn, count, consume=None, w=None:
                  batches.for_each_batch(fn, count, consume, workers))
        if invariant is not None:
            m.setattr(StatsAccumulator, "thread_invariant", lambda self, dtype: invariant)
        real_add = StatsAccumulator.add

        def add(self, x):
            SUMMED_ON.add(threading.current_thread() is threading.main_thread())
            return real_add(self, x)

        m.setattr(StatsAccumulator, "add", add)
        plan = QuantizePlan(QuantSpec.parse("w4g32"), "gptq", batch_size=3, compute_dtype="bf16")  # bf16: the AMX kernel
        out = quantize_blocks(model, tmp_path / name, plan, calib)
    return load_file(str(out / "model.safetensors"))


@pytest.mark.skipif(native.hessian_library() is None, reason="no AMX: the Hessian is summed between waves")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hessians_summed_in_the_workers_equal_the_serial_and_wave_paths(tmp_path, monkeypatch, arch) -> None:
    """GPTQ with each batch's Hessian update in its worker (for_each_batch) gives the same checkpoint, bit
    for bit, as every batch summed on the caller's thread (one intra-op thread: the serial oracle) at 1 and
    2 workers, and as the waves with the sums between them at 2 intra-op threads (the path before)."""
    model = make_tiny_model(tmp_path / arch, arch, num_hidden_layers=2)
    calib = calibration_batches(tiny_tokenizer(), sample_text(3000), samples=13, seq_len=40)  # 5 batches of 3
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = _quantize(tmp_path, "serial", model, calib, 1, False, monkeypatch)
        for workers in (1, 2):
            SUMMED_ON.clear()
            got = _quantize(tmp_path, f"w{workers}", model, calib, workers, None, monkeypatch)
            assert (False in SUMMED_ON) == (workers == 2)  # 2: the sums in the workers (the head's stay here)
            assert set(got) == set(serial) and all(torch.equal(got[k], serial[k]) for k in got), workers
        torch.set_num_threads(2)
        waves = _quantize(tmp_path, "waves", model, calib, 2, False, monkeypatch)
        SUMMED_ON.clear()
        pooled = _quantize(tmp_path, "pooled", model, calib, 2, None, monkeypatch)
        assert False in SUMMED_ON
        assert set(waves) == set(pooled) and all(torch.equal(waves[k], pooled[k]) for k in waves)
    finally:
        torch.set_num_threads(before)
