"""``--device`` for calibrated quantization (pipeline.device): refusals before any work, ``device="cpu"``
identical to no device at all, and the CPU-only paths (native kernels, AMX, fpmath) skipped for tensors
off the CPU. CUDA itself is not here: meta tensors stand in for "not on the CPU", and
bench/gpu_session.py runs the real thing where a GPU is lent."""

import json
from pathlib import Path

import pytest
import torch
from tests.tiny import make_tiny_model, sample_text, tiny_tokenizer

from bitsmith.calib import calibration_batches
from bitsmith.calib.stats import StatsAccumulator
from bitsmith.cli import main
from bitsmith.methods import native
from bitsmith.methods.gptq import gptq_walk
from bitsmith.pipeline.device import NO_CUDA, batch_workers, check_device, check_device_plan, to_device
from bitsmith.pipeline.layerwise import quantize_blocks
from bitsmith.pipeline.plan import QuantizePlan
from bitsmith.spec import QuantSpec


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("device") / "tiny", "qwen2", num_hidden_layers=2)


@pytest.fixture
def two_gpus(monkeypatch) -> None:
    """A torch that says it has two CUDA devices (nothing here computes on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_device_names_are_checked(monkeypatch, two_gpus) -> None:
    assert check_device("cpu") == "cpu" and check_device(" CUDA:1 ") == "cuda:1" and check_device("cuda") == "cuda"
    for bad in ("gpu", "cuda:", "cuda:x", "cpu:0", "cuda:-1", ""):
        with pytest.raises(ValueError, match="unknown device"):
            check_device(bad)
    with pytest.raises(ValueError, match="cuda:2 does not exist: this machine has 2 CUDA device"):
        check_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as err:
        check_device("cuda")
    assert str(err.value) == NO_CUDA == "this torch has no CUDA: install a CUDA build of torch or use --device cpu"


def test_plans_the_device_cannot_run_are_refused(two_gpus) -> None:
    spec = QuantSpec.parse("w4g32")
    assert QuantizePlan(spec, "gptq", device="cuda:1").device == "cuda:1"
    with pytest.raises(ValueError, match="--method hqq cannot run on cuda yet \\(only gptq, rtn can\\)"):
        check_device_plan("cuda", "hqq", (), True)
    with pytest.raises(ValueError, match="awq cannot run on cuda"):
        QuantizePlan(spec, "awq", device="cuda")
    with pytest.raises(ValueError, match="rtn without calibration streams tensors on the CPU"):
        QuantizePlan(spec, "rtn", device="cuda")
    from bitsmith.calib import CalibrationConfig

    assert QuantizePlan(spec, "rtn", calib=CalibrationConfig(), device="cuda").device == "cuda"
    assert "device" not in QuantizePlan(spec, "gptq").recorded_options()  # a CPU checkpoint records what it did before
    assert QuantizePlan(spec, "gptq", device="cuda").recorded_options()["device"] == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a torch without CUDA")
def test_cli_refuses_cuda_before_any_work(tiny, tmp_path, capsys) -> None:
    """No CUDA here: a one-line error naming the fix, and no --out, no work folder."""
    out = tmp_path / "q"
    for device, needle in (("cuda", NO_CUDA), ("tpu", "unknown device 'tpu'")):
        with pytest.raises(SystemExit) as exit_:
            main(["quantize", str(tiny), "--method", "gptq", "--device", device, "--out", str(out)])
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and err.startswith(f"error: {needle}") and err.count("\n") == 1, err
        assert not out.exists() and not Path(str(out) + ".partial").exists()


def test_device_cpu_is_byte_identical_to_no_device(tiny, tmp_path) -> None:
    """The same checkpoint from the CLI with --device cpu and without it (GPTQ with a calibrated head: block
    forwards, Hessians, the solve and the head all go through the device code): every file byte for byte,
    but safetensors' header (its metadata keys' order varies: tensors compared) and the report's seconds."""
    text = tmp_path / "calib.txt"
    text.write_text(sample_text(3000))
    common = ["quantize", str(tiny), "--method", "gptq", "--spec", "w4g32", "--calib", str(text), "--calib-samples", "5",
              "--calib-len", "40", "--quantize-head", "--compute-dtype", "fp32"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--device", "cpu", "--out", str(tmp_path / "cpu")]) == 0
    files = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "cpu").iterdir())

    def untimed(value):
        if isinstance(value, dict):
            return {k: untimed(v) for k, v in value.items() if k != "seconds"}
        return [untimed(v) for v in value] if isinstance(value, list) else value

    for name in files:
        a_path, b_path = tmp_path / "plain" / name, tmp_path / "cpu" / name
        if name == "bitsmith.json":
            assert untimed(json.loads(a_path.read_text())) == untimed(json.loads(b_path.read_text()))
        elif not name.endswith(".safetensors"):
            assert a_path.read_bytes() == b_path.read_bytes(), name
        else:  # safetensors writes its metadata keys in a random order: compare tensors
            from safetensors.torch import load_file

            a, b = load_file(str(a_path)), load_file(str(b_path))
            assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name


