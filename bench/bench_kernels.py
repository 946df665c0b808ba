"""Quantized matmul speed on this CPU: fp32 / bf16 F.linear, the reference (dequantize then matmul)
and each bitsmith kernel, with the bandwidth each reaches on the packed weight bytes.

Not a test; run on demand:  python bench/bench_kernels.py [--threads N] [--specs w8,w4g128]

"torch-wo" is torch's own weight-only kernel for the same width (``_weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu`` after their one-time repack, bf16 activations): bitsmith would use it
where it beats "native"; on the machines measured so far it does not (see the issue 6 report).

"native" runs the default options: above ``GEMV_MAX_ROWS`` rows that is the bf16 prefill path on CPUs
with AMX / AVX512-BF16 (``RuntimeOptions.prefill="auto"``); "exact" is the same kernel with
``prefill="exact"`` (float32 dequantize + sgemm), so "x exact" is what the bf16 path buys. ``--shapes
issue`` measures the Qwen2.5-1.5B and SmolLM2 layer shapes of the prefill issue instead.

Every figure is the minimum over repeated calls (the machine may be shared). "GB/s" is packed bytes
(codes + fp16 scales and zeros) per second; "% fp32 bw" compares that with the bandwidth fp32
F.linear reached on its own 4-byte weights in the same run, i.e. how close the kernel is to the memory
bound that fp32 decode is held to.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from bitsmith.kernels import prepare, reference_linear
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

SHAPES = [(8192, 2048), (2048, 8192), (576, 1536), (1536, 8960)]  # weight [out, in]
ISSUE_SHAPES = [(1536, 1536), (256, 1536), (8960, 1536), (1536, 8960), (576, 576), (1536, 576), (576, 1536)]
BATCHES = [1, 32, 512]  # decode, a small batch, a prefill
SPECS = ["w8", "w4g128", "w4g32", "w3g64", "w2g64"]  # w8 = per-channel, as torch's int8 kernel


def best_ms(fn: Callable[[], object], min_time: float = 0.4, min_reps: int = 5, max_reps: int = 200) -> float:
    fn()  # warm up (allocations, lazy builds)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def random_qt(out: int, inp: int, spec: QuantSpec) -> QuantizedTensor:
    gen = torch.Generator().manual_seed(0)
    groups = spec.groups_per_row(inp)
    codes = torch.randint(0, spec.qmax + 1, (out, inp), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(out, groups, generator=gen) * 0.02 + 1e-3).half()
    zero = None if spec.symmetric else (torch.rand(out, groups, generator=gen) * spec.qmax).half()
    return QuantizedTensor(codes, scale, zero, spec)


def torch_weight_only(out: int, inp: int, spec: QuantSpec, x: torch.Tensor) -> Callable[[], object] | None:
    """torch's own weight-only CPU kernel for this spec's width, when it has one (timing only: random
    codes in torch's layout after its one-time repack). int8: per-channel scales only; int4: groups
    of 32..256 dividing the input width. bf16 activations, their fast case."""
    xb = x.bfloat16()
    if spec.bits == 8 and spec.group_size is None:
        w8 = torch.randint(-128, 127, (out, inp), dtype=torch.int8)
        scales = torch.rand(out).bfloat16()
        return lambda: torch._weight_int8pack_mm(xb, w8, scales)
    if spec.bits == 4 and spec.group_size in (32, 64, 128, 256) and inp % spec.group_size == 0:
        packed = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (out, inp), dtype=torch.int32), 2)
        sz = torch.rand(inp // spec.group_size, out, 2).bfloat16()
        return lambda: torch._weight_int4pack_mm_for_cpu(xb, packed, spec.group_size, sz)
    return None


def kernel_for(qt: QuantizedTensor, choice: str, prefill: str = "auto") -> Callable[[torch.Tensor], torch.Tensor]:
    return prepare(qt, RuntimeOptions(kernel=choice, prefill=prefill))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--specs", default=",".join(SPECS))
    parser.add_argument("--no-reference", action="store_true", help="skip the slow reference column")
    parser.add_argument("--shapes", choices=("default", "issue"), default="default")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    args = parser.parse_args()
    shapes = ISSUE_SHAPES if args.shapes == "issue" else SHAPES
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    specs = [QuantSpec.parse(s) for s in args.specs.split(",")]
    print(f"torch {torch.__version__}, {args.threads} threads; times are the best of repeated calls (ms)")
    header = (
        f"{'weight':>11} {'T':>3} {'fp32':>7} {'bf16':>7} {'spec':>7} {'MB':>6} {'reference':>9} "
        f"{'torch':>7} {'torch-wo':>8} {'exact':>7} {'native':>7} {'GB/s':>6} {'%fp32bw':>7} {'x fp32':>6} {'x exact':>7}"
    )
    print(header)
    print("-" * len(header))
    for out, inp in shapes:
        weight = torch.randn(out, inp)
        weight_bf16 = weight.bfloat16()
        for batch in batches:
            x = torch.randn(batch, inp)
            x_bf16 = x.bfloat16()
            fp32_ms = best_ms(lambda: F.linear(x, weight))
            bf16_ms = best_ms(lambda: F.linear(x_bf16, weight_bf16))
            fp32_gbs = out * inp * 4 / fp32_ms / 1e6
            for spec in specs:
                qt = random_qt(out, inp, spec)
                packed_bytes = qt.stored_bits() / 8
                ref_ms = float("nan") if args.no_reference else best_ms(lambda: reference_linear(x, qt), min_reps=3)
                chunked = kernel_for(qt, "torch")
                torch_ms = best_ms(lambda: chunked(x), min_reps=3)
                wo = torch_weight_only(out, inp, spec, x)
                wo_ms = float("nan") if wo is None else best_ms(wo)
                exact = kernel_for(qt, "native", "exact")
                exact_ms = best_ms(lambda: exact(x))
                native = kernel_for(qt, "native")
                native_ms = best_ms(lambda: native(x))
                gbs = packed_bytes / native_ms / 1e6
                print(
                    f"{out:>5}x{inp:<5} {batch:>3} {fp32_ms:7.3f} {bf16_ms:7.3f} {str(spec):>7} "
                    f"{packed_bytes / 1e6:6.2f} {ref_ms:9.2f} {torch_ms:7.2f} {wo_ms:8.3f} {exact_ms:7.3f} {native_ms:7.3f} {gbs:6.1f} "
                    f"{100 * gbs / fp32_gbs:6.0f}% {fp32_ms / native_ms:6.1f} {exact_ms / native_ms:7.1f}"
                )


if __name__ == "__main__":
    main()
