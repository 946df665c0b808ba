"""The fused Triton GEMM (kernels/triton_gemm.py) against the dequantize-then-matmul oracle in float64.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton); with one, the compiled kernel runs on CUDA.
Codes, scales, zeros and grids are fresh random values each run (every code level is drawn), the
shapes are ragged (in_features off the 8-code runs, off the group width and the K block; out_features
off the N block), and each case tries the decode tiles (1 and 3 rows) and the tl.dot tiles (20 rows)."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'bitsmith[gpu]')")

from bitsmith.kernels.device import DeviceKernel, dequantize_packed  # noqa: E402
from bitsmith.kernels import self_check  # noqa: E402
from bitsmith.kernels.self_check import sample_layer  # noqa: E402
from bitsmith.kernels.triton_gemm import TritonKernel, block_config, interpreter_on, supports  # noqa: E402
from bitsmith.spec import QuantSpec  # noqa: E402
from bitsmith.tensor import QuantizedTensor  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreter_on():
    pytest.fail("no GPU and Triton's interpreter is off: run pytest without TRITON_INTERPRET=0 (tests/conftest.py "
                "sets it to 1 when no GPU is present)", pytrace=False)

UNIFORM = ["w2g32", "w3g64", "w3g32s", "w4g128", "w4g32s", "w5g32", "w6g64s", "w7g32", "w8", "w8g32s", "w4"]
GRIDS = ["w2g32nf", "w4g64nf", "w3g32fit"]
VQ = ["w2g64vq", "w3g128vq", "w4g32vq"]
# (out, in): in off the 8-code runs and the groups (100, 150, 70), one group shorter than 32 (13), whole groups
SHAPES = [(37, 100), (70, 150), (9, 13), (33, 256)]
ROWS = (1, 3, 20)
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def oracle_weight(state: dict, spec: QuantSpec, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """float64 [out, in]: the reference reconstruction in float32, rounded once to ``dtype``."""
    return dequantize_packed(state["qweight"], state["scale"], state["zero"], state["grid"], spec, in_features,
                             dtype).double()


def check_against_oracle(spec_text: str, shape: tuple[int, int], dtype: torch.dtype, seed: int) -> None:
    spec, (out_features, in_features) = QuantSpec.parse(spec_text), shape
    gen = torch.Generator().manual_seed(seed)
    state = sample_layer(spec, out_features, in_features, gen)
    kernel = TritonKernel(state["qweight"], state["scale"], state["zero"], spec, in_features, DEVICE, state["grid"])
    w = oracle_weight(state, spec, in_features, dtype)
    for rows in ROWS:
        x = torch.randn(rows, in_features, generator=gen).to(dtype)
        y = kernel(x.to(DEVICE)).cpu()
        assert y.dtype == dtype and y.shape == (rows, out_features)
        exact = x.double() @ w.T
        # float32 sums over in_features terms (products of fp16/bf16 values are exact in float32), then one
        # rounding to dtype: |error| <= K u32 sum|x||w| + u(dtype) |y|
        bound = in_features * EPS[torch.float32] * (x.double().abs() @ w.abs().T) + EPS[dtype] * exact.abs() + 1e-30
        err = (y.double() - exact).abs()
        worst = int(torch.argmax(err / bound))
        assert bool((err <= bound).all()), (
            f"{spec_text} {shape} {dtype} rows={rows} seed={seed}: error {err.flatten()[worst]:.3g} "
            f"over its bound {bound.flatten()[worst]:.3g} at flat index {worst}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spec", UNIFORM + GRIDS)
def test_scalar_codes_match_the_oracle(spec: str, shape: tuple[int, int]) -> None:
    check_against_oracle(spec, shape, torch.float32, random.randrange(1 << 30))


@pytest.mark.parametrize("shape", [(37, 128), (20, 320)])  # whole vectors; 320 leaves a short last group
@pytest.mark.parametrize("spec", VQ)
def test_vq_codebooks_match_the_oracle(spec: str, shape: tuple[int, int]) -> None:
    check_against_oracle(spec, shape, torch.float32, random.randrange(1 << 30))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec", ["w4g32", "w3g64s", "w4g64nf"])
def test_half_inputs_round_the_weights_like_the_device_kernel(spec: str, dtype: torch.dtype) -> None:
    check_against_oracle(spec, (37, 100), dtype, random.randrange(1 << 30))


def make_kernel(spec_text: str, shape: tuple[int, int], seed: int = 0) -> tuple[TritonKernel, dict, QuantSpec]:
    spec = QuantSpec.parse(spec_text)
    state = sample_layer(spec, *shape, torch.Generator().manual_seed(seed))
    kernel = TritonKernel(state["qweight"], state["scale"], state["zero"], spec, shape[1], DEVICE, state["grid"])
    return kernel, state, spec


@pytest.mark.parametrize("spec", ["w3g64", "w4g32nf", "w2g64vq"])
def test_to_state_and_quantized_give_the_checkpoint_back(spec: str) -> None:
    kernel, state, qspec = make_kernel(spec, (21, 128), seed=random.randrange(1 << 30))
    out = kernel.to_state("w")
    for key in ("qweight", "scale", "zero", "grid"):
        if state[key] is None:
            assert f"w.{key}" not in out
        else:
            assert torch.equal(out[f"w.{key}"], state[key]) and out[f"w.{key}"].dtype == state[key].dtype, key
    expected = QuantizedTensor.from_state(state["qweight"], state["scale"], state["zero"], qspec, 128, state["grid"])
    assert torch.equal(kernel.quantized().codes.cpu(), expected.codes)
    assert kernel.name == "triton" and kernel.device == torch.device(DEVICE)


def test_leading_dims_float64_and_empty_inputs() -> None:
    kernel, state, spec = make_kernel("w4g32", (19, 70), seed=random.randrange(1 << 30))
    x = torch.randn(2, 3, 70)
    flat = kernel(x.reshape(6, 70).to(DEVICE))
    assert torch.equal(kernel(x.to(DEVICE)), flat.view(2, 3, 19))
    generic = DeviceKernel(state["qweight"], state["scale"], state["zero"], spec, 70, DEVICE)
    x64 = x.double().to(DEVICE)  # not a kernel dtype: the generic path, exactly
    assert torch.equal(kernel(x64), generic(x64))
    assert kernel(torch.empty(0, 70, device=DEVICE)).shape == (0, 19)


def test_bad_inputs_get_clear_errors() -> None:
    kernel, _, _ = make_kernel("w4g32", (8, 64))
    with pytest.raises(ValueError, match="this layer takes 64"):
        kernel(torch.randn(2, 65, device=DEVICE))


def test_supports_says_what_the_kernel_takes() -> None:
    spec, nf = QuantSpec.parse("w4g128"), QuantSpec.parse("w4g32nf")
    assert supports(spec, None, 100, DEVICE)
    assert supports(nf, torch.zeros(16), 100, DEVICE)
    assert not supports(nf, None, 100, DEVICE)  # a grid spec without its grid
    assert not supports(spec, torch.zeros(16), 100, DEVICE)
    assert not supports(spec, None, 0, DEVICE)
    assert not supports(spec, None, 100, "meta")


@pytest.mark.parametrize("spec", UNIFORM + GRIDS + VQ)
def test_k_blocks_never_straddle_a_group(spec: str) -> None:
    qspec = QuantSpec.parse(spec)
    for in_features in (13, 100, 4096):
        width = qspec.group_width(in_features)
        for rows, dtype in itertools.product((1, 5, 8, 9, 512), (torch.float32, torch.float16, torch.bfloat16)):
            block = block_config(rows, qspec, in_features, dtype)
            assert block["BLOCK_M"] >= min(rows, 16) and block["USE_DOT"] == (rows > 8)
            assert qspec.groups_per_row(in_features) == 1 or width % block["BLOCK_K"] == 0


def test_a_kernel_that_fails_its_self_check_is_not_offered(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    spec = QuantSpec.parse("w3g32")
    monkeypatch.setattr(self_check, "_VERDICTS", {})
    assert supports(spec, None, 100, DEVICE)
    monkeypatch.setattr(self_check, "_VERDICTS", {})
    monkeypatch.setattr(TritonKernel, "__call__", lambda self, x: DeviceKernel.__call__(self, x) * 1.01)  # 1% off
    assert not supports(spec, None, 100, DEVICE) and "disagrees with the reference" in caplog.text
    monkeypatch.setattr(self_check, "_VERDICTS", {})
    monkeypatch.setattr(TritonKernel, "__call__", lambda self, x: 1 / 0)  # a compile or launch error
    assert not supports(spec, None, 100, DEVICE) and "ZeroDivisionError" in caplog.text


# spec:rows:x dtype:compute capability; the bf16 tensor-core dot (which the interpreter cannot run) included
COMPILE_CASES = ["w3g64:1:fp16:90", "w4g128:512:bf16:90", "w2g64vq:20:fp32:80", "w4g32nf:3:bf16:80"]


def test_the_kernel_compiles_for_cuda_targets(tmp_path: Path) -> None:
    """Triton lowers the kernel to PTX and assembles a cubin without a GPU; in a process without the
    interpreter (tests/kernels/triton_compile.py), with its cache in a temporary folder."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-m", "tests.kernels.triton_compile", *COMPILE_CASES], env=env,
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert done.stdout.count("cubin") == len(COMPILE_CASES), done.stdout
