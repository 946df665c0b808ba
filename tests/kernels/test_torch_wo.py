"""torch's weight-only kernels (kernels/torch_wo.py) against the dequantize-then-matmul oracle.

The CPU variants of the ops (``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``) run here; the
CUDA tests at the end run where a GPU exists.

Tolerance. With ``u`` the unit roundoff of the dtype the op multiplies in (2**-24 float32, 2**-11
float16, 2**-8 bfloat16), the op sees ``x' = rd(x)``, ``s' = rd(s)`` and ``m' = rd(m)`` (tinygemm's
offset ``m = (8 - z) s``, made in float32). Against the *tight* oracle ``y'`` (float64 sums of ``x'``
times ``(q - 8) s' + m'``) the op may still round each dequantized weight and its output once to the
compute dtype and sums K float32 products, so per output row j

    |y_j - y'_j| <= u (|y'_j| + sum_k |x'_k| |w'_jk|) + K 2**-24 sum_k |x'_k| |w'_jk|     (tight_bound)

and against the exact reference ``y`` of float32 ``x`` and ``(q - z) s`` the roundings of x, s and m
add at most ``u sum_k |x_k| (|w_jk| + |q_jk - 8| |s| + |m|)`` (exact_bound): the shortcut's price.
A deliberately broken kernel (offset ``(7 - z) s``; the int8 row offset dropped) fails both.
"""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

import bitsmith.kernels
from bitsmith.formats.packing import unpack
from bitsmith.kernels import reference_linear
from bitsmith.kernels import device_select, self_check
from bitsmith.kernels.device import DeviceKernel
from bitsmith.kernels.device_select import device_kernel, torch_kernel_works
from bitsmith.kernels.torch_wo import TorchInt4Kernel, TorchInt8Kernel, int4_takes
from bitsmith.methods.rtn import rtn
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
CPU = torch.device("cpu")


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def random_layer(spec: str, out_features: int, in_features: int, seed: int) -> QuantizedTensor:
    """RTN codes of random weights, with the fp16 zeros moved off the integers (HQQ-like float zeros)."""
    gen = torch.Generator().manual_seed(seed)
    qt = rtn(torch.randn(out_features, in_features, generator=gen) * 0.05, QuantSpec.parse(spec))
    if qt.zero is None:
        return qt
    zero = (qt.zero.float() + torch.rand(qt.zero.shape, generator=gen) - 0.5).half()
    return QuantizedTensor(qt.codes, qt.scale, zero, qt.spec)


def kernel_for(cls, qt: QuantizedTensor, device=CPU, **kw):
    state = qt.to_state("w")
    return cls(state["w.qweight"], state["w.scale"], state.get("w.zero"), qt.spec, qt.shape[1], device, **kw)


