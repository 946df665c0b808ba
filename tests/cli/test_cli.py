"""The bitsmith command end to end on a tiny random model, and its one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.tiny import make_tiny_model, sample_text

from bitsmith.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("cli") / "tiny")


def test_quantize_default_output_spec(tiny: Path, tmp_path: Path, capsys) -> None:
    """Without flags the head follows the body (pipeline.outputs.default_output_spec): w6g128 under a
    4-bit body, its group narrowed to the tiny model's 64-wide rows, w8 under an 8-bit one; the untied
    embedding table gets w4g128 (narrowed: w4g64) under the 4-bit body and the head's w8 above. An
    --output-spec covers both tensors, --embedding-spec sets the table apart, keep keeps (with --budget
    too: tests/plan/test_budget_pinned.py)."""
    from bitsmith.io.checkpoint import read_info

    specs = {}
    runs = {"default": [], "keep": ["--output-spec", "keep"], "w5": ["--output-spec", "w5g32"],
            "auto": ["--output-spec", "auto"], "w8body": ["--spec", "w8"],
            "table2": ["--embedding-spec", "w2g32"], "tableonly": ["--output-spec", "keep", "--embedding-spec", "w3g32"],
            "headonly": ["--embedding-spec", "keep"]}
    for name, flags in runs.items():
        assert main(["quantize", str(tiny), "--spec", "w4g32", "--method", "rtn", "--out", str(tmp_path / name), *flags]) == 0
        specs[name] = {k: str(v) for k, v in read_info(tmp_path / name).specs.items()}
    assert (specs["default"]["model.embed_tokens"], specs["default"]["lm_head"]) == ("w4g64", "w6g64")
    assert specs["auto"] == specs["default"]
    assert specs["w8body"]["model.embed_tokens"] == specs["w8body"]["lm_head"] == "w8"
    assert specs["w5"]["model.embed_tokens"] == specs["w5"]["lm_head"] == "w5g32"
    assert "model.embed_tokens" not in specs["keep"] and "lm_head" not in specs["keep"]
    assert (specs["table2"]["model.embed_tokens"], specs["table2"]["lm_head"]) == ("w2g32", "w6g64")
    assert specs["tableonly"]["model.embed_tokens"] == "w3g32" and "lm_head" not in specs["tableonly"]
    assert specs["headonly"]["lm_head"] == "w6g64" and "model.embed_tokens" not in specs["headonly"]
    assert specs["default"]["model.layers.0.self_attn.q_proj"] == "w4g32"


def test_a_tied_table_takes_one_spec(tmp_path: Path, capsys) -> None:
    """A tied model's head is its embedding table: a separate --embedding-spec is refused before any
    work, with the flag to use instead; one equal to the head's is accepted."""
    tied = make_tiny_model(tmp_path / "tied", "qwen2", tie_word_embeddings=True)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(tied), "--spec", "w4g32", "--method", "rtn", "--embedding-spec", "w2g32",
              "--out", str(tmp_path / "no")])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "ties its output head" in err and "--output-spec" in err and "Traceback" not in err
    assert not (tmp_path / "no").exists()
    with pytest.raises(SystemExit):  # a spec that does not parse is named by its flag
        main(["quantize", str(tied), "--embedding-spec", "w9g32", "--out", str(tmp_path / "no")])
    assert "--embedding-spec w9g32: 9 bits" in capsys.readouterr().err
    assert main(["quantize", str(tied), "--spec", "w4g32", "--method", "rtn", "--output-spec", "w5g32",
                 "--embedding-spec", "w5g32", "--out", str(tmp_path / "ok")]) == 0


