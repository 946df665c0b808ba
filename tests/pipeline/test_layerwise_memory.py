"""Memory of the calibrated pipeline outside the blocks (issue 18: GPTQ on Qwen2.5-1.5B within 40% of
its fp32 size). The w8 embedding's RTN is made a slice of rows at a time with the heap trimmed between
slices (``rtn_by_rows``), held bit for bit to the whole-tensor ``rtn``; and the 0.93 GB float32 tables
(embedding, head) are released before their codes are packed and written."""

from __future__ import annotations

import weakref
from dataclasses import replace

import pytest
import torch

from bitsmith.methods import rtn as rtn_module
from bitsmith.pipeline import embedding, layerwise
from bitsmith.primitives import to_groups
from bitsmith.spec import QuantSpec


def _small_row_slices(groups, weights_per_slice=None):
    """rtn's search slices at 1,000 weights instead of 4M, so small tensors take the sliced paths."""
    rows = max(1, 1000 // max(1, groups[0].numel()))
    return [slice(i, i + rows) for i in range(0, groups.shape[0], rows)]


@pytest.mark.parametrize("text,rows,cols", [("w8", 203, 200), ("w4g128", 150, 200), ("w3g64s", 97, 96),
                                             ("w4g32nf", 130, 64), ("w2g32", 61, 72)])
@pytest.mark.parametrize("clip_search", [True, False])
def test_rtn_by_rows_equals_rtn(monkeypatch, text: str, rows: int, cols: int, clip_search: bool) -> None:
    """Same codes, scales, zeros and grid as one rtn call on the whole weight (fresh random weights,
    ragged rows and a short last group), in slices of at most RTN_SLICES search slices, with a heap
    trim after each slice."""
    g = torch.Generator().manual_seed(rows * cols + clip_search)
    weight = torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(cols, generator=g))
    weight[5] = 0.0  # an all-zero row
    spec, options = QuantSpec.parse(text), {"clip_search": clip_search}
    whole = rtn_module.rtn(weight, spec, None, options)  # the oracle: rtn's own whole-tensor slicing

    monkeypatch.setattr(rtn_module, "row_slices", _small_row_slices)
    seen, trims = [], []
    real_rtn = rtn_module.rtn
    monkeypatch.setattr(rtn_module, "rtn", lambda w, *a: seen.append(w.shape[0]) or real_rtn(w, *a))
    monkeypatch.setattr(embedding, "trim_heap", lambda: trims.append(1))
    sliced = embedding.rtn_by_rows(weight, spec, options)

    step = _small_row_slices(to_groups(weight, spec))[0].stop * embedding.RTN_SLICES
    assert len(seen) == -(-rows // step) > 1 and max(seen) <= step  # sliced, never more rows than a slice
    assert len(trims) == len(seen)
    assert torch.equal(sliced.codes, whole.codes) and torch.equal(sliced.scale, whole.scale)
    assert (sliced.zero is None) == (whole.zero is None)
    assert sliced.zero is None or torch.equal(sliced.zero, whole.zero)
    assert (sliced.grid is None) == (whole.grid is None)
    assert sliced.grid is None or torch.equal(sliced.grid, whole.grid)


def test_rtn_by_rows_keeps_per_tensor_grids_whole(monkeypatch) -> None:
    """A fitted grid is fitted on the whole tensor: no slices (one rtn call, the same result)."""
    weight = torch.randn(90, 64, generator=torch.Generator().manual_seed(3))
    spec = QuantSpec.parse("w3g32fit")
    monkeypatch.setattr(rtn_module, "row_slices", _small_row_slices)
    calls = []
    real_rtn = rtn_module.rtn
    monkeypatch.setattr(rtn_module, "rtn", lambda w, *a: calls.append(w.shape[0]) or real_rtn(w, *a))
    sliced = embedding.rtn_by_rows(weight, spec, {})
    assert calls == [90]
    assert torch.equal(sliced.codes, real_rtn(weight, spec, None, {}).codes)


def test_float_tables_are_released_before_their_codes_are_written(tmp_path, monkeypatch) -> None:
    """The embedding (quantized outside the blocks) and the untied head (quantized last) are no longer
    referenced when the writer packs their codes: on Qwen2.5-1.5B each is 0.93 GB of float32, and the
    embedding's was the whole run's peak."""
    from bitsmith.calib import calibration_batches
    from bitsmith.io.checkpoint import CheckpointWriter
    from bitsmith.pipeline.plan import QuantizePlan
    from tests.tiny import make_tiny_model, sample_text, tiny_tokenizer

    folder = make_tiny_model(tmp_path / "src", tie_word_embeddings=False, num_hidden_layers=2)
    calib = calibration_batches(tiny_tokenizer(), sample_text(1000), samples=4, seq_len=32)
    last_load: dict[str, weakref.ref] = {}
    watch_loads(monkeypatch, lambda name, tensor: last_load.__setitem__(name, weakref.ref(tensor)))
    checked = []
    real_add = CheckpointWriter.add_quantized

    def add_quantized(self, module_name, qt, report=None):
        ref = last_load.get(f"{module_name}.weight")
        if module_name in ("model.embed_tokens", "lm_head"):
            assert ref is not None and ref() is None, f"{module_name}'s float weight is still referenced"
            checked.append(module_name)
        return real_add(self, module_name, qt, report)

    monkeypatch.setattr(CheckpointWriter, "add_quantized", add_quantized)
    plan = QuantizePlan(QuantSpec.parse("w4g32"), "gptq", quantize_head=True, quantize_embeddings=True, batch_size=2)
    layerwise.quantize_blocks(folder, tmp_path / "q", plan, calib)
    assert sorted(checked) == ["lm_head", "model.embed_tokens"]


def test_stages_are_solved_on_a_trimmed_heap(monkeypatch) -> None:
    """Every stage is solved after a trim of the heap beyond the run's kept bound (0 on the 1.5B: always;
    the gate/up solve on the heap its statistics pass left was that model's block peak), a stage at
    least SOLVE_TRIM_WIDTH inputs wide (the 1.5B's down_proj) after an unconditional one, also where
    the run keeps a heap; Hessian-free statistics alike; the statistics pass through unchanged."""
    from bitsmith.methods import LayerStats

    trims = []
    monkeypatch.setattr(layerwise, "_trim_heap", lambda keep_free=0: trims.append(keep_free))
    monkeypatch.setattr(layerwise, "SOLVE_TRIM_WIDTH", 64)
    for width, keep, expected in ((63, 0, 0), (63, 5, 5), (64, 5, 0), (100, 5, 0), (100, 0, 0)):
        stats = LayerStats(hessian=torch.eye(width), importance=torch.ones(width), tokens=1)
        trims.clear()
        assert layerwise._before_solve(stats, keep) is stats
        assert trims == [expected]
    trims.clear()
    layerwise._before_solve(LayerStats(importance=torch.ones(8)), 7)
    assert trims == [7]


@pytest.mark.parametrize("keep", [0, 12345])
def test_the_run_trims_before_every_solve(tmp_path, monkeypatch, keep: int) -> None:
    """The run hands its kept-heap bound (heap_keep_bytes) to _before_solve, once per stage (4 per block)."""
    from bitsmith.calib import calibration_batches
    from bitsmith.pipeline.plan import QuantizePlan
    from tests.tiny import make_tiny_model, sample_text, tiny_tokenizer

    folder = make_tiny_model(tmp_path / "src", num_hidden_layers=2)
    calib = calibration_batches(tiny_tokenizer(), sample_text(1000), samples=4, seq_len=32)
    seen = []
    real = layerwise._before_solve
    monkeypatch.setattr(layerwise, "_before_solve", lambda stats, keep=0: (seen.append(keep), real(stats, keep))[1])
    monkeypatch.setattr(layerwise, "heap_keep_bytes", lambda source, plan: keep)
    plan = QuantizePlan(QuantSpec.parse("w4g32"), "gptq", batch_size=2)
    layerwise.quantize_blocks(folder, tmp_path / "q", plan, calib)
    assert seen == [keep] * (4 * 2)


@pytest.mark.parametrize("workers", [1, 2])
def test_no_summed_stage_input_outlives_its_batch(tmp_path, monkeypatch, workers: int) -> None:
    """Once a batch's stage input is summed into the statistics (and spilled), nothing keeps it: not the
    catching thread's local (batch 0 runs on the caller's thread, so that held it for the whole pass), not
    the summing loop's variable while the next wave runs. On Qwen2.5-1.5B each is 70 MiB (down_proj's
    8,960-wide input of 4,096 tokens), and both sat under the next wave's MLP temporaries at the
    statistics pass's peak. Checked at the start of every later block forward, waves of 1 and 2 batches."""
    from bitsmith.calib import calibration_batches
    from bitsmith.calib.stats import StatsAccumulator
    from bitsmith.pipeline import batches, stages
    from bitsmith.pipeline.plan import QuantizePlan
    from tests.tiny import make_tiny_model, sample_text, tiny_tokenizer

    folder = make_tiny_model(tmp_path / "src", "qwen2", num_hidden_layers=2)
    calib = calibration_batches(tiny_tokenizer(), sample_text(2000), samples=9, seq_len=32)  # 5 batches of 2, 1
    summed, alive, forwards = [], [], []
    real_add = StatsAccumulator.add

    def add(self, x):
        summed.append(weakref.ref(x))
        return real_add(self, x)

    def forward_starts(module, args):
        forwards.append(1)
        alive.extend(ref() is not None for ref in summed)

    real_stats = stages.stage_stats

    def stage_stats(block, *args, **kwargs):
        summed.clear()
        hook = block.register_forward_pre_hook(forward_starts)
        try:
            return real_stats(block, *args, **kwargs)
        finally:
            hook.remove()

    def run_batches(fn, count, workers_=None):
        return batches.run_batches(fn, count, workers)

    monkeypatch.setattr(StatsAccumulator, "add", add)
    monkeypatch.setattr(layerwise, "stage_stats", stage_stats)
    monkeypatch.setattr(stages, "run_batches", run_batches)
    plan = replace(QuantizePlan(QuantSpec.parse("w4g32"), "gptq", batch_size=2), replay_bytes=0)  # no replay keeps one
    layerwise.quantize_blocks(folder, tmp_path / "q", plan, calib)
    assert len(forwards) == 2 * 4 * 5 and alive and not any(alive)


def test_the_heap_is_trimmed_after_the_swap_before_each_pass(tmp_path, monkeypatch) -> None:
    """Per stage: the statistics pass, a trim (_before_solve), the solve, the dequantized weights swapped
    in, then a trim before the next pass (or the block's final forward). The swap's and the solve's freed
    heap was trimmed before the swap before, so the swap's own leftovers (0-260 MiB on the 1.5B at two
    threads) sat under down_proj's statistics pass, the run's peak."""
    from bitsmith.calib import calibration_batches
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.tensor import QuantizedTensor
    from tests.tiny import make_tiny_model, sample_text, tiny_tokenizer

    folder = make_tiny_model(tmp_path / "src", num_hidden_layers=1)
    calib = calibration_batches(tiny_tokenizer(), sample_text(1000), samples=4, seq_len=32)
    events, solving = [], []
    real_stats, real_solve, real_weight = layerwise.stage_stats, layerwise.quantize_stage, QuantizedTensor.weight

    def solve(*args, **kwargs):
        solving.append(1)
        try:
            return real_solve(*args, **kwargs)
        finally:
            solving.pop()
            events.append("solve")

    def weight(self):
        if not solving and events[-1:] != ["swap"]:
            events.append("swap")
        return real_weight(self)

    monkeypatch.setattr(layerwise, "stage_stats", lambda *a, **k: (events.append("pass"), real_stats(*a, **k))[1])
    monkeypatch.setattr(layerwise, "quantize_stage", solve)
    monkeypatch.setattr(QuantizedTensor, "weight", weight)
    monkeypatch.setattr(layerwise, "_trim_heap", lambda keep_free=0: events.append("trim"))
    plan = QuantizePlan(QuantSpec.parse("w4g32"), "gptq", batch_size=2)
    layerwise.quantize_blocks(folder, tmp_path / "q", plan, calib)
    start = events.index("pass")
    assert events[start:start + 5 * 4] == ["pass", "trim", "solve", "swap", "trim"] * 4


@pytest.mark.parametrize("tied", [False, True])
def test_a_bf16_head_goes_to_gptq_in_bf16_with_the_same_result(tmp_path, monkeypatch, tied: bool) -> None:
    """A bf16 checkpoint's head is read in bf16 for GPTQ (half of float32's bytes while it is quantized:
    0.47 GB on Qwen2.5-1.5B) and the checkpoint is byte for byte the one a float32 head gives."""
    from bitsmith.calib import calibration_batches
    from bitsmith.pipeline.plan import QuantizePlan
    from tests.tiny import make_tiny_model, sample_text, tiny_tokenizer

    folder = make_tiny_model(tmp_path / "src", dtype=torch.bfloat16, tie_word_embeddings=tied, num_hidden_layers=1)
    calib = calibration_batches(tiny_tokenizer(), sample_text(1000), samples=4, seq_len=32)
    loaded: dict[str, torch.dtype] = {}  # the dtype of the last load of each name (a tied head: the embedding's)
    watch_loads(monkeypatch, lambda name, tensor: loaded.__setitem__(name, tensor.dtype))
    plan = QuantizePlan(QuantSpec.parse("w4g32"), "gptq", quantize_head=True, batch_size=2)
    layerwise.quantize_blocks(folder, tmp_path / "half", plan, calib)
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert loaded[head] == torch.bfloat16
    loaded.clear()
    monkeypatch.setattr(layerwise, "_head_in_half", lambda plan: False)
    layerwise.quantize_blocks(folder, tmp_path / "float", plan, calib)
    assert loaded[head] == torch.float32
    half, whole = (tmp_path / d / "model.safetensors" for d in ("half", "float"))
    assert half.read_bytes() == whole.read_bytes()


def watch_loads(monkeypatch: pytest.MonkeyPatch, record) -> None:
    """Every source the pipeline opens calls ``record(name, tensor)`` for each tensor it loads."""
    import bitsmith.models as models

    real_open = models.open_source

    def open_source(model):
        source = real_open(model)
        real_load = source.load_tensor

        def load_tensor(name, **kwargs):
            tensor = real_load(name, **kwargs)
            record(name, tensor)
            return tensor

        source.load_tensor = load_tensor
        return source

    monkeypatch.setattr(models, "open_source", open_source)
