"""Import of GPTQ folders and GGUF files as quantized models (load_model), the GGUF level grid, and
GPTQ error feedback on that grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bitsmith.formats.ggml_grid import LEVELS, grid, with_levels
from bitsmith.formats.ggml_types import decode, encode
from bitsmith.formats.gptq_layout import gptq_layer, to_gptq
from bitsmith.io.export_gptq import export_gptq
from bitsmith.io.gguf.encode import gptq_encode
from bitsmith.io.gguf.export import export_gguf
from bitsmith.io.gguf.quantized import blocks_to_quantized
from bitsmith.io.import_gptq import InputPermuted
from bitsmith.runtime.load import load_model
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.nn.qlinear import QuantLinear
from bitsmith.pipeline.plan import QuantizePlan
from bitsmith.pipeline.quantize import quantize
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

from tests.tiny import make_tiny_model

# held to the float dequantization at 1e-4: the exact float32 prefill, not the bf16 one (the default
# on CPUs with AMX / AVX512-BF16, held to its own oracle in test_kernels_bf16.py)
EXACT_PREFILL = RuntimeOptions(prefill="exact")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITSMITH_CACHE", str(tmp_path / "cache"))


def _logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 50, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


# ------------------------------------------------------------------------------ the level grid


@pytest.mark.parametrize("qtype", sorted(LEVELS))
def test_grid_levels_rewrite_blocks_exactly(qtype: str) -> None:
    """Levels read back through grid() and written with with_levels() reproduce the encoder's bytes,
    and arbitrary new levels decode to a q + b."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 512)).astype(np.float32) * rng.uniform(0.01, 3)
    data = encode(x, qtype, rng.random(512).astype(np.float32))
    g = grid(data, qtype)
    a, b = np.repeat(g.a, g.group, 1), np.repeat(g.b, g.group, 1)
    values = decode(data, qtype, x.shape)
    q = np.where(a == 0, g.lo, np.clip(np.rint((values - b) / np.where(a == 0, 1, a)), g.lo, g.hi)).astype(int)
    assert np.array_equal(with_levels(data, qtype, q), data)
    new = rng.integers(g.lo, g.hi + 1, size=x.shape)
    np.testing.assert_allclose(decode(with_levels(data, qtype, new), qtype, x.shape), a * new + b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="levels must lie"):
        with_levels(data, qtype, np.full(x.shape, g.hi + 1))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0", "Q4_K", "Q3_K"])
def test_gptq_on_the_gguf_grid_lowers_output_error(qtype: str) -> None:
    """Error feedback: ||(W - Wq) X|| below plain (importance-weighted) rounding, on correlated inputs."""
    gen = torch.Generator().manual_seed(0)
    cols = 256
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5
    x = torch.randn(2048, cols, generator=gen) @ (torch.eye(cols) + 2 * mix)  # correlated channels
    h = x.T @ x / x.shape[0]
    w = torch.randn(64, cols, generator=gen).numpy()
    imp = torch.diag(h).numpy()
    plain = decode(encode(w, qtype, imp), qtype, w.shape)
    fed = decode(gptq_encode(w, h, qtype, imp), qtype, w.shape)

    def out_err(v: np.ndarray) -> float:
        return float(torch.linalg.norm(x @ torch.from_numpy(w - v).T))

    assert out_err(fed) < 0.9 * out_err(plain)


# ------------------------------------------------------------------------------ GPTQ import


@pytest.mark.parametrize("spec", ["w4g32", "w8g32s"])
def test_gptq_folder_loads_quantized_with_checkpoint_logits(tmp_path: Path, spec: str) -> None:
    src = make_tiny_model(tmp_path / "tiny", "qwen2")  # biases on q/k/v
    ck = quantize(src, tmp_path / "ck", QuantizePlan(QuantSpec.parse(spec)))
    export_gptq(ck, tmp_path / "gptq")
    ours = load_model(ck)
    imported = load_model(tmp_path / "gptq")
    layer = imported.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, QuantLinear) and str(layer.spec) == spec
    assert imported.info is not None and set(imported.info.specs) == set(ours.info.specs)
    torch.testing.assert_close(_logits(imported.model), _logits(ours.model), rtol=1e-5, atol=1e-5)


