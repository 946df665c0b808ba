"""Quantize -> save -> load on tiny random models: identical logits, honest sizes, clean failures."""

import errno
import json
from pathlib import Path

import pytest
import torch
from tests.tiny import make_tiny_model

from bitsmith.io.checkpoint import CheckpointError, read_info
from bitsmith.runtime.load import load_model
from bitsmith.methods import get_method
from bitsmith.models import ModelSourceError
from bitsmith.nn.qlinear import QuantLinear
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.pipeline.plan import QuantizePlan
from bitsmith.pipeline.quantize import quantize
from bitsmith.spec import QuantSpec, SpecError

IDS = torch.tensor([[1, 3, 4, 5, 6, 7, 8, 9, 10, 11]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("src") / "tiny", intermediate_size=80)


@pytest.mark.parametrize("spec", ["w8", "w4g32", "w3g64s", "w2g32", "w5g32", "w6s"])
def test_save_load_gives_identical_logits(tiny: Path, tmp_path: Path, spec: str, monkeypatch) -> None:
    # The reference kernel, so the comparison is exact; fast kernels are checked against it elsewhere.
    ckpt = quantize(tiny, tmp_path / "q", QuantizePlan(QuantSpec.parse(spec)))
    loaded = load_model(ckpt, options=RuntimeOptions(kernel="reference"))
    # The same quantization done in memory on the original weights, applied by hand.
    expected = load_model(tiny).model
    rtn = get_method("rtn")
    for name, module in list(expected.named_modules()):
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            module.weight.data = rtn(module.weight.data, QuantSpec.parse(spec), None, {}).dequantize()
    for module in (expected.model.embed_tokens, expected.lm_head):  # stored as fp16 by default
        module.weight.data = module.weight.data.half().float()
    assert torch.equal(_logits(loaded.model), _logits(expected))
    quantized = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 2 * 7  # 2 blocks x (q, k, v, o, gate, up, down)


def test_short_last_group_and_size_match_theory(tiny: Path, tmp_path: Path) -> None:
    # intermediate 80 with group 32: down_proj rows end in a 16-weight group.
    spec = QuantSpec.parse("w4g32")
    ckpt = quantize(tiny, tmp_path / "q", QuantizePlan(spec))
    info = read_info(ckpt)
    assert info.shapes["model.layers.0.mlp.down_proj"] == (64, 80)
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        stored = sum(
            f.get_tensor(k).numel() * f.get_tensor(k).element_size() * 8
            for k in f.keys() if k.rsplit(".", 1)[-1] in ("qweight", "scale", "zero")
        )
    assert stored == sum(spec.stored_bits(*shape) for shape in info.shapes.values())
    assert info.report["bits_per_weight"] <= 4 + 32 / 32 + 0.1
    assert QuantSpec.parse("w4g128").bits_per_weight(576, 576) <= 4.3


def test_quantlinear_equals_dequantize_then_matmul() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 200, generator=gen)
    qt = get_method("rtn")(w, QuantSpec.parse("w3g64"), None, {})
    x = torch.randn(5, 200, generator=gen)
    bias = torch.randn(48, generator=gen)
    layer = QuantLinear(qt, bias)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, qt.dequantize(), bias), rtol=1e-5, atol=1e-5)


def test_quantize_head_untied(tmp_path: Path) -> None:
    src = make_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    ckpt = quantize(src, tmp_path / "q", QuantizePlan(QuantSpec.parse("w8"), quantize_head=True))
    loaded = load_model(ckpt)
    assert isinstance(loaded.model.lm_head, QuantLinear)
    ref = load_model(src).model
    assert torch.allclose(_logits(loaded.model), _logits(ref), atol=0.05)


def test_existing_output_folder_is_refused(tiny: Path, tmp_path: Path) -> None:
    (tmp_path / "q").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        quantize(tiny, tmp_path / "q", QuantizePlan(QuantSpec.parse("w4g32")))


def test_group_larger_than_row_is_refused(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="larger than .* row of 64"):
        quantize(tiny, tmp_path / "q", QuantizePlan(QuantSpec.parse("w4g128")))
    assert list(tmp_path.iterdir()) == []


