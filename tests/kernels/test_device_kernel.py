"""The accelerator kernel (kernels/device.py) against the reference dequantize-then-matmul.

Its code is device-agnostic torch, so the CPU runs it here (CI has no GPU) and must match the
reference exactly in float32; the CUDA tests at the end run where a GPU exists: moved QuantLinear
and QuantEmbedding layers, a whole quantized tiny model on the GPU giving the CPU's greedy tokens,
and the way back to the CPU restoring the native kernel."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import make_tiny_model

from bitsmith.kernels import kernel_device, move, reference_linear
from bitsmith.kernels import device as device_kernels
from bitsmith.kernels.device import DeviceKernel
from bitsmith.methods.rtn import rtn as quantize_rtn
from bitsmith.nn.qembedding import QuantEmbedding
from bitsmith.nn.qlinear import QuantLinear
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

SPECS = ["w8", "w8g32s", "w4g128", "w4g32s", "w3g64", "w2g32", "w5g32", "w6g64s", "w4g32nf", "w4g64fit"]


def random_qt(spec: str, out_features: int, in_features: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen) * 0.05
    return quantize_rtn(w, QuantSpec.parse(spec))


def as_device_kernel(qt, device="cpu", compile=None) -> DeviceKernel:
    state = qt.to_state("w")
    return DeviceKernel(state["w.qweight"], state["w.scale"], state.get("w.zero"), qt.spec, qt.shape[1], device,
                        state.get("w.grid"), compile)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(48, 128), (37, 100), (5, 13)])  # includes rows/cols off every block size
def test_device_kernel_equals_reference_on_cpu(spec: str, shape: tuple[int, int]) -> None:
    qt = random_qt(spec, *shape, seed=hash((spec, shape)) % 1000)
    kernel = as_device_kernel(qt)
    for rows in (1, 3, 17):
        x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(rows))
        torch.testing.assert_close(kernel(x), reference_linear(x, qt), atol=0, rtol=0)
    # the packed tensors go back out unchanged
    for key, value in qt.to_state("w").items():
        assert torch.equal(kernel.to_state("w")[key], value), key


def test_device_kernel_row_blocks_equal_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    qt = random_qt("w4g32", 70, 64, seed=3)
    x = torch.randn(2, 5, 64)  # leading dims kept
    whole = as_device_kernel(qt)(x)
    monkeypatch.setattr(device_kernels, "CHUNK_ELEMENTS", 64 * 16)  # 16 rows per block, last one partial
    blocked = as_device_kernel(qt)
    assert blocked._rows == 16
    torch.testing.assert_close(blocked(x), whole, atol=1e-6, rtol=1e-5)  # BLAS sums blocks in another order
    torch.testing.assert_close(blocked(x), reference_linear(x, qt), atol=1e-6, rtol=1e-5)
    assert blocked(x).shape == (2, 5, 70)


@pytest.mark.parametrize("spec", ["w2g64vq", "w3g128vq", "w4g32vq"])
def test_device_kernel_takes_vq_codebooks(spec: str) -> None:
    """vq indices cover vq_dim weights each (they once went through the scalar unpack and failed)."""
    qspec, gen = QuantSpec.parse(spec), torch.Generator().manual_seed(7)
    codes = torch.randint(0, qspec.levels, (19, 320 // qspec.vq_dim), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(19, qspec.groups_per_row(320), generator=gen) + 0.5).half()
    qt = QuantizedTensor(codes, scale, None, qspec, torch.randn(qspec.levels, qspec.vq_dim, generator=gen).half())
    kernel = as_device_kernel(qt)
    x = torch.randn(3, 320, generator=gen)
    torch.testing.assert_close(kernel(x), reference_linear(x, qt), atol=0, rtol=0)


def test_device_kernel_rejects_wrong_inputs() -> None:
    kernel = as_device_kernel(random_qt("w4g32", 8, 64, seed=1))
    with pytest.raises(ValueError, match="takes 64"):
        kernel(torch.randn(1, 63))
    with pytest.raises(ValueError, match="model.to"):
        kernel(torch.randn(1, 64, device="meta"))


@pytest.mark.slow  # inductor compiles C++ for each spec: about 30 s each on this machine
def test_compiled_dequantize_equals_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch.compile route (used on CUDA) computes the same weights; run here on the CPU."""
    for spec in ("w4g32", "w3g64s", "w4g32nf"):
        qt = random_qt(spec, 24, 64, seed=5)
        kernel = as_device_kernel(qt, compile=True)  # RuntimeOptions(compile=True), $BITSMITH_COMPILE=1
        assert kernel._compile
        x = torch.randn(2, 64)
        torch.testing.assert_close(kernel(x), reference_linear(x, qt), atol=1e-6, rtol=1e-5)
        # torch 2.13 (the pinned version) compiles every width; 2.11 failed below 8 bits and fell back
        assert kernel._compile or torch.__version__ < "2.13", "compilation fell back to eager"