def test_gptq_act_order_layer_computes_the_permuted_product(exact_decode) -> None:
    """desc_act: g_idx puts channels in groups out of order; the imported layer equals x W^T with
    W[:, c] = scale[:, g_idx[c]] (code[:, c] - zero[:, g_idx[c]]) (exact float gemv: 3 rows take the
    decode kernel)."""
    gen = torch.Generator().manual_seed(3)
    out_f, in_f, group = 16, 128, 32
    codes = torch.randint(0, 16, (out_f, in_f), generator=gen).to(torch.uint8)
    scale = (torch.rand(out_f, in_f // group, generator=gen) * 0.01 + 1e-3).half()
    zero = torch.randint(1, 16, (out_f, in_f // group), generator=gen).half()
    g_idx = (torch.arange(in_f) // group)[torch.randperm(in_f, generator=gen)].int()
    # pack the channel-order codes as GPTQ does (groups are g_idx's, not contiguous)
    t = to_gptq(QuantizedTensor(codes, scale, zero, QuantSpec.parse("w4g32")))
    tensors = {"qweight": t.qweight, "qzeros": t.qzeros, "scales": t.scales, "g_idx": g_idx}
    qt, perm = gptq_layer(tensors, 4, group, False)
    assert perm is not None
    w = scale.float()[:, g_idx.long()] * (codes.float() - zero.float()[:, g_idx.long()])  # [out, in]
    x = torch.randn(3, in_f, generator=gen)
    got = InputPermuted(QuantLinear(qt, options=exact_decode), perm)(x)
    torch.testing.assert_close(got, x @ w.T, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ GGUF import


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q5_0"])
def test_gguf_blocks_map_exactly(qtype: str) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    x = np.random.default_rng(2).standard_normal((8, 128)).astype(np.float32)
    data = encode(x, qtype)
    qt, err = blocks_to_quantized(data, qtype, x.shape)
    want = dequantize(data, GGMLQuantizationType[qtype]).reshape(x.shape)
    assert err == 0.0 and np.array_equal(qt.dequantize().numpy(), want)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q5_1", "Q4_K", "Q5_K"])
def test_gguf_affine_blocks_map_within_fp16_rounding(qtype: str) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    x = np.random.default_rng(4).standard_normal((8, 256)).astype(np.float32) + 0.3
    data = encode(x, qtype)
    qt, err = blocks_to_quantized(data, qtype, x.shape)
    want = dequantize(data, GGMLQuantizationType[qtype]).reshape(x.shape)
    got = qt.dequantize().numpy()
    assert np.abs(got - want).max() == err
    assert err <= 4e-3 * np.abs(want).max()  # fp16 (11-bit) rounding of scale and zero, a few ulps


@pytest.mark.parametrize("mix", ["Q4_0", "Q8_0"])
def test_gguf_file_imports_quantized_and_matches_gguf_dequantizer(tmp_path: Path, mix: str) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    src = make_tiny_model(tmp_path / "tiny", "llama")
    path = tmp_path / f"m-{mix}.gguf"
    export_gguf(src, path, mix, importance=False)
    loaded = load_model(path, options=EXACT_PREFILL)
    floats = load_model(path, dequantize=True)
    reader = {t.name: t for t in GGUFReader(str(path)).tensors}
    q_proj = loaded.model.get_submodule("model.layers.0.self_attn.v_proj")
    assert isinstance(q_proj, QuantLinear) and str(q_proj.spec) == {"Q4_0": "w4g32s", "Q8_0": "w8g32s"}[mix]
    t = reader["blk.0.attn_v.weight"]
    want = dequantize(np.asarray(t.data), t.tensor_type).reshape(q_proj.out_features, q_proj.in_features)
    assert np.array_equal(q_proj.quantized().dequantize().numpy(), want)
    assert len(loaded.info.specs) >= 2 * 7  # every block matrix of both layers
    torch.testing.assert_close(_logits(loaded.model), _logits(floats.model), rtol=1e-4, atol=1e-4)


def test_gguf_file_re_exports_its_blocks_unchanged(tmp_path: Path) -> None:
    """A Q4_0 GGUF given back to export_gguf keeps its codes: the same bytes for every mapped matrix."""
    from gguf import GGUFReader

    src = make_tiny_model(tmp_path / "tiny", "llama")
    first = tmp_path / "a.gguf"
    export_gguf(src, first, "Q4_0", importance=False)
    result = export_gguf(first, tmp_path / "b.gguf")
    assert {t.route for t in result.tensors if t.qtype == "Q4_0"} == {"exact"}
    a = {t.name: t for t in GGUFReader(str(first)).tensors}
    b = {t.name: t for t in GGUFReader(str(tmp_path / "b.gguf")).tensors}
    assert set(a) == set(b)
    for name, t in a.items():
        assert t.tensor_type == b[name].tensor_type, name
        if t.tensor_type.name == "Q4_0":
            assert np.array_equal(np.asarray(t.data), np.asarray(b[name].data)), name


def test_gptq_folder_re_exports_to_gguf_exactly(tmp_path: Path) -> None:
    src = make_tiny_model(tmp_path / "tiny", "llama")
    ck = quantize(src, tmp_path / "ck", QuantizePlan(QuantSpec.parse("w4g32s")))
    export_gptq(ck, tmp_path / "gptq")
    from_ck = export_gguf(ck, tmp_path / "ck.gguf")
    from_gptq = export_gguf(tmp_path / "gptq", tmp_path / "gptq.gguf")
    assert {t.route for t in from_gptq.tensors if t.qtype == "Q4_0"} == {"exact"}
    from gguf import GGUFReader

    a = {t.name: t for t in GGUFReader(str(tmp_path / "ck.gguf")).tensors}
    b = {t.name: t for t in GGUFReader(str(tmp_path / "gptq.gguf")).tensors}
    assert set(a) == set(b)
    for name, t in a.items():  # the same blocks, tensor by tensor
        assert t.tensor_type == b[name].tensor_type and np.array_equal(np.asarray(t.data), np.asarray(b[name].data)), name
    torch.testing.assert_close(_logits(load_model(tmp_path / "gptq.gguf").model), _logits(load_model(ck).model),
                               rtol=1e-5, atol=1e-5)
    assert len(from_ck.tensors) == len(from_gptq.tensors)


def test_gguf_file_with_tied_quantized_embedding_imports(tmp_path: Path) -> None:
    """llama.cpp writes tied models without output.weight; a quantized token_embd (Q8_0 here) must
    load quantized and serve as the head too, with the logits of the dequantized file."""
    from gguf import GGUFReader

    src = make_tiny_model(tmp_path / "tiny", "llama", tie_word_embeddings=True)
    path = tmp_path / "tied-Q8_0.gguf"
    export_gguf(src, path, "Q8_0", importance=False)
    names = {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}
    assert "output.weight" not in names and names["token_embd.weight"] == "Q8_0"
    loaded = load_model(path, options=EXACT_PREFILL)
    floats = load_model(path, dequantize=True)
    assert isinstance(loaded.model.get_output_embeddings(), QuantLinear)
    torch.testing.assert_close(_logits(loaded.model), _logits(floats.model), rtol=1e-4, atol=1e-4)
