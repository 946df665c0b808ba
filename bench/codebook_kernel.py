"""Decode matmul (1-8 activation rows) of the vector-codebook kernel (csrc/codebook.cpp) next to the
scalar native kernel of the same bits/weight, on the linear shapes of SmolLM2-135M and
Qwen2.5-Coder-1.5B (issue 19). Random codes: a gemv's time does not depend on their values.

    python bench/codebook_kernel.py [--threads 1] [--rounds 5] [--exact] [--rows 1]

Per shape: best-of microseconds per call of each kernel, taken in alternating rounds (paired on a
shared machine), and the packed bytes each reads. Both kernels are first checked against the
dequantize-then-matmul oracle on the same input. Nothing here is asserted. By default both run as
decode does (``RuntimeOptions.int8_decode``: int8 activations; vq with its int8 codebook,
csrc/codebook_int8.cpp), checked against their int8 oracles; ``--exact`` times the float kernels.
``--rows 2..8`` (a batched decode, a speculative verify) also times the vq float kernel, which took
those rows before the int8 path did (column "vq float").
"""

from __future__ import annotations

import argparse

import torch

from bitsmith.kernels import prepare, reference_linear
from bitsmith.kernels.codebook import int8_activations, int8_oracle
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor
from common import best_us

SHAPES = {"smollm2 q/o": (576, 576), "smollm2 k/v": (192, 576), "smollm2 gate/up": (1536, 576),
          "smollm2 down": (576, 1536), "qwen q/o": (1536, 1536), "qwen gate/up": (8960, 1536), "qwen down": (1536, 8960)}
PAIRS = "w2g64vq=w2g64,w3g128vq=w3g128"  # --pairs: each vq spec beside a scalar one


def random_qt(out: int, inp: int, spec: QuantSpec) -> QuantizedTensor:
    g = torch.Generator().manual_seed(0)
    scale = (torch.rand(out, spec.groups_per_row(inp), generator=g) * 0.02 + 1e-3).half()
    if spec.grid == "vq":
        codes = torch.randint(0, spec.levels, (out, inp // spec.vq_dim), generator=g, dtype=torch.uint8)
        return QuantizedTensor(codes, scale, None, spec, torch.randn(spec.levels, spec.vq_dim, generator=g).half())
    codes = torch.randint(0, spec.qmax + 1, (out, inp), generator=g, dtype=torch.uint8)
    return QuantizedTensor(codes, scale, (torch.rand(out, spec.groups_per_row(inp), generator=g) * spec.qmax).half(), spec)


def oracle(x: torch.Tensor, qt: QuantizedTensor, kernel, exact: bool) -> torch.Tensor:
    """What the kernel must compute: the float oracle, or the int8 one its int8 path is held to."""
    if exact:
        return reference_linear(x, qt)
    if getattr(kernel, "int8", False):
        return int8_oracle(x, qt)
    return reference_linear(int8_activations(x), qt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--exact", action="store_true", help="float activations (int8_decode off)")
    ap.add_argument("--rows", type=int, default=1, help="activation rows per call, 1-8")
    ap.add_argument("--pairs", default=PAIRS, help=f"VQ=SCALAR spec pairs, comma-separated (default {PAIRS})")
    ap.add_argument("--shapes", default=None, help="only the shapes whose label contains one of these words (e.g. qwen)")
    args = ap.parse_args()
    if not 1 <= args.rows <= 8:
        ap.error(f"--rows must be 1-8 (the decode kernels' row counts), got {args.rows}")
    torch.set_num_threads(args.threads)
    options = RuntimeOptions(threads=args.threads, int8_decode=not args.exact)
    mode = "float activations" if args.exact else "int8 activations"
    float_vq = args.rows > 1 and not args.exact
    print(f"{args.threads} thread(s), best of {args.rounds} x {args.reps} calls, {args.rows} activation row(s) ({mode})\n")
    print("| shape | spec | kernel | packed KB | us/call | GB/s | vq / scalar time |" + (" vq float |" if float_vq else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if float_vq else ""))
    pairs = [tuple(t.strip() for t in pair.split("=")) for pair in args.pairs.split(",") if pair.strip()]
    words = args.shapes.split(",") if args.shapes else [""]
    for label, (out, inp) in SHAPES.items():
        if not any(w in label for w in words):
            continue
        x = torch.randn(args.rows, inp)
        for vq_text, scalar_text in pairs:
            qts = [random_qt(out, inp, QuantSpec.parse(t)) for t in (vq_text, scalar_text)]
            kernels = [prepare(qt, options) for qt in qts]
            for qt, k in zip(qts, kernels):  # checked before timed
                assert torch.allclose(k(x), oracle(x, qt, k, args.exact), atol=1e-3 * inp ** 0.5), (label, qt.spec)
            if float_vq:
                qts.append(qts[0])
                kernels.append(prepare(qts[0], RuntimeOptions(threads=args.threads, int8_decode=False)))
            times = [float("inf")] * len(kernels)
            for _ in range(args.rounds):
                for i, k in enumerate(kernels):
                    times[i] = min(times[i], best_us(lambda: k(x), args.reps))
            for i, (qt, k) in enumerate(zip(qts[:2], kernels[:2])):
                nbytes = qt.stored_bits() / 8
                ratio = f"{times[0] / times[1]:.2f}" if i == 0 else ""
                extra = (f" {times[2]:.1f} us ({times[2] / times[0]:.2f}x the int8 time) |" if i == 0 else " |") if float_vq else ""
                print(f"| {label} {out}x{inp} | {qt.spec} | {k.name} | {nbytes / 1024:.0f} | {times[i]:.1f} | "
                      f"{nbytes / times[i] / 1e3:.2f} | {ratio} |{extra}", flush=True)


if __name__ == "__main__":
    main()
