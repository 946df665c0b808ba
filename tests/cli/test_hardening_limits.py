"""No silent garbage: work past the model's context, binary files given as text and NaN scores are
refused with a message that names the numbers and the fix, never reported with exit 0."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.tiny import make_tiny_model, sample_text

from bitsmith.cli import main
from bitsmith.io.textfile import NotTextError, read_text_file
from bitsmith.models.context import ContextLengthError, check_context, check_generation_fits, context_length


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory) -> Path:
    """A model whose config allows only 64 positions."""
    return make_tiny_model(tmp_path_factory.mktemp("limits") / "tiny64", max_position_embeddings=64)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(sample_text(1200))
    return path


def _fails(argv: list[str], capsys) -> str:
    """Run the CLI in-process; it must exit 1 with one error line, which is returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "ppl=" not in captured.out
    return captured.err


def test_context_check_names_both_numbers_and_the_fix() -> None:
    class Config:
        max_position_embeddings = 8192

    check_context(Config(), 8192, "--ctx 8192", "pass --ctx {limit} or less")
    with pytest.raises(ContextLengthError, match=r"--ctx 9000 needs 9,000 positions .* context is 8,192 tokens.*--ctx 8192 or less"):
        check_context(Config(), 9000, "--ctx 9000", "pass --ctx {limit} or less")
    assert context_length(object()) is None
    check_context(object(), 10**9, "anything", "")  # no context length in the config: nothing to check
    with pytest.raises(ContextLengthError, match="at most 8,092 new tokens fit"):
        check_generation_fits(Config(), 100, 9000)
    with pytest.raises(ContextLengthError, match="the prompt alone fills it"):
        check_generation_fits(Config(), 9000, 1)


def test_eval_and_compare_refuse_ctx_beyond_the_context(tiny64: Path, text: Path, capsys) -> None:
    err = _fails(["eval", str(tiny64), "--text", str(text), "--ctx", "100"], capsys)
    assert "--ctx 100" in err and "context is 64 tokens" in err and "--ctx 64 or less" in err
    err = _fails(["compare", str(tiny64), str(tiny64), "--text", str(text), "--ctx", "100"], capsys)
    assert "context is 64 tokens" in err and "--ctx 64 or less" in err


def test_generate_refuses_past_the_context_before_any_work(tiny64: Path, capsys, monkeypatch) -> None:
    from bitsmith.infer import generate as generate_module
    from bitsmith.runtime.load import load_model

    err = _fails(["generate", str(tiny64), "the cat sat", "--max-new-tokens", "80"], capsys)
    assert "80 new tokens" in err and "context is 64 tokens" in err and "--max-new-tokens 61 or less" in err
    err = _fails(["generate", str(tiny64), " ".join(["the cat"] * 40)], capsys)
    assert "the prompt (80 tokens)" in err and "shorten the prompt" in err

    loaded = load_model(tiny64)

    def no_work(*args, **kwargs):
        raise AssertionError("the model ran before the context check")

    monkeypatch.setattr(loaded.model, "forward", no_work)
    monkeypatch.setattr(generate_module, "sample_next", no_work)
    with pytest.raises(ContextLengthError):
        generate_module.generate(loaded.model, loaded.tokenizer, " ".join(["the cat"] * 40), max_new_tokens=1)


def test_generate_within_the_context_still_runs(tiny64: Path, capsys) -> None:
    assert main(["generate", str(tiny64), "the cat sat", "--max-new-tokens", "61", "--json"]) == 0


def test_text_reader_is_strict(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("the café".encode("latin-1"))
    with pytest.raises(NotTextError, match=r"not UTF-8 text: byte 0xe9 at byte offset 7"):
        read_text_file(latin1)
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"the cat\x00sat")
    with pytest.raises(NotTextError, match="NUL byte at byte offset 7"):
        read_text_file(nul)
    controls = tmp_path / "controls.txt"
    controls.write_bytes(bytes(range(1, 9)) * 100 + b"text")
    with pytest.raises(NotTextError, match="control characters"):
        read_text_file(controls)
    good = tmp_path / "good.txt"
    good.write_bytes("caf\u00e9\r\nline\rend\tx\x1b[0m\n".encode())
    assert read_text_file(good) == good.read_text(encoding="utf-8")  # same text as before, newlines included


def test_binary_text_and_calib_are_refused(tiny64: Path, tmp_path: Path, capsys) -> None:
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    err = _fails(["eval", str(tiny64), "--text", str(binary), "--ctx", "32"], capsys)
    assert "is not" in err and "byte offset" in err
    err = _fails(["compare", str(tiny64), str(tiny64), "--text", f"bin={binary}", "--ctx", "32"], capsys)
    assert "byte offset" in err
    err = _fails(["quantize", str(tiny64), "--method", "gptq", "--calib", str(binary), "--spec", "w4g32",
                  "--out", str(tmp_path / "q")], capsys)
    assert "calibration text" in err and "byte offset" in err
    assert not (tmp_path / "q").exists()


def test_eval_refuses_nan_scores(tmp_path: Path, text: Path, capsys) -> None:
    """A huge (finite) final-norm weight overflows the logits to inf, and the scores to NaN."""
    model = make_tiny_model(tmp_path / "overflow")
    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], 3e38)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    err = _fails(["eval", str(model), "--text", str(text), "--ctx", "32", "--max-windows", "2"], capsys)
    assert "the model produced NaN/inf logits: ppl=nan" in err and "bitsmith inspect" in err
    err = _fails(["compare", str(model), str(model), "--text", str(text), "--ctx", "32", "--max-windows", "1"], capsys)
    assert "NaN/inf logits" in err
