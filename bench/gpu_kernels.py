"""GPU kernel timings (needs CUDA): every device kernel bitsmith has for a layer against the fp16 matmul
it replaces, at decode (1 row) and prefill (512 rows) shapes.

    python bench/gpu_kernels.py [--shapes 8192x2048,2048x8192] [--specs w8,w4g128,w3g128]

Kernels (kernels/device_select.py): the generic one (packed codes on the GPU, dequantized per call;
eager torch ops and torch.compile'd), torch's own weight-only kernels (tinygemm ``torch-int4`` for
4-bit groups, ``torch-int8`` int8pack for per-channel 8-bit; "-" where they do not take the layer), and
the Triton kernel where ``bitsmith.kernels.triton_gemm`` and triton import ("-" otherwise). Inputs are
fp16; tinygemm multiplies in bf16 (the cast in and out is inside its time). The ``auto`` column is the
kernel ``model.to("cuda")`` gives this layer.

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


def kernels_for(state: dict, spec, in_features: int, device: torch.device) -> dict:
    """name -> kernel (or None where that family does not take the layer), plus the auto choice's name."""
    from bitsmith.kernels.device_select import device_kernel
    from bitsmith.runtime.options import RuntimeOptions

    def pick(choice: str):
        try:
            return device_kernel(state["w.qweight"], state["w.scale"], state.get("w.zero"), spec, in_features, device,
                                 state.get("w.grid"), RuntimeOptions(device_kernel=choice))
        except RuntimeError:  # triton forced without triton
            return None

    generic, torch_k, triton_k = pick("generic"), pick("torch"), pick("triton")
    return {"generic": generic, "torch": torch_k if torch_k.name.startswith("torch-") else None,
            "triton": triton_k if triton_k is not None and triton_k.name != generic.name else None,
            "auto": pick("auto").name}


def time_kernels(kernels: dict, x: torch.Tensor) -> dict[str, float]:
    """ms per call of each kernel (nan where absent or where compilation fell back)."""
    nan = float("nan")
    generic = kernels["generic"]
    with torch.inference_mode():
        generic._compile = False
        out = {"eager": timed(lambda: generic(x))}
        generic._compile = True
        compiled = timed(lambda: generic(x))
        out["compiled"] = compiled if generic._compile else nan
        for name in ("torch", "triton"):
            kernel = kernels[name]
            out[name] = nan if kernel is None else timed(lambda: kernel(x))
    return out


def cell(ms: float, kernel=None) -> str:
    if ms != ms:
        return "-"
    return f"{ms:.3f}" if kernel is None else f"{ms:.3f} ({kernel.name})"


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
    from bitsmith.spec import QuantSpec

    device = torch.device("cuda", torch.cuda.current_device())
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| weight [out x in] | rows | spec | fp16 ms | generic eager ms | generic compiled ms | torch ms | "
          "triton ms | best/fp16 | auto picks | resident MB (fp16 / packed) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        out_f, in_f = map(int, shape.split("x"))
        w = torch.randn(out_f, in_f) * 0.02
        w16 = w.half().to(device)
        for spec_text in args.specs.split(","):
            spec = QuantSpec.parse(spec_text)
            state = rtn(w, spec).to_state("w")
            packed = sum(t.numel() * t.element_size() for t in state.values())
            kernels = kernels_for(state, spec, in_f, device)
            for rows in map(int, args.rows.split(",")):
                x = torch.randn(rows, in_f, device=device, dtype=torch.float16)
                with torch.inference_mode():
                    base = timed(lambda: torch.nn.functional.linear(x, w16))
                ms = time_kernels(kernels, x)
                best = min(v for v in ms.values() if v == v)
                print(f"| {out_f}x{in_f} | {rows} | {spec} | {base:.3f} | {cell(ms['eager'])} | {cell(ms['compiled'])} | "
                      f"{cell(ms['torch'], kernels['torch'])} | {cell(ms['triton'], kernels['triton'])} | "
                      f"{best / base:.2f}x | {kernels['auto']} | {w16.numel() * 2 / 1e6:.1f} / {packed / 1e6:.1f} |",
                      flush=True)
            del kernels
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
