"""bench/gpu_session.py, the one script a session with a lent GPU runs: what can be checked without one.
Its options, its refusal without CUDA, the timetable's caps and skips (a fake runner and clock: no
timing is measured or asserted), and its two GPU parts end to end on the CPU with a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.test_bench_tools import load
from tests.tiny import make_tiny_model


@pytest.fixture(scope="module")
def session():
    return load("gpu_session")


def test_options_are_checked(session, tmp_path) -> None:
    args = session.parse_args(["--out", str(tmp_path)])
    assert args.parts == "decode,gptq,kernels" and args.device == "cuda" and args.variants == "w4g128,w8,w3g128"
    for bad in (["--parts", "decode,train"], ["--parts", ""], ["--windows", "0"], ["--new-tokens", "1"]):
        with pytest.raises(SystemExit):
            session.parse_args(["--out", str(tmp_path), *bad])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a machine without CUDA")
def test_refuses_without_cuda_and_runs_nothing(session, tmp_path, capsys) -> None:
    assert session.main(["--out", str(tmp_path / "out")]) == 1
    assert "no CUDA device" in capsys.readouterr().out and not (tmp_path / "out").exists()
    assert session.main(["--out", str(tmp_path / "out"), "--device", "cpu"]) == 1
    assert "not one" in capsys.readouterr().out


def test_timetable_caps_and_skips(session) -> None:
    """Each part runs under min(its cap, what is left); one that would get less than half its cap is
    skipped with a line; a part's status and note are carried to its row."""
    now = [0.0]
    spent = {"decode": 200.0, "gptq": 90.0, "kernels": 10.0}
    calls = []

    def runner(part, cap):
        calls.append((part.name, cap))
        now[0] += spent[part.name]
        return ("stopped at cap", "rows in gptq.log") if part.name == "gptq" else ("ok", "")

    parts = [session.Part("decode", 230, ""), session.Part("gptq", 170, ""), session.Part("kernels", 50, "")]
    rows = session.run_timetable(parts, 300, runner, clock=lambda: now[0])
    assert calls == [("decode", 230), ("gptq", 100)]  # gptq: 100 s left of 300 (>= half its cap), kernels: 10 s left
    assert [(r.part, r.status) for r in rows] == [("decode", "ok"), ("gptq", "stopped at cap"), ("kernels", "skipped")]
    assert rows[2].note == "10 s left of the 300 s budget, cap 50 s" and rows[1].wall_s == 90.0
    text = session.timetable(rows, 300.0)
    assert "| kernels | 50 | 0.0 | skipped | 10 s left" in text and text.endswith("total 300.0 s")


