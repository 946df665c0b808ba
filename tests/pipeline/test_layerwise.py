"""The layer-wise calibrated pipeline: streaming == a simple in-memory reference bit for bit,
resume == uninterrupted, spilled activations == in-memory, and GPTQ beats RTN on the model output."""

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tests.tiny import make_tiny_model, sample_text, tiny_tokenizer

from bitsmith.calib import calibration_batches
from bitsmith.io.checkpoint import CheckpointError
from bitsmith.methods import METHODS, LayerStats, get_method
from bitsmith.models import block_linears, build_model, find_blocks, open_source
from bitsmith.pipeline.capture import batch_slices
from bitsmith.pipeline.layerwise import find_stages, quantize_blocks
from bitsmith.pipeline.plan import QuantizePlan
from bitsmith.pipeline.quantize import quantize
from bitsmith.spec import QuantSpec

BATCH = 3
STAGES = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layerwise")
    return {arch: make_tiny_model(root / arch, arch, num_hidden_layers=3) for arch in ("llama", "qwen2", "gemma3_text")}


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return calibration_batches(tiny_tokenizer(), sample_text(2000), samples=7, seq_len=48)  # 7 = 3 + 3 + 1


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def reference_quantize(folder: Path, config: QuantizePlan, calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """The whole model in memory; block inputs caught by hooks on a real forward; each stage's
    Hessian summed by a hook while the full block runs; same batches, same float32 arithmetic."""
    net = build_model(open_source(folder), torch.float32)
    prefix, blocks = find_blocks(net)
    calls: list[list] = [[] for _ in blocks]
    inputs: list[torch.Tensor] = []

    def catch(i):
        def hook(module, args, kwargs):
            calls[i].append((args[1:], kwargs))
            if i == 0:
                inputs.append(args[0])
        return hook

    hooks = [b.register_forward_pre_hook(catch(i), with_kwargs=True) for i, b in enumerate(blocks)]
    slices = batch_slices(calib.shape[0], BATCH)
    with torch.no_grad():
        for sl in slices:
            net(input_ids=calib[sl], use_cache=False)
    for h in hooks:
        h.remove()
    hidden = torch.cat(inputs)
    method, out = get_method(config.method), {}
    with torch.no_grad():
        for i, block in enumerate(blocks):
            linears = block_linears(block)
            masters = {rel: lin.weight.clone() for rel, lin in linears.items()}
            for stage in STAGES:
                first = linears[stage[0]]
                h = torch.zeros(first.in_features, first.in_features)
                count = [0]

                def add(module, args, h=h, count=count):
                    x = args[0].reshape(-1, args[0].shape[-1]).float()
                    h.addmm_(x.T, x)
                    count[0] += x.shape[0]

                hook = first.register_forward_pre_hook(add)
                for sl, (args, kwargs) in zip(slices, calls[i]):
                    block(hidden[sl], *args, **kwargs)
                hook.remove()
                stats = LayerStats(hessian=h, importance=h.diagonal() / count[0], tokens=count[0])
                for rel in stage:
                    qt = method(masters[rel], config.spec, stats, config.options)
                    linears[rel].weight = torch.nn.Parameter(qt.dequantize(), requires_grad=False)
                    out.update(qt.to_state(f"{prefix}.{i}.{rel}"))
            hidden = torch.cat([block(hidden[sl], *args, **kwargs) for sl, (args, kwargs) in zip(slices, calls[i])])
    return out


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Same tensors bit for bit and the same metadata (safetensors writes its metadata keys in a
    random order, so the files' bytes may differ in the header)."""
    from safetensors import safe_open

    assert_same_tensors(tensors(a), tensors(b))
    with safe_open(str(a / "model.safetensors"), "pt") as fa, safe_open(str(b / "model.safetensors"), "pt") as fb:
        assert fa.metadata() == fb.metadata()


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_streaming_equals_in_memory(models, calib, tmp_path, arch, method) -> None:
    config = QuantizePlan(QuantSpec.parse("w4g32"), method, batch_size=BATCH)
    out = quantize_blocks(models[arch], tmp_path / "q", config, calib)
    got = tensors(out)
    want = reference_quantize(models[arch], config, calib)
    assert_same_tensors({k: v for k, v in got.items() if k in want}, want)
    source = open_source(models[arch])  # everything else as stored by the calibration-free path
    for name in source.tensor_names():
        if name.removesuffix(".weight") + ".qweight" not in got:
            assert name in got, name
    assert not (tmp_path / "q.partial").exists()


def test_stages_are_found_from_shared_inputs(models, calib) -> None:
    net = build_model(open_source(models["gemma3_text"]))
    _, blocks = find_blocks(net)
    captured = {}

    def hook(module, args, kwargs):
        captured.setdefault("call", (args[0], (args[1:], kwargs)))

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        net(input_ids=calib[:2], use_cache=False)
    handle.remove()
    hidden, call = captured["call"]
    with torch.no_grad():
        assert find_stages(blocks[0], block_linears(blocks[0]), hidden, call) == STAGES


def test_resume_after_crash_is_bit_identical(models, calib, tmp_path) -> None:
    config = QuantizePlan(QuantSpec.parse("w4g32"), "gptq", batch_size=BATCH)
    whole = quantize_blocks(models["llama"], tmp_path / "whole", config, calib)

    def crash(name: str, done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt("simulated crash after block 2")

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        quantize_blocks(models["llama"], out, config, calib, progress=crash)
    assert not out.exists()  # never a complete-looking folder before the end
    assert (tmp_path / "resumed.partial" / "manifest.json").exists()
    with pytest.raises(CheckpointError, match="--resume"):
        quantize_blocks(models["llama"], out, config, calib)
    other = QuantizePlan(QuantSpec.parse("w3g32"), "gptq", batch_size=BATCH)
    with pytest.raises(CheckpointError, match="different settings.*spec"):
        quantize_blocks(models["llama"], out, other, calib, resume=True)
    with pytest.raises(CheckpointError, match="different settings.*calib"):
        quantize_blocks(models["llama"], out, config, calib[:6], resume=True)
    fp32_reports = QuantizePlan(QuantSpec.parse("w4g32"), "gptq", batch_size=BATCH, report_dtype="fp32")
    with pytest.raises(CheckpointError, match="different settings.*report_dtype"):  # no mix of report figures
        quantize_blocks(models["llama"], out, fp32_reports, calib, resume=True)
    seen = []
    quantize_blocks(models["llama"], out, config, calib, resume=True,
                    progress=lambda name, done, total: seen.append(done))
    assert seen == [3]  # only the last block was left
    assert_same_checkpoint(out, whole)
    assert not (tmp_path / "resumed.partial").exists()


def test_spilled_activations_equal_in_memory(models, calib, tmp_path, caplog) -> None:
    config = QuantizePlan(QuantSpec.parse("w4g32"), "gptq", batch_size=BATCH)
    memory = quantize_blocks(models["qwen2"], tmp_path / "memory", config, calib)
    with caplog.at_level(logging.INFO, logger="bitsmith.pipeline.capture"):
        spilled = quantize_blocks(models["qwen2"], tmp_path / "spilled", replace(config, spill_bytes=1024), calib)
    assert "spill to" in caplog.text
    assert_same_checkpoint(memory, spilled)


def test_bf16_compute_runs_and_stays_close(models, calib, tmp_path) -> None:
    config = QuantizePlan(QuantSpec.parse("w4g32"), "gptq", batch_size=BATCH)
    a = tensors(quantize_blocks(models["llama"], tmp_path / "f32", config, calib))
    b = tensors(quantize_blocks(models["llama"], tmp_path / "bf16", replace(config, compute_dtype="bf16"), calib))
    assert set(a) == set(b)
    name = "model.layers.0.self_attn.q_proj.qweight"  # block 0's first stage sees the embedding in bf16
    assert (a[name] == b[name]).float().mean() > 0.8


def _kl_vs_float(model_dir: Path, ckpt: Path, ids: torch.Tensor) -> float:
    from bitsmith.runtime.load import load_model

    ref, quant = load_model(model_dir).model, load_model(ckpt).model
    with torch.no_grad():
        p = torch.log_softmax(ref(input_ids=ids, use_cache=False).logits.float(), -1)
        q = torch.log_softmax(quant(input_ids=ids, use_cache=False).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_gptq_beats_rtn_on_the_model_output(models, tmp_path) -> None:
    if "gptq" not in METHODS:
        get_method("rtn")  # registers the built-in methods
    if "gptq" not in METHODS:
        pytest.skip("bitsmith.methods.gptq is not available")
    tok = tiny_tokenizer()
    calib = calibration_batches(tok, sample_text(4000, seed=0), samples=16, seq_len=64)
    held_out = calibration_batches(tok, sample_text(1000, seed=1), samples=4, seq_len=64)
    spec = QuantSpec.parse("w3g32")
    kl = {}
    for method in ("rtn", "gptq"):
        out = quantize_blocks(models["llama"], tmp_path / method, QuantizePlan(spec, method, batch_size=8), calib)
        kl[method] = _kl_vs_float(models["llama"], out, held_out)
    assert kl["gptq"] < 0.8 * kl["rtn"], kl


def test_quantize_dispatches_calibrated_methods(models, tmp_path) -> None:
    from bitsmith.calib import CalibrationConfig
    from bitsmith.io.checkpoint import read_info

    text = tmp_path / "calib.txt"
    text.write_text(sample_text(2000))
    out = quantize(models["llama"], tmp_path / "q", QuantizePlan(QuantSpec.parse("w4g32"), "gptq",
                                                                 calib=CalibrationConfig(text=text, samples=4, seq_len=32)))
    info = read_info(out)
    assert info.method == "gptq" and info.options["calibration"]["samples"] == 4
    assert all("output_error" in layer for layer in info.report["layers"])
    # resume=True on a calibration-free plan continues from committed shards: tests/pipeline/test_stream_resume.py


def test_cli_gptq_with_calibration_file(models, tmp_path) -> None:
    from bitsmith.cli import main
    from bitsmith.io.checkpoint import read_info

    text = tmp_path / "calib.txt"
    text.write_text(sample_text(2000))
    out = tmp_path / "q"
    assert main(["quantize", str(models["llama"]), "--method", "gptq", "--spec", "w4g32", "--calib", str(text),
                 "--calib-samples", "4", "--calib-len", "32", "--out", str(out)]) == 0
    assert read_info(out).options["calibration"]["seq_len"] == 32


def test_cli_hqq_and_gptq_with_awq_accept_the_cli_options(tmp_path) -> None:
    """The CLI passes clip_search (and awq) to every method; hqq and gptq must accept them."""
    from tests.tiny import make_tiny_model, sample_text

    from bitsmith.cli import main

    src = make_tiny_model(tmp_path / "m")
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text(3000))
    assert main(["quantize", str(src), "--spec", "w4g32", "--method", "hqq", "--no-clip-search", "--out", str(tmp_path / "h")]) == 0
    assert main(["quantize", str(src), "--spec", "w4g32", "--method", "gptq", "--awq", "--calib", str(calib),
                 "--calib-samples", "4", "--calib-len", "32", "--out", str(tmp_path / "g")]) == 0


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_output_replay_changes_nothing(models, calib, tmp_path, arch) -> None:
    """Replaying finished sub-modules (q/k/v, attention, gate/up) instead of recomputing them gives
    the same checkpoint as recomputing everything (budget 0) and as a small budget (partial replay)."""
    config = QuantizePlan(QuantSpec.parse("w4g32"), "gptq", batch_size=BATCH)
    full = quantize_blocks(models[arch], tmp_path / "full", config, calib)
    none = quantize_blocks(models[arch], tmp_path / "none", replace(config, replay_bytes=0), calib)
    some = quantize_blocks(models[arch], tmp_path / "some", replace(config, replay_bytes=20_000), calib)
    assert_same_tensors(tensors(full), tensors(none))
    assert_same_tensors(tensors(full), tensors(some))


def test_output_replay_skips_recomputation(models, calib) -> None:
    """After q/k/v are marked done, a pass records them; the next pass calls none of their forwards."""
    from bitsmith.pipeline.layerwise import OutputReplay

    net = build_model(open_source(models["llama"]))
    block = find_blocks(net)[1][0]
    linears = block_linears(block)
    calls = []
    hooks = [lin.register_forward_pre_hook(lambda m, a, rel=rel: calls.append(rel)) for rel, lin in linears.items()]
    hidden = torch.randn(2, 5, net.config.hidden_size)
    pos = torch.arange(5)[None].expand(2, 5)
    kwargs = {"position_embeddings": net.model.rotary_emb(hidden, pos), "attention_mask": None}
    replay = OutputReplay(block, linears, batches=1, budget=1 << 30)
    with torch.no_grad():
        want = block(hidden, **kwargs)
        replay.mark_done(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"])
        for _ in range(2):
            calls.clear()
            with replay.active():
                got = block(hidden, **kwargs)
            assert torch.equal(got[0] if isinstance(got, tuple) else got, want[0] if isinstance(want, tuple) else want)
    assert not any(c.startswith("self_attn") for c in calls) and "mlp.down_proj" in calls
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("budget,replayed", [(1 << 30, True), (4 * 2 * 5 * 64 * 4 - 1, False)])
def test_output_replay_replays_norms_within_their_share(models, budget, replayed) -> None:
    """A norm (no linears) that completes in a pass is replayed afterwards, bit for bit, when its
    outputs fit in FREE_SHARE of the budget; past that share it is recomputed."""
    from bitsmith.pipeline.layerwise import OutputReplay
    from bitsmith.pipeline.replay import FREE_SHARE

    net = build_model(open_source(models["llama"]))
    block = find_blocks(net)[1][0]
    linears = block_linears(block)
    outs = []  # the norm's output per call: the recorded tensor itself when replayed
    block.input_layernorm.register_forward_hook(lambda m, a, out: outs.append(out))
    hidden = torch.randn(2, 5, net.config.hidden_size)
    pos = torch.arange(5)[None].expand(2, 5)
    kwargs = {"position_embeddings": net.model.rotary_emb(hidden, pos), "attention_mask": None}
    assert 2 * 5 * net.config.hidden_size * 4 <= budget * FREE_SHARE or not replayed
    replay = OutputReplay(block, linears, batches=1, budget=budget)
    with torch.no_grad():
        want = block(hidden, **kwargs)
        want = want[0] if isinstance(want, tuple) else want
        for _ in range(3):
            outs.clear()
            with replay.active():
                got = block(hidden, **kwargs)
            assert torch.equal(got[0] if isinstance(got, tuple) else got, want)
    recorded = replay._cache.get("input_layernorm")
    assert (recorded is not None) == replayed
    assert len(outs) == 1 and (recorded is not None and outs[0] is recorded[0]) == replayed


@pytest.mark.parametrize("spec", ["w4g32nf", "w3g32fit"])
def test_gptq_with_grids_writes_a_loadable_checkpoint(models, calib, tmp_path, spec) -> None:
    """q/k/v (and gate/up) quantized as one stacked GPTQ problem share one grid tensor; the block file
    and the checkpoint must still be written (safetensors refuses shared storage) and load back."""
    from bitsmith.runtime.load import load_model

    out = quantize_blocks(models["llama"], tmp_path / "q", QuantizePlan(QuantSpec.parse(spec), "gptq", batch_size=8), calib)
    model = load_model(out).model
    q, k = model.model.layers[0].self_attn.q_proj.quantized(), model.model.layers[0].self_attn.k_proj.quantized()
    assert q.grid is not None and torch.equal(q.grid, k.grid) if spec.endswith("nf") else q.grid is not None
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(8)[None]).logits).all()


def test_output_replay_tail_skips_the_attention_core(models) -> None:
    """The pass that stops at o_proj records its input; once o_proj is done, the attention module is
    computed as o_proj(recorded input) (checked for real on the first batch only), and the pass
    after that replays the attention's recorded output: the same outputs, bit for bit."""
    from bitsmith.pipeline.layerwise import OutputReplay

    net = build_model(open_source(models["llama"]))
    block = find_blocks(net)[1][0]
    linears = block_linears(block)
    q_calls = []
    q_hook = block.self_attn.q_proj.register_forward_pre_hook(lambda m, a: q_calls.append(1))
    batches = [torch.randn(2, 5, net.config.hidden_size, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    pos = torch.arange(5)[None].expand(2, 5)
    kwargs = {"position_embeddings": net.model.rotary_emb(batches[0], pos), "attention_mask": None}

    class Stop(Exception):
        pass

    with torch.no_grad():
        want = [block(x, **kwargs)[0] if isinstance(block(x, **kwargs), tuple) else block(x, **kwargs) for x in batches]
        replay = OutputReplay(block, linears, batches=len(batches), budget=1 << 30)
        replay.mark_done(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])
        tail = replay.tail_recorder("self_attn.o_proj")
        assert tail == []

        def catch(m, a):
            tail.append(a[0])
            raise Stop

        stop = block.self_attn.o_proj.register_forward_pre_hook(catch)
        with replay.active():  # the pass of the o_proj stage: stops at o_proj
            for b, x in enumerate(batches):
                replay.batch = b
                with pytest.raises(Stop):
                    block(x, **kwargs)
        stop.remove()
        replay.mark_done(["self_attn.o_proj"])
        replay.keep_tail("self_attn.o_proj", tail)
        for expected_q_calls in (1, 0):  # tail pass: only batch 0 runs the attention for real; then replayed
            q_calls.clear()
            with replay.active():
                for b, x in enumerate(batches):
                    replay.batch = b
                    got = block(x, **kwargs)
                    assert torch.equal(got[0] if isinstance(got, tuple) else got, want[b])
            assert len(q_calls) == expected_q_calls
    q_hook.remove()


def test_gptq_with_quantized_head_reloads_the_released_embedding(models, calib, tmp_path) -> None:
    """The input embedding is released after capture and loaded again for the head's statistics:
    the quantized head is written and the checkpoint runs."""
    from bitsmith.runtime.load import load_model

    config = QuantizePlan(QuantSpec.parse("w4g32"), "gptq", quantize_head=True, batch_size=BATCH)
    out = quantize_blocks(models["llama"], tmp_path / "q", config, calib)
    model = load_model(out).model
    assert model.lm_head.quantized() is not None
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(8)[None]).logits).all()


def test_awq_quantizes_with_min_max_ranges_unless_asked(models, calib, tmp_path) -> None:
    """After AWQ's output-aware clipping, RTN keeps plain min/max ranges by default (the choice is
    recorded in the checkpoint); an explicit clip_search=True is kept."""
    from bitsmith.io.checkpoint import read_info

    plain = quantize_blocks(models["llama"], tmp_path / "a", QuantizePlan(QuantSpec.parse("w4g32"), "awq", batch_size=BATCH),
                            calib)
    asked = quantize_blocks(models["llama"], tmp_path / "b",
                            QuantizePlan(QuantSpec.parse("w4g32"), "awq", {"clip_search": True}, batch_size=BATCH), calib)
    assert read_info(plain).options["clip_search"] is False
    assert read_info(asked).options["clip_search"] is True


def test_spilled_tail_returns_the_same_bits(tmp_path) -> None:
    """A tail kept in a file: every batch back as the same bits and dtype, from concurrent readers."""
    from concurrent.futures import ThreadPoolExecutor

    from bitsmith.pipeline.replay import SpilledTail

    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 7, 40, generator=g).to(dtype) for dtype in (torch.bfloat16, torch.float32, torch.float16)]
    batches.append(torch.randn(2, 9, generator=g).bfloat16()[:, ::2])  # not contiguous
    tail = SpilledTail(tmp_path / "tail.bin")
    for x in batches:
        tail.append(x)
    assert len(tail) == len(batches)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: tail[i], [3, 2, 1, 0, 0, 1, 2, 3]))
    for i, y in zip([3, 2, 1, 0, 0, 1, 2, 3], got):
        assert y.dtype == batches[i].dtype and torch.equal(y, batches[i])
    tail.close()
    assert not (tmp_path / "tail.bin").exists()


