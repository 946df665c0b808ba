"""Per-layer reports made a slice of rows at a time (issue 18: the 151,936 x 1,536 head's report made
whole-tensor float32 reconstructions of the method's and RTN's weights, 0.93 GB each) against the
whole-tensor arithmetic they replaced, kept here as the oracle: the same figures, bit for bit, and no
reconstruction of more rows than one slice."""

from __future__ import annotations

import math
import weakref

import pytest
import torch

from bitsmith.methods import LayerStats, get_method
from bitsmith.methods.gptq import layer_errors, layer_errors_by_rows
from bitsmith.pipeline import stages
from bitsmith.pipeline.common import sqnr_db_by_rows
from bitsmith.primitives import sqnr_db
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor


def _layer(out: int, inp: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    w[:, torch.randperm(inp, generator=g)[:3]] *= 10  # outlier channels
    x = torch.randn(3 * inp, inp, generator=g) * torch.rand(inp, generator=g)
    return w, x.T @ x


def _oracle(w: torch.Tensor, qt, h: torch.Tensor, with_rtn: bool) -> tuple[float, list[float]]:
    """The former report: whole reconstructions, primitives.sqnr_db and layer_errors."""
    dequants = [qt.weight()] + ([stages.rtn_dequantized(w, qt.spec)] if with_rtn else [])
    return sqnr_db(w, dequants[0]), layer_errors(w, dequants, h)


@pytest.mark.parametrize("text", ["w4g64", "w3g128", "w8", "w4g32s", "w4g32nf", "w3g32fit", "w2g64vq"])
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_report_by_rows_equals_whole_tensor_report(text: str, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    w, h = _layer(700, 256, seed=len(text) + len(method))  # 700 rows: a ragged last slice
    spec = QuantSpec.parse(text)
    if spec.grid == "vq":  # vector codes have their own method (the plan refuses rtn and gptq)
        if method == "rtn":
            pytest.skip("vq codes come from the vq method only")
        method = "vq"
    fn = get_method(method)
    stats = LayerStats(hessian=h, importance=h.diagonal() / 768, tokens=768)
    qt = fn(w, spec, stats, {})
    sqnr, errors = _oracle(w, qt, h, fn is not get_method("rtn"))
    monkeypatch.setattr(stages, "REPORT_ROWS_WEIGHTS", 256 * 300)  # slices of 300 rows: several
    report = stages._linear_report("layer", w, qt, stats, fn, 0.0)  # noqa: SLF001 (the unit under test)
    assert report["sqnr_db"] == sqnr
    assert report["output_error"] == errors[0]
    if fn is not get_method("rtn"):
        assert report["rtn_output_error"] == errors[1]
    assert report["tokens"] == 768


def test_report_reconstructs_one_slice_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wide layer (the head's shape in miniature): no reconstruction, the method's or RTN's, of more
    rows than one slice, and no float copy of the whole weight left alive."""
    w, h = _layer(10000, 128, seed=11)  # 1.28 M weights: more than sqnr's flat slice of 1 M
    spec, fn = QuantSpec.parse("w8"), get_method("gptq")
    stats = LayerStats(hessian=h, importance=h.diagonal(), tokens=384)
    qt = fn(w, spec, stats, {})
    sqnr, errors = _oracle(w, qt, h, True)
    slice_rows = 512
    monkeypatch.setattr(stages, "REPORT_ROWS_WEIGHTS", 128 * slice_rows)
    seen: list[int] = []  # rows of every reconstruction
    rtn_seen: list[int] = []
    real_weight, real_rtn = QuantizedTensor.weight, stages.rtn_dequantized

    def weight(self):
        seen.append(self.codes.shape[0])
        return real_weight(self)

    def rtn_rows(x, s):
        rtn_seen.append(x.shape[0])
        return real_rtn(x, s)

    monkeypatch.setattr(QuantizedTensor, "weight", weight)
    monkeypatch.setattr(stages, "rtn_dequantized", rtn_rows)
    report = stages._linear_report("lm_head", w, qt, stats, fn, 0.0)  # noqa: SLF001
    # the error pass: slices of 512 rows; sqnr: its flat slices of 1 M weights (8,193 rows at most)
    assert rtn_seen and max(rtn_seen) <= slice_rows and sum(rtn_seen) == 10000
    assert max(seen) <= (1 << 20) // 128 + 1 and seen.count(slice_rows) >= 10000 // slice_rows
    assert report["sqnr_db"] == sqnr and report["output_error"] == errors[0] and report["rtn_output_error"] == errors[1]


@pytest.mark.parametrize("shape", [(37, 300), (1, 33), (5000, 256)])  # flat slices across rows; one slice
def test_sqnr_by_rows_equals_sqnr_db(shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    from bitsmith.pipeline import common

    g = torch.Generator().manual_seed(shape[0])
    w = torch.randn(shape, generator=g)
    approx = w + 0.01 * torch.randn(shape, generator=g)
    monkeypatch.setattr(common, "SQNR_SLICE", 1 << 20)
    assert sqnr_db_by_rows(w, lambda rows: approx[rows].clone()) == sqnr_db(w, approx)
    assert sqnr_db_by_rows(w, lambda rows: w[rows].clone()) == math.inf


def test_layer_errors_by_rows_equal_whole() -> None:
    w, h = _layer(1000, 96, seed=4)
    approx = [w.round(), w * 0.99]
    whole = layer_errors(w, approx, h, rows=64)
    for chunk in (64, 100, 1000, 5000):  # 100: rounded down to whole inner chunks
        assert layer_errors_by_rows(w, lambda rows: [a[rows] for a in approx], 2, h, rows=64, chunk_rows=chunk) == whole


def test_stream_releases_each_tensor_before_reading_the_next(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The calibration-free loop holds one source tensor at a time: the head (0.93 GB on Qwen2.5-1.5B)
    was still referenced while the embedding was read."""
    import bitsmith.models as models
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize
    from tests.tiny import make_tiny_model

    folder = make_tiny_model(tmp_path / "src", tie_word_embeddings=False)
    alive: list[weakref.ref] = []
    real_open = models.open_source

    def open_source(model):
        source = real_open(model)
        real_load = source.load_tensor

        def load_tensor(name):
            assert all(ref() is None for ref in alive), "an earlier tensor is still referenced"
            tensor = real_load(name)
            alive.append(weakref.ref(tensor))
            return tensor

        source.load_tensor = load_tensor
        return source

    monkeypatch.setattr(models, "open_source", open_source)
    plan = QuantizePlan(spec=QuantSpec.parse("w4g32"), method="hqq", quantize_head=True, quantize_embeddings=True)
    quantize(folder, tmp_path / "out", plan)
    assert len(alive) > 5


@pytest.mark.parametrize("tied", [True, False])
def test_calibrated_report_counts_the_embedding(tmp_path, tied: bool) -> None:
    """The calibrated path quantizes the embedding with RTN, as the calibration-free path does; its
    report lists it too (it did not, so the printed totals left out the 152k-row table of a 1.5B) with
    the same figures, and the totals count every quantized tensor of the checkpoint."""
    import json

    from bitsmith.calib import calibration_batches
    from bitsmith.pipeline import layerwise
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize
    from bitsmith.spec import QuantSpec as Spec
    from tests.tiny import make_tiny_model, sample_text, tiny_tokenizer

    folder = make_tiny_model(tmp_path / "src", tie_word_embeddings=tied, num_hidden_layers=2)
    calib = calibration_batches(tiny_tokenizer(), sample_text(1000), samples=4, seq_len=32)
    reports = {}
    for method in ("gptq", "rtn"):
        plan = QuantizePlan(Spec.parse("w4g32"), method, quantize_head=True, quantize_embeddings=True, batch_size=2)
        out = tmp_path / method
        if method == "gptq":
            layerwise.quantize_blocks(folder, out, plan, calib)
        else:
            quantize(folder, out, plan)
        info = json.loads((out / "bitsmith.json").read_text())
        reports[method] = info["report"]
        by_name = {l["name"]: l for l in info["report"]["layers"]}
        assert sorted(by_name) == sorted(info["tensors"])  # every quantized tensor has its entry
        assert info["report"]["quantized_weights"] == sum(l["shape"][0] * l["shape"][1] for l in by_name.values())
    calibrated = {l["name"]: l for l in reports["gptq"]["layers"]}["model.embed_tokens"]
    free = {l["name"]: l for l in reports["rtn"]["layers"]}["model.embed_tokens"]
    for key in ("shape", "spec", "bits_per_weight", "sqnr_db"):
        assert calibrated[key] == free[key], key
    assert reports["gptq"]["quantized_weights"] == reports["rtn"]["quantized_weights"]