def test_parts_run_end_to_end_on_the_cpu(session, tmp_path, monkeypatch) -> None:
    """decode and gptq on a tiny model with --device cpu (the parts do not check for CUDA; main does):
    every row is written, with the kernel names, the KLD figures and GPTQ's wall time."""
    import sys

    monkeypatch.syspath_prepend(str(Path(session.__file__).parent))
    monkeypatch.setenv("BITSMITH_BENCH_WORK", str(tmp_path / "work"))
    sys.modules.pop("gpu_parts", None)
    parts = __import__("gpu_parts")
    model = make_tiny_model(tmp_path / "tiny", "qwen2", max_position_embeddings=1024)
    args = session.parse_args(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--model", str(model),
                               "--device", "cpu", "--dtype", "bf16", "--variants", "w8,w4g32", "--windows", "1",
                               "--new-tokens", "4", "--runs", "1", "--prompt", "the cat sat", "--calib-samples", "2", "--gptq-spec", "w4g32"])
    args.out.mkdir()
    args.work.mkdir()
    assert parts.part_decode(args) == 0 and parts.part_gptq(args) == 0
    decode = [json.loads(line) for line in (args.out / "decode.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in decode] == ["bf16", "rtn w8", "rtn w4g32"]
    assert all(r["tok_s"] > 0 and len(r["runs"]) == 1 for r in decode)
    assert set(decode[1]["kernels"]) >= {"q_proj", "down_proj"} and decode[2]["kld_mean"] > decode[1]["kld_mean"] >= 0
    gptq = [json.loads(line) for line in (args.out / "gptq.jsonl").read_text().splitlines()]
    assert gptq[0]["codes_equal"] == 1.0 and gptq[0]["output_error_cpu"] == gptq[0]["output_error_device"] > 0  # cpu vs cpu
    assert gptq[1]["wall_s"] > 0 and gptq[1]["peak_device_gb"] is None and gptq[2]["kld_mean"] >= 0


def test_a_prepared_folder_gets_random_weights_once(session, tmp_path, monkeypatch) -> None:
    """--prepare writes config and tokenizer only (what can travel to the GPU machine); there the script
    draws random weights of those shapes once into its work folder, marked as random in every row."""
    import sys

    monkeypatch.syspath_prepend(str(Path(session.__file__).parent))
    sys.modules.pop("gpu_parts", None)
    parts = __import__("gpu_parts")
    model = make_tiny_model(tmp_path / "tiny", "qwen2")
    assert session.main(["--out", str(tmp_path / "out"), "--model", str(model), "--prepare", str(tmp_path / "shapes")]) == 0
    assert not list((tmp_path / "shapes").glob("*.safetensors")) and (tmp_path / "shapes" / "config.json").is_file()
    made = parts.with_weights(str(tmp_path / "shapes"), tmp_path / "work", "cpu")
    assert parts.weights_kind(made) == "random" and parts.weights_kind(str(model)) == "real"
    assert parts.with_weights(made, tmp_path / "work", "cpu") == made  # a folder with weights is used as it is
    assert parts.with_weights(str(tmp_path / "shapes"), tmp_path / "work", "cpu") == made  # made once
    from bitsmith.runtime.load import load_model

    loaded = load_model(made)
    assert loaded.model.config.hidden_size == 64 and loaded.tokenizer("the cat")["input_ids"]


def test_a_part_runs_in_its_own_process_with_the_options_given(session, tmp_path) -> None:
    """The timetable's runner starts ``gpu_session.py --part NAME`` with the options it was given (here the
    gptq part of a tiny model on the CPU) and reports a part that overruns its cap as stopped."""
    model = make_tiny_model(tmp_path / "tiny", "qwen2", max_position_embeddings=1024)
    args = session.parse_args(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--model", str(model),
                               "--device", "cpu", "--calib-samples", "2", "--gptq-spec", "w4g32", "--windows", "1"])
    args.out.mkdir()
    args.work.mkdir()
    run = session.subprocess_runner(args)
    assert run(session.Part("gptq", 300, ""), 300) == ("ok", "")
    rows = [json.loads(line) for line in (args.out / "gptq.jsonl").read_text().splitlines()]
    assert [r.get("variant") for r in rows] == [None, "gptq w4g32", "gptq w4g32"] and rows[1]["weights"] == "real"
    assert "## gptq:" in (args.out / "gptq.log").read_text()
    assert run(session.Part("decode", 0.5, ""), 0.5) == ("stopped at cap", "its rows so far are in decode.log")


def test_the_whole_session_on_the_cpu(session, tmp_path, monkeypatch) -> None:
    """main as a GPU session runs it, with the CUDA check bypassed: a prepared folder gets its random
    weights, the gptq part runs in its process, the kernels part (gpu_kernels.py: no CUDA here) fails with
    its return code, and the timetable says so."""
    model = make_tiny_model(tmp_path / "tiny", "qwen2", max_position_embeddings=1024)
    assert session.main(["--model", str(model), "--prepare", str(tmp_path / "shapes")]) == 0
    monkeypatch.setattr(session, "cuda_refusal", lambda device: None)
    out = tmp_path / "out"
    assert session.main(["--out", str(out), "--work", str(tmp_path / "work"), "--model", str(tmp_path / "shapes"),
                         "--device", "cpu", "--parts", "gptq,kernels", "--calib-samples", "2", "--gptq-spec", "w4g32",
                         "--windows", "1", "--budget", "500"]) == 0
    table = (out / "timetable.md").read_text()
    assert "| gptq | 170 |" in table and "| ok |" in table and "| kernels | 50 |" in table and "failed (rc 1)" in table
    rows = [json.loads(line) for line in (out / "gptq.jsonl").read_text().splitlines()]
    assert rows[1]["weights"] == "random" and (tmp_path / "work" / "random-shapes" / "RANDOM_WEIGHTS.txt").is_file()