def test_move_to_the_same_device_is_a_no_op() -> None:
    layer = QuantLinear(random_qt("w4g32", 8, 64, seed=1))
    kernel = layer._kernel
    layer.to("cpu")
    layer.float()
    assert layer._kernel is kernel and kernel_device(kernel) == torch.device("cpu")
    assert move(kernel, "cpu", layer.spec, 64) is kernel


@needs_cuda
@pytest.mark.parametrize("spec", SPECS)
def test_cuda_quantlinear_equals_reference(spec: str) -> None:
    qt = random_qt(spec, 300, 200, seed=7)
    bias = torch.randn(300)
    layer = QuantLinear(qt, bias)
    x = torch.randn(4, 200)
    ref = reference_linear(x, qt) + bias
    layer.cuda()
    # 300 x 200 is no tinygemm shape; per-channel 8-bit goes to torch's int8pack (float32 inside on CUDA)
    expected = ("torch-int8",) if spec in ("w8", "w8s") else ("device", "triton")
    assert layer.kernel_name in expected and layer.device.type == "cuda"
    with torch.no_grad():
        torch.testing.assert_close(layer(x.cuda()).cpu(), ref, atol=1e-4, rtol=1e-4)  # GPU float32 matmul order
        layer.half()  # a dtype change keeps the packed weights where they are
        assert layer.device.type == "cuda"
        torch.testing.assert_close(layer(x.cuda().half()).float().cpu(), ref, atol=5e-2, rtol=5e-2)
        layer.cpu().float()
        assert layer.device.type == "cpu" and layer.kernel_name != "device"
        # the bias went through fp16 and back; the weights are the same codes
        torch.testing.assert_close(layer(x), reference_linear(x, qt) + bias.half().float(), atol=1e-5, rtol=1e-5)


@needs_cuda
def test_cuda_quant_embedding_moves() -> None:
    qt = random_qt("w8", 50, 16, seed=2)
    emb = QuantEmbedding(qt, embed_scale=2.0)
    ids = torch.tensor([[0, 3, 49]])
    ref = emb(ids)
    emb.cuda()
    torch.testing.assert_close(emb(ids.cuda()).cpu(), ref, atol=0, rtol=0)


@needs_cuda
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_cuda_quantized_model_generates_the_cpu_tokens(arch: str, tmp_path) -> None:
    from bitsmith.infer.generate import generate
    from bitsmith.runtime.load import load_model
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize

    from bitsmith.runtime.options import RuntimeOptions

    src = make_tiny_model(tmp_path / "m", arch, seed=4)
    ckpt = quantize(src, tmp_path / "q", QuantizePlan(QuantSpec.parse("w4g32")))
    # the generic kernel's float32 arithmetic; tinygemm's bf16 (test_torch_wo.py) may flip a near-tie token
    loaded = load_model(ckpt, options=RuntimeOptions(device_kernel="generic"))
    prompt = "the cat sat on the mat"
    cpu_tokens = generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=16, stop_at_eos=False).token_ids
    loaded.model.to("cuda")
    for lean in (True, False):
        gpu = generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=16, stop_at_eos=False, lean=lean)
        assert gpu.token_ids == cpu_tokens, lean
