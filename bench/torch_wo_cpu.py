"""Informational: torch's CPU weight-only ops (the CPU variants of the GPU kernels in kernels/torch_wo.py)
against bitsmith's own CPU kernels on Qwen2.5-1.5B-sized layers, in one run.

    OMP_NUM_THREADS=1 BITSMITH_THREADS=1 python bench/torch_wo_cpu.py --threads 1

For each shape, spec and row count, every kernel is called in alternating rounds (one round: each kernel
``--calls`` times, in turn), and the table gives the median over rounds of CPU milliseconds per call
(``time.process_time``, so a loaded machine's waiting is not counted) and the ratio to bitsmith's
default kernel. The CPU path is not switched by this: it is a comparison only.

Kernels: ``native`` (bitsmith's default options: int8 activations at decode, the auto prefill),
``native exact`` (float32 decode, exact prefill), ``torch fp32`` / ``torch bf16`` (tinygemm or int8pack
given float32 or bfloat16 activations), ``fp32 dense`` (F.linear on the float32 weights).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bitsmith.kernels import prepare
from bitsmith.kernels.torch_wo import TorchInt4Kernel, TorchInt8Kernel
from bitsmith.methods.rtn import rtn
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.spec import QuantSpec


def kernels_for(w: torch.Tensor, spec: QuantSpec, threads: int) -> dict:
    """name -> a callable of x (float32)."""
    qt = rtn(w, spec)
    state = qt.to_state("w")
    args = (state["w.qweight"], state["w.scale"], state.get("w.zero"), spec, w.shape[1], "cpu")
    cls = TorchInt4Kernel if spec.bits == 4 else TorchInt8Kernel
    native = prepare(qt, RuntimeOptions(threads=threads))
    exact = prepare(qt, RuntimeOptions(threads=threads, int8_decode=False, prefill="exact"))
    torch_kernel = cls(*args)
    bf16 = cls(*args, compute_dtype=torch.bfloat16)
    return {"native default": native, "native exact": exact, f"{torch_kernel.name} fp32": torch_kernel,
            f"{torch_kernel.name} bf16": bf16, "fp32 dense": lambda x: torch.nn.functional.linear(x, w)}


def cpu_ms(kernels: dict, x: torch.Tensor, rounds: int, calls: int) -> dict[str, float]:
    """Median over alternating rounds of CPU ms per call, per kernel."""
    samples: dict[str, list[float]] = {name: [] for name in kernels}
    with torch.inference_mode():
        for name, fn in kernels.items():  # warm-up: first-call allocations, repacks, caches
            fn(x)
        for _ in range(rounds):
            for name, fn in kernels.items():
                start = time.process_time()
                for _ in range(calls):
                    fn(x)
                samples[name].append((time.process_time() - start) * 1e3 / calls)
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="8960x1536,1536x8960", help="out x in; Qwen2.5-1.5B's MLP by default")
    ap.add_argument("--specs", default="w4g128,w8")
    ap.add_argument("--rows", default="1,64")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); CPU ms per call, median of {args.rounds} alternating "
          f"rounds of {args.calls} calls")
    print("| weight [out x in] | spec | rows | kernel | CPU ms | / native |")
    print("|---|---|---:|---|---:|---:|")
    for shape in args.shapes.split(","):
        out_f, in_f = map(int, shape.split("x"))
        w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)) * 0.02
        for spec_text in args.specs.split(","):
            kernels = kernels_for(w, QuantSpec.parse(spec_text), args.threads)
            for rows in map(int, args.rows.split(",")):
                x = torch.randn(rows, in_f)
                ms = cpu_ms(kernels, x, args.rounds, args.calls)
                base = next(iter(ms.values()))
                for name, value in ms.items():
                    print(f"| {shape} | {spec_text} | {rows} | {name} | {value:.3f} | {value / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