def test_quantize_inspect_eval_generate(tiny: Path, tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "q"
    assert main(["quantize", str(tiny), "--spec", "w4g32", "--output-spec", "keep", "--out", str(ckpt)]) == 0
    assert (ckpt / "bitsmith.json").exists()

    capsys.readouterr()
    assert main(["inspect", str(ckpt), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "bitsmith" and "w4g32" in report["summary"]
    assert 4.9 <= report["quantized_bits_per_weight"] <= 5.01  # 4 + 32/32 for fp16 scale and zero

    text = tmp_path / "text.txt"
    text.write_text(sample_text(1200))
    out = tmp_path / "eval.json"
    assert main(["eval", str(ckpt), "--text", str(text), "--reference", str(tiny), "--ctx", "64", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"ppl", "tokens", "kld_mean", "kld_p99", "top1"}
    assert result["kld_mean"] > 0 and 0 < result["top1"] <= 1 and result["tokens"] > 0

    assert main(["eval", str(tiny), "--text", str(text), "--reference", str(tiny), "--ctx", "64", "--json", str(out)]) == 0
    same = json.loads(out.read_text())
    assert same["kld_mean"] == pytest.approx(0, abs=1e-6) and same["top1"] == 1.0

    capsys.readouterr()
    assert main(["generate", str(ckpt), "the cat", "--max-new-tokens", "5", "--json"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last) == {"new_tokens", "prefill_tok_s", "decode_tok_s", "text"}
    assert 1 <= last["new_tokens"] <= 5


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bitsmith.cli", *args], capture_output=True, text=True, timeout=120)


def test_errors_are_one_line_and_nonzero(tiny: Path, tmp_path: Path) -> None:
    cases = [
        (["quantize", str(tiny), "--spec", "w9", "--out", str(tmp_path / "a")], "w4g128"),
        (["quantize", str(tmp_path / "missing"), "--out", str(tmp_path / "b")], "missing"),
        (["quantize", str(tiny), "--spec", "w4g32", "--out", str(tiny)], "already exists"),
        (["quantize", str(tiny), "--spec", "w4g128", "--out", str(tmp_path / "c")], "larger than"),
        (["inspect", str(tmp_path / "nothing")], "does not exist"),
    ]
    for args, needle in cases:
        proc = _run(*args)
        assert proc.returncode == 1, proc.stderr
        lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
        assert len(lines) == 1 and "error:" in lines[0] and needle in proc.stderr, proc.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_truncated_checkpoint_gives_clear_error(tiny: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "q"
    assert main(["quantize", str(tiny), "--spec", "w8", "--out", str(ckpt)]) == 0
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    proc = _run("generate", str(ckpt), "the cat", "--max-new-tokens", "2")
    assert proc.returncode == 1 and "truncated" in proc.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error of a torch without CUDA")
def test_generate_on_a_missing_device_says_so(tiny: Path) -> None:
    with pytest.raises(SystemExit, match="cannot use device 'cuda'"):
        main(["generate", str(tiny), "the cat", "--max-new-tokens", "2", "--device", "cuda"])


def test_default_method_is_hqq_without_calibration_and_gptq_with_it(tmp_path) -> None:
    """The issue's defaults: hqq (calibration-free) unless calibration text is given, then gptq;
    an explicit --method always wins."""
    import argparse

    from bitsmith.cli.quantize import default_method

    assert default_method(argparse.Namespace(method=None, calib=None)) == "hqq"
    assert default_method(argparse.Namespace(method=None, calib=tmp_path / "c.txt")) == "gptq"
    assert default_method(argparse.Namespace(method="rtn", calib=tmp_path / "c.txt")) == "rtn"


def test_compute_dtype_auto_follows_the_cpu(monkeypatch) -> None:
    """--compute-dtype auto: bf16 where the CPU has AMX, or AVX512-BF16 with a bf16 matmul measured at
    least twice float32's (kernels.cpu.fast_bf16_matmul: a Zen 5 yes, a Xeon without AMX no); explicit
    choices win."""
    import torch

    from bitsmith.cli.quantize import compute_dtype
    from bitsmith.kernels import build, cpu

    for flags, speedup, expected in (("avx512f avx512_bf16", 0.8, torch.float32),
                                     ("avx512f avx512_bf16", 4.5, torch.bfloat16),
                                     ("avx512_bf16 amx_bf16 amx_tile", 0.8, torch.bfloat16),
                                     ("avx2 fma", 4.5, torch.float32)):
        monkeypatch.setattr(build, "cpu_flags", lambda f=flags: f)
        monkeypatch.setattr(cpu, "bf16_speedup", lambda s=speedup: s)
        cpu.native_bf16.cache_clear()  # answered once per process otherwise
        cpu.fast_bf16_matmul.cache_clear()
        assert compute_dtype("auto") == expected
        assert compute_dtype("fp32") == torch.float32 and compute_dtype("bf16") == torch.bfloat16
    cpu.fast_bf16_matmul.cache_clear()
    cpu.native_bf16.cache_clear()  # the real CPU's answer for the tests after this one


def test_default_output_spec_follows_the_body_and_fits_the_row() -> None:
    from bitsmith.pipeline.outputs import default_output_spec
    from bitsmith.spec import QuantSpec

    spec = lambda text, width: str(default_output_spec(QuantSpec.parse(text), width))  # noqa: E731
    assert spec("w4g128", 1536) == spec("w2g64", 576) == spec("w3g128", 640) == "w6g128"
    assert spec("w5g128", 1536) == spec("w8", 1536) == "w8"
    assert spec("w4g32", 64) == "w6g64" and spec("w4g32", 40) == "w6g32" and spec("w4g32", 16) == "w6"


def test_default_embedding_spec_is_narrower_under_narrow_bodies() -> None:
    from bitsmith.pipeline.outputs import default_embedding_spec
    from bitsmith.spec import QuantSpec

    spec = lambda text, width: str(default_embedding_spec(QuantSpec.parse(text), width))  # noqa: E731
    assert spec("w4g128", 1536) == spec("w2g64vq", 1536) == spec("w3g128", 640) == "w4g128"
    assert spec("w5g128", 1536) == spec("w8", 1536) == "w8"
    assert spec("w4g32", 64) == "w4g64" and spec("w2g64", 16) == "w4"