def test_tails_beyond_the_budget_are_spilled_and_change_nothing(models, calib, tmp_path, monkeypatch) -> None:
    """With a budget too small for any tail, the tails go to a file and are read back in the later
    passes instead of recomputing their parents: the same checkpoint as recomputing everything."""
    from bitsmith.pipeline import replay as replay_module

    reads = []
    real_get = replay_module.SpilledTail.__getitem__
    monkeypatch.setattr(replay_module.SpilledTail, "__getitem__", lambda self, i: reads.append(i) or real_get(self, i))
    config = QuantizePlan(QuantSpec.parse("w4g32"), "gptq", batch_size=BATCH)
    none = quantize_blocks(models["llama"], tmp_path / "none", replace(config, replay_bytes=0), calib)
    assert reads  # budget 0: every tail was spilled, and read back
    reads.clear()
    monkeypatch.setattr(replay_module.SpilledTail, "__getitem__", lambda self, i: (_ for _ in ()).throw(AssertionError))
    monkeypatch.setattr("bitsmith.pipeline.stages._spilled", lambda kept, path: (_ for _ in ()).throw(AssertionError))
    big = quantize_blocks(models["llama"], tmp_path / "big", config, calib)  # everything fits: no file
    assert_same_tensors(tensors(none), tensors(big))
    assert not list((tmp_path).glob("*.partial"))  # the work folder (and the tail file) removed


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_calibrated_head_on_an_untied_model(models, calib, tmp_path, arch) -> None:
    """The head's statistics come from a real forward with the embedding reloaded: Gemma-3's embedding
    scales by a buffer that is not in the state dict (embed_scale), which releasing the table to the
    meta device used to take with it ("Tensor on device meta" at the head)."""
    config = QuantizePlan(QuantSpec.parse("w4g32"), "gptq", batch_size=BATCH, quantize_head=True)
    got = tensors(quantize_blocks(models[arch], tmp_path / "q", config, calib))
    assert "lm_head.qweight" in got and "lm_head.weight" not in got