def test_plan_device_cpu_runs_the_device_code_with_the_same_result(tiny, tmp_path) -> None:
    """quantize_blocks with a plan that names the CPU (bf16 forwards, a spilled replay tail) equals the default plan."""
    from safetensors.torch import load_file

    calib = calibration_batches(tiny_tokenizer(), sample_text(2000), samples=5, seq_len=40)
    outs = {}
    for name, plan in {"plain": QuantizePlan(QuantSpec.parse("w4g32"), "gptq", batch_size=2, compute_dtype="bf16",
                                             replay_bytes=1),
                       "cpu": QuantizePlan(QuantSpec.parse("w4g32"), "gptq", batch_size=2, compute_dtype="bf16",
                                           replay_bytes=1, device="cpu")}.items():
        outs[name] = load_file(str(quantize_blocks(tiny, tmp_path / name, plan, calib) / "model.safetensors"))
    assert set(outs["plain"]) == set(outs["cpu"])
    assert all(torch.equal(outs["plain"][k], outs["cpu"][k]) for k in outs["plain"])


def test_batches_run_one_at_a_time_off_the_cpu() -> None:
    """The CPU keeps run_batches' default (a thread per core); a GPU gets one batch at a time."""
    assert batch_workers("cpu") is None and batch_workers(torch.device("cpu")) is None
    assert batch_workers(torch.device("cuda", 0)) == 1 and batch_workers("meta") == 1


def test_block_calls_move_with_their_structure() -> None:
    mask, cos, sin = torch.zeros(2, 1, 4, 4), torch.ones(2, 4, 8), torch.ones(2, 4, 8)
    calls = [((), {"attention_mask": mask, "position_embeddings": (cos, sin), "use_cache": False, "cache": None,
                   "ids": [torch.arange(4)]})]
    moved = to_device(calls, "meta")
    args, kwargs = moved[0]
    assert args == () and kwargs["use_cache"] is False and kwargs["cache"] is None
    assert kwargs["attention_mask"].device.type == "meta" and kwargs["attention_mask"].shape == mask.shape
    assert all(t.device.type == "meta" for t in (*kwargs["position_embeddings"], *kwargs["ids"]))
    same = to_device(calls, "cpu")  # on their own device: the very same tensors
    assert same[0][1]["attention_mask"] is mask and same[0][1]["position_embeddings"][0] is cos


def test_native_paths_are_skipped_off_the_cpu(monkeypatch) -> None:
    """Tensors on another device (meta here) never reach a native kernel, which reads raw pointers:
    the range search and the nearest-entry search decline, GPTQ's walk takes its torch loop, and the
    Hessian is summed by torch GEMMs on that device without the AMX kernel or oneDNN's fpmath mode."""
    def refuse(*args, **kwargs):
        raise AssertionError("a native kernel was called with tensors off the CPU")

    monkeypatch.setattr(native, "gptq_block", refuse)
    monkeypatch.setattr(native, "hessian_update", refuse)
    spec = QuantSpec.parse("w4g32")
    meta = torch.empty(8, 2, 32, device="meta")
    assert native.range_search(meta, spec, None, None, 20, 64) is None
    assert native.vq_nearest(torch.empty(5, 2, device="meta"), torch.empty(4, 2, device="meta"),
                             torch.empty(4, device="meta")) is None
    n, out = 64, 8
    codes = gptq_walk(torch.empty(n, out, device="meta"), torch.empty(n, n, device="meta"),
                      torch.empty(2, out, device="meta"), torch.empty(2, out, device="meta"), [j // 32 for j in range(n)],
                      spec, None, 32)
    assert codes.device.type == "meta" and codes.shape == (n, out) and codes.dtype == torch.uint8
    import bitsmith.calib.stats as stats_module

    from contextlib import nullcontext

    def fpmath(enabled: bool = True):
        assert not enabled, "oneDNN's bf16 fpmath mode was asked for off the CPU"
        return nullcontext(False)

    monkeypatch.setattr(stats_module, "bf16_fpmath", fpmath)
    acc = StatsAccumulator(1024, device="meta")
    acc.add(torch.empty(3, 7, 1024, dtype=torch.bfloat16, device="meta"))
    stats = acc.stats()
    assert stats.hessian.device.type == "meta" and stats.importance.device.type == "meta" and stats.tokens == 21



def test_compute_dtype_auto_follows_the_gpu(monkeypatch) -> None:
    """--compute-dtype auto on a CUDA device: bf16 where the GPU multiplies it natively, else fp32; the CPU's
    own rule (tests/cli/test_cli.py) is untouched."""
    from bitsmith.pipeline.plan import resolve_compute_dtype

    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda v=native: v)
        assert resolve_compute_dtype("auto", "cuda:0") == expected and resolve_compute_dtype("fp32", "cuda") == "fp32"