def test_nan_weight_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    src = make_tiny_model(tmp_path / "nan")
    from safetensors.torch import load_file, save_file

    state = load_file(src / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelSourceError, match="up_proj"):
        quantize(src, tmp_path / "q", QuantizePlan(QuantSpec.parse("w4g32")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan"]


def test_full_disk_leaves_no_output(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    import bitsmith.io.checkpoint as checkpoint

    written = []

    def full(f, t):  # the disk fills up part-way through the checkpoint, in the middle of a tensor
        if len(written) == 3:
            f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(t.numel())
        f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)

    monkeypatch.setattr(checkpoint, "_write_tensor_bytes", full)
    with pytest.raises(CheckpointError, match="no space left"):
        quantize(tiny, tmp_path / "q", QuantizePlan(QuantSpec.parse("w4g32")))
    assert list(tmp_path.iterdir()) == []


def test_report_records_per_layer_error(tiny: Path, tmp_path: Path) -> None:
    ckpt = quantize(tiny, tmp_path / "q", QuantizePlan(QuantSpec.parse("w4g32")))
    report = json.loads((ckpt / "bitsmith.json").read_text())
    assert report["format"] == "bitsmith" and report["method"] == "rtn"
    layers = report["report"]["layers"]
    assert len(layers) == 14 and all(l["sqnr_db"] > 10 for l in layers)


@pytest.mark.parametrize("tied", [False, True])
def test_quantize_embeddings(tmp_path: Path, tied: bool) -> None:
    from bitsmith.nn.qembedding import QuantEmbedding

    src = make_tiny_model(tmp_path / "m", tie_word_embeddings=tied)
    ckpt = quantize(src, tmp_path / "q", QuantizePlan(QuantSpec.parse("w8"), quantize_embeddings=True))
    loaded = load_model(ckpt)
    assert isinstance(loaded.model.model.embed_tokens, QuantEmbedding)
    assert isinstance(loaded.model.lm_head, QuantLinear) == tied
    ref = load_model(src).model
    assert torch.allclose(_logits(loaded.model), _logits(ref), atol=0.05)
    emb = loaded.model.model.embed_tokens
    torch.testing.assert_close(emb(IDS)[0], emb.qt.dequantize()[IDS[0]])


@pytest.mark.parametrize("spec", ["w4g32nf", "w3g32fit"])
def test_grid_checkpoints_run_on_the_default_kernel(tiny: Path, tmp_path: Path, spec: str) -> None:
    ckpt = quantize(tiny, tmp_path / "q", QuantizePlan(QuantSpec.parse(spec)))
    loaded = load_model(ckpt)
    layer = loaded.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.quantized().dequantize()), rtol=1e-5, atol=1e-5)
    assert loaded.info.specs["model.layers.0.self_attn.q_proj"] == QuantSpec.parse(spec)


def test_write_safetensors_round_trip(tmp_path) -> None:
    """The streaming writer's files read back with the safetensors package: every dtype the
    checkpoints use, an empty tensor, a non-contiguous one, shared storage and the metadata."""
    from safetensors import safe_open

    from bitsmith.io.checkpoint import write_safetensors

    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    tensors = {
        "a.f32": base, "b.f16": base.half(), "c.bf16": base.bfloat16(), "d.u8": torch.randint(0, 255, (7,), dtype=torch.uint8),
        "e.i64": torch.arange(5), "f.empty": torch.zeros(0, 3), "g.t": base.T, "h.shared": base[:3],
        "i.bool": torch.tensor([True, False, True]), "j.i32": torch.tensor([[1, -2]], dtype=torch.int32),
        "k.param": torch.nn.Parameter(torch.ones(2, 3)),
    }
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors, {"k": "v"})
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"k": "v"}
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name


def test_writer_streams_shards_and_reads_back(tmp_path: Path) -> None:
    """Small shards: tensors and quantized layers spread over several files, each closed when the
    next tensor would overflow it (an oversized tensor gets a shard of its own); the index maps
    every name; nothing but finished shards is left; a name written twice is an error."""
    import json as _json

    from safetensors import safe_open

    from bitsmith.io.checkpoint import CheckpointWriter

    g = torch.Generator().manual_seed(1)
    plain = {f"t{i}": torch.randn(10, 50, generator=g) for i in range(5)}  # 2,000 bytes each
    plain["big"] = torch.randn(30, 100, generator=g)  # 12,000 bytes: over the shard size
    qt = get_method("rtn")(torch.randn(16, 64, generator=g), QuantSpec.parse("w4g32"), None, {})
    with CheckpointWriter(tmp_path / "ck", "rtn", {}, shard_bytes=5000) as writer:
        for name, t in plain.items():
            writer.add_tensor(name, t)
        writer.add_quantized("layer", qt)
        for name in ("layer.scale", "t0"):  # in the open shard, in a closed one
            with pytest.raises(CheckpointError, match="written twice"):
                writer.add_tensor(name, torch.zeros(1))
        out = writer.finish({})
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 4 and not [f for f in files if f.endswith(".data")]
    weight_map = _json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for name, t in plain.items():
        with safe_open(str(out / weight_map[name]), "pt") as f:
            assert torch.equal(f.get_tensor(name), t)
    with safe_open(str(out / weight_map["layer.qweight"]), "pt") as f:
        assert torch.equal(f.get_tensor("layer.qweight"), qt.to_state("layer")["layer.qweight"])
    assert read_info(out).specs["layer"] == QuantSpec.parse("w4g32")
