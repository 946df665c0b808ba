"""GPU kernel timings (needs CUDA): the device kernel (packed codes on the GPU, dequantized there per
call) against the fp16 matmul it replaces, at decode (1 row) and prefill (512 rows) shapes.

    python bench/gpu_kernels.py [--shapes 8192x2048,2048x8192] [--specs w8,w4g128,w3g128]

Prints one table from one run: milliseconds per call (CUDA events, median of 50 after 10 warm-ups),
the fp16 baseline's ms, and resident weight MB. Times are this run's, never a claim beyond it.
"""

from __future__ import annotations

import argparse
import statistics

import torch


def timed(fn, reps: int = 50, warm: int = 10) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8192x2048,2048x8192,151936x1536")
    ap.add_argument("--specs", default="w8,w4g128,w3g128")
    ap.add_argument("--rows", default="1,512")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 1
    from bitsmith.methods.rtn import rtn
    from bitsmith.nn.qlinear import QuantLinear
    from bitsmith.spec import QuantSpec

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| weight [out x in] | rows | spec | fp16 ms | bitsmith eager ms | bitsmith compiled ms | best/fp16 | "
          "resident MB (fp16 / packed) |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        out_f, in_f = map(int, shape.split("x"))
        w = torch.randn(out_f, in_f) * 0.02
        w16 = w.half().cuda()
        for spec in args.specs.split(","):
            layer = QuantLinear(rtn(w, QuantSpec.parse(spec))).cuda().half()
            packed = sum(t.numel() * t.element_size() for t in layer.to_state("w").values())
            for rows in map(int, args.rows.split(",")):
                x = torch.randn(rows, in_f, device="cuda", dtype=torch.float16)
                assert layer.kernel_name == "device", layer.kernel_name
                with torch.inference_mode():
                    base = timed(lambda: torch.nn.functional.linear(x, w16))
                    layer._kernel._compile = False
                    eager = timed(lambda: layer(x))
                    layer._kernel._compile = True
                    compiled = timed(lambda: layer(x))
                    compiled = compiled if layer._kernel._compile else float("nan")  # nan: compile failed
                best = min(eager, compiled) if compiled == compiled else eager
                print(f"| {out_f}x{in_f} | {rows} | {spec} | {base:.3f} | {eager:.3f} | {compiled:.3f} | "
                      f"{best / base:.2f}x | {w16.numel() * 2 / 1e6:.1f} / {packed / 1e6:.1f} |", flush=True)
            del layer
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
