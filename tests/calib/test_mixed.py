"""The built-in prose + code calibration text (AWQ's default): how it is cut and mixed, that it never
shares text with the evaluation domains, and which runs use it."""

import random

import pytest

from bitsmith.calib import data
from bitsmith.calib.data import (
    CALIB_STDLIB_FILES, DEFAULT_CALIB_TEXT, PROSE, PROSE_CODE, CalibrationConfig, interleave, mixed_calibration_text,
    read_calibration_text, text_chunks,
)
from bitsmith.eval.domains import STDLIB_FILES, builtin_domain
from bitsmith.eval.suite import shipped_text
from bitsmith.pipeline.plan import QuantizePlan
from bitsmith.pipeline.quantize import calibration
from bitsmith.spec import QuantSpec
from bitsmith.transforms import TRANSFORMS


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sep", ["\n", " "])
def test_text_chunks_join_back_and_cut_after_a_separator(seed: int, sep: str) -> None:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abc ") for _ in range(rng.randint(0, 30))) for _ in range(rng.randint(1, 200))]
    text = "\n".join(words) + ("" if seed % 2 else "tail")
    size = rng.randint(1, 90)
    chunks = text_chunks(text, size, sep)
    assert "".join(chunks) == text
    for c in chunks[:-1]:  # every piece but the last: at least size characters, ending at its first sep past size
        assert len(c) > size and c.endswith(sep) and sep not in c[size:-1]


def test_interleave_alternates_and_stops_with_the_shorter_list() -> None:
    assert interleave(["a ", "b "], ["1\n", "2\n", "3\n"]) == "a\n\n1\n\nb\n\n2\n"
    assert interleave([], ["x"]) == "\n"


def test_mixed_text_alternates_the_shipped_prose_and_the_stdlib_sources() -> None:
    text = read_calibration_text(PROSE_CODE)
    assert text == mixed_calibration_text()
    prose = shipped_text(DEFAULT_CALIB_TEXT)
    pieces = text.split("\n\n")
    assert prose[:200] in text and "def " in text and "class " in text
    # it starts with a piece of the shipped prose, then the code
    assert pieces[0] and pieces[0] in prose
    # enough text for the default 128 x 512 calibration tokens (~3.5 characters per token), half of each kind
    assert len(text) > 2 * 128 * 512 * 3.5
    assert 0.8 < sum(len(p) for p in pieces if p in prose) / len(text) * 2 < 1.2


def _grams(text: str, k: int) -> set[str]:
    return {text[i:i + k] for i in range(len(text) - k + 1)}


def test_calibration_and_evaluation_texts_never_overlap() -> None:
    """No 80-character stretch of the prose or code evaluation text occurs in the mixed calibration text,
    and the code halves come from different standard library files."""
    assert not set(CALIB_STDLIB_FILES) & set(STDLIB_FILES)
    calib = mixed_calibration_text()
    k = 80
    grams = _grams(calib, k)
    for name in ("prose", "code"):
        evaluated = builtin_domain(name).text
        shared = [evaluated[i:i + k] for i in range(0, len(evaluated) - k + 1) if evaluated[i:i + k] in grams]
        assert not shared, f"{name}: {shared[:3]}"


def test_prose_names_the_state_of_the_union_text() -> None:
    assert read_calibration_text(PROSE) == read_calibration_text(None) == shipped_text(DEFAULT_CALIB_TEXT)


@pytest.mark.parametrize("name", [PROSE_CODE, PROSE])
def test_a_file_named_like_a_builtin_text_is_read_as_a_file(tmp_path, monkeypatch, name) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_text("my own text", encoding="utf-8")
    assert read_calibration_text(name) == "my own text"


def test_missing_stdlib_sources_give_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(data, "CALIB_STDLIB_FILES", ("no_such_module_here.py",))
    with pytest.raises(FileNotFoundError, match="--calib"):
        mixed_calibration_text()


def test_awq_runs_default_to_the_mixed_text_and_others_to_the_prose() -> None:
    spec = QuantSpec.parse("w4g128")
    assert TRANSFORMS["awq"].calib_text == PROSE_CODE
    assert calibration(QuantizePlan(spec, "awq")).text == PROSE_CODE
    assert calibration(QuantizePlan(spec, "gptq", {"awq": True})).text == PROSE_CODE
    assert calibration(QuantizePlan(spec, "gptq")).text is None  # the State of the Union text
    given = CalibrationConfig(text="mine.txt", samples=4)
    assert calibration(QuantizePlan(spec, "awq", calib=given)) == given  # a named text always wins
    kept = calibration(QuantizePlan(spec, "awq", calib=CalibrationConfig(samples=16, seq_len=256)))
    assert (kept.text, kept.samples, kept.seq_len) == (PROSE_CODE, 16, 256)


def test_vq_defaults_to_the_mixed_text_and_a_named_text_wins() -> None:
    spec = QuantSpec.parse("w2g64vq")
    assert calibration(QuantizePlan(spec, "vq")).text == PROSE_CODE
    assert calibration(QuantizePlan(spec, "vq", {"rotate": True})).text == PROSE_CODE
    given = CalibrationConfig(text="mine.txt", samples=4)
    assert calibration(QuantizePlan(spec, "vq", calib=given)) == given
    assert calibration(QuantizePlan(QuantSpec.parse("w2g64"), "gptq", {"rotate": True})).text is None


@pytest.mark.parametrize("method, options, text, spec", [("awq", {}, PROSE_CODE, "w4g32"), ("gptq", {}, None, "w4g32"),
                                                          ("rtn", {"awq": True}, PROSE_CODE, "w4g32"),
                                                          ("vq", {}, PROSE_CODE, "w2g32vq")])
def test_quantize_hands_the_calibrated_run_its_default_text(tmp_path, monkeypatch, method, options, text, spec) -> None:
    """quantize() tokenizes the plan's default text (the model's own tokenizer) for the block loop."""
    import torch
    from tests.tiny import make_tiny_model

    from bitsmith.calib.data import calibration_batches
    from bitsmith.models import open_source
    from bitsmith.pipeline import layerwise, quantize as pipeline

    model = make_tiny_model(tmp_path / "m", num_hidden_layers=1)
    seen = {}
    monkeypatch.setattr(layerwise, "quantize_blocks", lambda model, out, plan, tokens, **kw: seen.setdefault("t", tokens))
    plan = QuantizePlan(QuantSpec.parse(spec), method, options, calib=CalibrationConfig(samples=3, seq_len=40))
    pipeline.quantize(model, tmp_path / "out", plan)
    expected = calibration_batches(open_source(model).tokenizer(), read_calibration_text(text), 3, 40)
    assert torch.equal(seen["t"], expected)