def rounded_weights(qt: QuantizedTensor, midpoint: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 [out, in]: the weights the op is given, ``(q - mid) rd(s) + rd(m)``, and their parts'
    magnitudes ``|q - mid| rd(s) + |rd(m)|`` (what an intermediate rounding is relative to)."""
    in_features = qt.shape[1]
    width = qt.spec.group_width(in_features)
    s = qt.scale.float().repeat_interleave(width, dim=1)[:, :in_features]
    z = qt.zero_or_mid().float()
    z = z.repeat_interleave(width, dim=1)[:, :in_features] if z.dim() else torch.full_like(s, float(z))
    m = ((midpoint - z) * s).to(dtype).double()  # made in float32, as the kernels make it, then rounded
    q = qt.codes.double() - midpoint
    s = s.to(dtype).double()
    return q * s + m, q.abs() * s + m.abs()


def assert_within_bounds(y: torch.Tensor, x: torch.Tensor, qt: QuantizedTensor, midpoint: int, dtype: torch.dtype,
                         out_dtype: torch.dtype | None = None) -> None:
    """y (the kernel's) against the tight and the exact oracle, within the bounds of the module docstring."""
    u, k = UNIT_ROUNDOFF[dtype], qt.shape[1]
    x2 = x.reshape(-1, k)
    xr = x2.to(dtype).double()
    given, parts = rounded_weights(qt, midpoint, dtype)
    y2 = y.reshape(-1, qt.shape[0]).double()
    tight = xr @ given.T
    mass = xr.abs() @ parts.T
    tight_bound = u * tight.abs() + (2 * u + k * 2.0**-24) * mass + 1e-30
    if out_dtype is not None:  # one more rounding, of the result, to the caller's dtype
        tight_bound = tight_bound + UNIT_ROUNDOFF[out_dtype] * (tight.abs() + tight_bound)
    assert (y2 - tight).abs().le(tight_bound).all(), float(((y2 - tight).abs() / tight_bound).max())
    exact = reference_linear(x2.float(), qt).double()
    price = u * (x2.double().abs() @ qt.dequantize().double().abs().T + mass) * (1 + u)
    exact_bound = tight_bound + price
    assert (y2 - exact).abs().le(exact_bound).all(), float(((y2 - exact).abs() / exact_bound).max())


@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_int4_kernel_against_the_oracle(group: int, symmetric: bool, dtype: torch.dtype, threads: int) -> None:
    gen = torch.Generator().manual_seed(group * 7 + symmetric + threads)
    out_features = 16 * int(torch.randint(1, 5, (), generator=gen))
    in_features = group * int(torch.randint(1, 4, (), generator=gen))
    qt = random_layer(f"w4g{group}{'s' if symmetric else ''}", out_features, in_features, seed=group + threads)
    kernel = kernel_for(TorchInt4Kernel, qt)
    for shape in [(1, in_features), (3, in_features), (2, 9, in_features)]:
        x = torch.randn(*shape, generator=gen).to(dtype)
        y = kernel(x)
        assert y.dtype == dtype and y.shape == (*shape[:-1], out_features)
        assert_within_bounds(y, x, qt, 8, dtype)


@pytest.mark.parametrize("cls,spec,midpoint", [(TorchInt4Kernel, "w4g128", 8), (TorchInt8Kernel, "w8", 128)])
def test_bf16_compute_on_float32_inputs(cls, spec: str, midpoint: int) -> None:
    """What CUDA's tinygemm does (bf16 only), on the CPU: float32 in and out, bf16 arithmetic inside."""
    qt = random_layer(spec, 48, 384, seed=3)
    kernel = kernel_for(cls, qt, compute_dtype=torch.bfloat16)
    x = torch.randn(5, 384)
    y = kernel(x)
    assert y.dtype == torch.float32
    assert_within_bounds(y, x, qt, midpoint, torch.bfloat16)


@pytest.mark.parametrize("spec", ["w8", "w8s"])
@pytest.mark.parametrize("shape", [(37, 96), (48, 256), (5, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_int8_kernel_against_the_oracle(spec: str, shape: tuple[int, int], dtype: torch.dtype, threads: int) -> None:
    qt = random_layer(spec, *shape, seed=shape[0] + threads)
    kernel = kernel_for(TorchInt8Kernel, qt)
    gen = torch.Generator().manual_seed(shape[1])
    for rows in (1, 3, 17):
        x = torch.randn(rows, shape[1], generator=gen).to(dtype)
        y = kernel(x)
        assert y.dtype == dtype
        # int8pack scales after the sum (s' times the integer dot), then the row offset in float32
        assert_within_bounds(y, x, qt, 128, dtype)


@pytest.mark.parametrize("cls,spec", [(TorchInt4Kernel, "w4g64"), (TorchInt4Kernel, "w4g32s"),
                                      (TorchInt8Kernel, "w8"), (TorchInt8Kernel, "w8s")])
def test_to_state_and_quantized_give_the_checkpoint_back(cls, spec: str) -> None:
    qt = random_layer(spec, 32, 128, seed=5)
    state = qt.to_state("w")
    kernel = kernel_for(cls, qt)
    assert kernel.to_state("w").keys() == state.keys()
    for key, value in state.items():
        got = kernel.to_state("w")[key]
        assert got.dtype == value.dtype and torch.equal(got, value), key
    back = kernel.quantized()
    assert torch.equal(back.codes, qt.codes) and torch.equal(back.scale, qt.scale)
    assert (back.zero is None) == (qt.zero is None) and (qt.zero is None or torch.equal(back.zero, qt.zero))
    assert kernel.device == CPU


def test_kernels_reject_what_they_cannot_take() -> None:
    with pytest.raises(ValueError, match="tinygemm cannot take"):
        kernel_for(TorchInt4Kernel, random_layer("w4g128", 40, 256, seed=1))  # 40 rows: not whole n-tiles
    with pytest.raises(ValueError, match="tinygemm cannot take"):
        kernel_for(TorchInt4Kernel, random_layer("w4g128", 32, 200, seed=1))  # a ragged last group
    with pytest.raises(ValueError, match="int8pack cannot take"):
        kernel_for(TorchInt8Kernel, random_layer("w8g32", 32, 64, seed=1))
    with pytest.raises(ValueError, match="multiple of 16"):  # torch's CPU bf16 int8pack miscomputes these
        kernel_for(TorchInt8Kernel, random_layer("w8", 32, 100, seed=1))
    kernel = kernel_for(TorchInt8Kernel, random_layer("w8", 16, 64, seed=1))
    with pytest.raises(ValueError, match="takes 64"):
        kernel(torch.randn(1, 63))
    with pytest.raises(ValueError, match="model.to"):
        kernel(torch.randn(1, 64, device="meta"))


# (spec, out, in) -> the kernel the CPU variants of the selector pick, with no Triton module
SELECTIONS = [
    ("w4g128", 64, 256, "torch-int4"), ("w4g32s", 48, 96, "torch-int4"), ("w4", 16, 128, "torch-int4"),
    ("w4", 16, 512, "device"),  # per-channel over 512 inputs: no tinygemm group that wide
    ("w4g128", 40, 256, "device"), ("w4g128", 64, 200, "device"), ("w4g32nf", 64, 256, "device"),
    ("w4g64fit", 64, 256, "device"), ("w8", 37, 96, "torch-int8"), ("w8", 16, 100, "device"), ("w8s", 16, 64, "torch-int8"),
    ("w8g32", 64, 256, "device"), ("w3g64", 64, 256, "device"),
]


def select(qt: QuantizedTensor, options: RuntimeOptions = RuntimeOptions(), device=CPU):
    state = qt.to_state("w")
    return device_kernel(state["w.qweight"], state["w.scale"], state.get("w.zero"), qt.spec, qt.shape[1], device,
                         state.get("w.grid"), options)


@pytest.fixture
def no_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsmith.kernels.triton_gemm", None)  # import raises ImportError


@pytest.mark.parametrize("spec,out_features,in_features,name", SELECTIONS)
def test_selector_picks_by_spec_and_shape(spec, out_features, in_features, name, no_triton) -> None:
    qt = random_layer(spec, out_features, in_features, seed=out_features)
    kernel = select(qt)
    assert kernel.name == name
    x = torch.randn(2, in_features)
    torch.testing.assert_close(kernel(x), reference_linear(x, qt), atol=1e-5, rtol=1e-5)  # float32 throughout
    assert select(qt, RuntimeOptions(device_kernel="generic")).name == "device"
    assert select(qt, RuntimeOptions(device_kernel="torch")).name == name


class Spy:
    """Stands in for a torch kernel class: records construction, refuses to be called."""

    made: list = []

    def __init__(self, *args, **kwargs) -> None:
        Spy.made.append(args)


def test_an_unsupported_shape_never_reaches_torchs_ops(monkeypatch: pytest.MonkeyPatch, no_triton) -> None:
    monkeypatch.setattr(device_select, "TORCH_KERNELS",
                        {name: (Spy, takes, spec) for name, (_, takes, spec) in device_select.TORCH_KERNELS.items()})
    monkeypatch.setattr(device_select, "torch_kernel_works", lambda name, device: True)
    Spy.made = []
    for spec, out_features, in_features, _ in [s for s in SELECTIONS if s[3] == "device"]:
        assert isinstance(select(random_layer(spec, out_features, in_features, seed=1)), DeviceKernel), spec
    assert Spy.made == []
    select(random_layer("w4g128", 64, 256, seed=1))
    assert len(Spy.made) == 1


class Broken(TorchInt4Kernel):
    def __call__(self, x):
        raise RuntimeError("_weight_int4pack_mm_cuda is not available for build.")


class Wrong(TorchInt4Kernel):
    def __call__(self, x):
        return super().__call__(x) * 1.5


@pytest.mark.parametrize("cls", [Broken, Wrong])
def test_a_failing_torch_kernel_falls_back_to_the_generic_one(cls, monkeypatch, caplog, no_triton) -> None:
    kernels = dict(device_select.TORCH_KERNELS)
    kernels["torch-int4"] = (cls, *kernels["torch-int4"][1:])
    monkeypatch.setattr(device_select, "TORCH_KERNELS", kernels)
    monkeypatch.setattr(self_check, "_VERDICTS", {})
    with caplog.at_level(logging.WARNING, logger="bitsmith.kernels.self_check"):
        kernel = select(random_layer("w4g128", 64, 256, seed=2))
        assert kernel.name == "device"
        select(random_layer("w4g64", 64, 256, seed=3))
    assert len([r for r in caplog.records if "torch-int4" in r.getMessage()]) == 1  # warned once per device
    assert select(random_layer("w8", 16, 64, seed=1)).name == "torch-int8"


def test_the_real_torch_kernels_pass_their_self_check() -> None:
    assert torch_kernel_works("torch-int4", CPU) and torch_kernel_works("torch-int8", CPU)


def fake_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("bitsmith.kernels.triton_gemm")

    class TritonKernel(DeviceKernel):
        name = "triton"

        def __init__(self, qweight, scale, zero, spec, in_features, device, grid):
            super().__init__(qweight, scale, zero, spec, in_features, device, grid)

    module.supports = lambda spec, grid, in_features, device: spec.bits == 3
    module.TritonKernel = TritonKernel
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(bitsmith.kernels, "triton_gemm", module, raising=False)


def test_triton_comes_after_torch_and_before_generic(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_triton(monkeypatch)
    assert select(random_layer("w3g64", 32, 128, seed=1)).name == "triton"
    assert select(random_layer("w4g128", 32, 128, seed=1)).name == "torch-int4"
    assert select(random_layer("w2g32", 32, 128, seed=1)).name == "device"  # the fake supports 3 bits only
    assert select(random_layer("w3g64", 32, 128, seed=1), RuntimeOptions(device_kernel="torch")).name == "device"
    assert select(random_layer("w3g64", 32, 128, seed=1), RuntimeOptions(device_kernel="generic")).name == "device"
    assert select(random_layer("w4g128", 32, 128, seed=1), RuntimeOptions(device_kernel="triton")).name == "device"


def test_forcing_triton_without_it_is_refused(no_triton) -> None:
    with pytest.raises(RuntimeError, match="BITSMITH_DEVICE_KERNEL=triton"):
        select(random_layer("w3g64", 32, 128, seed=1), RuntimeOptions(device_kernel="triton"))
    assert select(random_layer("w3g64", 32, 128, seed=1)).name == "device"


def test_move_off_the_cpu_asks_the_selector_with_the_layers_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from bitsmith.kernels import move
    from bitsmith.nn.qlinear import QuantLinear

    calls = []
    monkeypatch.setattr(device_select, "device_kernel", lambda *args: calls.append(args) or "picked")
    options = RuntimeOptions(device_kernel="generic")
    layer = QuantLinear(random_layer("w4g128", 64, 256, seed=1), options=options)
    assert move(layer._kernel, "meta", layer.spec, 256, layer.options) == "picked"
    (qweight, scale, zero, spec, in_features, device, grid, passed), = calls
    assert device == torch.device("meta") and passed is options and spec == layer.spec and in_features == 256
    for key, value in layer.to_state("w").items():
        assert torch.equal({"w.qweight": qweight, "w.scale": scale, "w.zero": zero}[key], value)


def test_int4_takes_follows_each_devices_tiles() -> None:
    spec = QuantSpec.parse("w4g32")
    assert int4_takes(spec, None, 24, 64, torch.device("cuda", 0)) is None  # CUDA: n-tiles of 8
    assert int4_takes(spec, None, 24, 64, CPU) is not None  # the CPU op checks N % 16
    assert int4_takes(spec, None, 32, 64, torch.device("mps")) is not None


@needs_cuda
@pytest.mark.parametrize("spec", ["w4g32", "w4g128s", "w4g256", "w8", "w8s"])
def test_cuda_torch_kernels_against_the_oracle(spec: str) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    cls, midpoint = (TorchInt4Kernel, 8) if spec.startswith("w4") else (TorchInt8Kernel, 128)
    assert torch_kernel_works(cls.name, device)
    qt = random_layer(spec, 264 if cls is TorchInt4Kernel else 300, 512, seed=9)
    kernel = kernel_for(cls, qt, device)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(7, 512).to(dtype)
        y = kernel(x.cuda()).cpu()
        assert y.dtype == dtype
        if cls is TorchInt4Kernel:  # bf16 inside whatever comes in, the result cast to the input's dtype
            assert_within_bounds(y.float(), x, qt, midpoint, torch.bfloat16, dtype)
        else:  # CUDA's int8pack computes in float32 (x and scales widened), then casts to x's dtype
            assert_within_bounds(y.float(), x.float(), qt, midpoint, torch.float32, dtype)
    for key, value in qt.to_state("w").items():
        assert torch.equal(kernel.to_state("w")[key], value), key


@needs_cuda
def test_cuda_tiny_model_through_the_selected_kernels(tmp_path) -> None:
    """A whole quantized tiny model on the GPU with the default selection: tinygemm takes its 4-bit
    layers, and its logits stay near the CPU's (bf16 arithmetic: a sanity bound, not a derived one)."""
    from tests.tiny import make_tiny_model

    from bitsmith.nn.qlinear import QuantLinear
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize
    from bitsmith.runtime.load import load_model

    src = make_tiny_model(tmp_path / "m", "llama", seed=4)
    loaded = load_model(quantize(src, tmp_path / "q", QuantizePlan(QuantSpec.parse("w4g32"))))
    ids = torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu = loaded.model(ids).logits.float()
        loaded.model.to("cuda")
        names = {m.kernel_name for m in loaded.model.modules() if isinstance(m, QuantLinear)}
        gpu = loaded.model(ids.cuda()).logits.float().cpu()
    assert "torch-int4" in names, names
    assert float((gpu - cpu).abs().max()) <= 0.05 * float(cpu.std()) + 1e-3