def test_a_parent_with_two_one_linear_stages_gets_its_last_tail() -> None:
    """A module whose two linears are stages of their own (a then b, each with a recorded tail input) is
    computed from its last tail, the linear whose output it returns; two tails used to patch it twice, and
    leaving the pass raised AttributeError."""
    from torch import nn

    from bitsmith.pipeline.replay import OutputReplay

    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Parent()

        def forward(self, x):
            return x + self.inner(x)

    torch.manual_seed(0)
    block = Block()
    linears = {"inner.a": block.inner.a, "inner.b": block.inner.b}
    batches = [torch.randn(3, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        want = [block(x) for x in batches]
        replay = OutputReplay(block, linears, batches=len(batches), budget=1 << 30)
        for rel in ("inner.a", "inner.b"):  # each stage's pass records its linear's input as a tail
            tail = replay.tail_recorder(rel)
            hook = linears[rel].register_forward_pre_hook(lambda m, a, tail=tail: tail.append(a[0]))
            with replay.active():
                for b, x in enumerate(batches):
                    replay.batch = b
                    block(x)
            hook.remove()
            replay.mark_done([rel])
            replay.keep_tail(rel, tail)
        for _ in range(2):
            with replay.active():
                for b, x in enumerate(batches):
                    replay.batch = b
                    assert torch.equal(block(x), want[b])


def test_awq_runs_only_the_sequences_its_search_reads(models, calib, tmp_path, monkeypatch) -> None:
    """AWQ's final min/max RTN reads no statistics, so only the calibration sequences AWQ's searches read
    run through the blocks: the checkpoint's tensors equal those of the run over every sequence (its oracle,
    the selection switched off), and the checkpoint records the sequences used. A quantizer that reads
    statistics (RTN with its clip search, GPTQ) keeps them all."""
    from bitsmith.io.checkpoint import read_info

    plan = QuantizePlan(QuantSpec.parse("w4g32"), "awq", {"awq_tokens": 96}, batch_size=BATCH)  # 2 of 7 sequences
    assert plan.calibration_windows(7, 48) == [0, 6]
    assert QuantizePlan(QuantSpec.parse("w4g32"), "awq", {"awq_tokens": 96, "clip_search": True}).calibration_windows(7, 48) is None
    assert QuantizePlan(QuantSpec.parse("w4g32"), "gptq", {"awq": True, "awq_tokens": 96}).calibration_windows(7, 48) is None
    assert QuantizePlan(QuantSpec.parse("w4g32"), "awq").calibration_windows(7, 48) is None  # 4096 tokens: all 7
    fast = quantize_blocks(models["qwen2"], tmp_path / "fast", plan, calib)
    monkeypatch.setattr(QuantizePlan, "calibration_windows", lambda self, samples, seq_len: None)
    every = quantize_blocks(models["qwen2"], tmp_path / "every", plan, calib)
    a, b = tensors(fast), tensors(every)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_info(fast).options["calibration"]["samples"] == 2
    assert read_info(every).options["calibration"]["samples"] == 7
