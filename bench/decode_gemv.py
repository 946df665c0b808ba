"""Where Qwen2.5-Coder-1.5B decode time goes, matrix by matrix: the native decode gemv (one activation
row, int8 activations as decode runs by default) of every linear shape of one decoder layer and the
head, per code width, against a pure memory read of the same bytes in the same process (issue 18).

    python bench/decode_gemv.py [--threads 1] [--rounds 5] [--specs w8,w4g128,w3g128,w2g64]

Per shape and spec: best-of microseconds per call over alternating rounds (paired on a shared
machine), each call after reading ``--flush-mb`` of other memory (decode reads each matrix once per
token, and the 1.5B's weights do not fit the last-level cache; with the weights cache-resident the
figures measure the kernels' compute rate instead: ``--flush-mb 0``), packed bytes (codes + fp16 scales/zeros), GB/s, and that as a percentage of the read rate
of a buffer of the same size summed by torch (``read``: the same kind of figure bench/speed.py's
bound uses, taken on each shape's own bytes, so cache effects match). The last rows project one
token's gemv time (28 layers x the layer's matrices + the head at w8) per spec and its ratio to the
w4g128 projection next to the ratio of bytes: w3 and w2 should be faster than w4 in proportion to
their bytes. Random codes (a gemv's time does not depend on their values); every kernel is checked
against the dequantize-then-matmul oracle on int8-rounded activations before it is timed. Nothing
here is asserted.
"""

from __future__ import annotations

import argparse

import torch

from bitsmith.kernels import prepare, reference_linear
from bitsmith.kernels.codebook import int8_activations
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.spec import QuantSpec
from bench_kernels import random_qt
from common import best_us

LAYERS = 28
# one Qwen2.5-Coder-1.5B decoder layer: q/k/v joined (1536 + 2 x 256 rows), o, gate/up joined, down
LAYER = {"qkv 2048x1536": (2048, 1536), "o 1536x1536": (1536, 1536), "gate/up 17920x1536": (17920, 1536),
         "down 1536x8960": (1536, 8960)}
HEAD = ("head 151936x1536", (151936, 1536))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--specs", default="w8,w4g128,w3g128,w2g64")
    ap.add_argument("--head-specs", default="w8", help="specs of the head rows; the first goes into the projection")
    ap.add_argument("--flush-mb", type=int, default=512,
                    help="read this much other memory before each timed call (0: weights stay in cache)")
    args = ap.parse_args()
    flush = torch.ones(args.flush_mb * (1 << 20) // 4) if args.flush_mb else None
    torch.set_num_threads(args.threads)
    options = RuntimeOptions(threads=args.threads)
    specs = [QuantSpec.parse(s) for s in args.specs.split(",")]
    cache = f"after reading {args.flush_mb} MB of other memory" if flush is not None else "weights cache-resident"
    print(f"{args.threads} thread(s), best of {args.rounds} x {args.reps} calls, one activation row, {cache}\n")
    print("| matrix | spec | packed MB | gemv us | GB/s | read us | read GB/s | gemv / read bw |")
    print("|---|---|---|---|---|---|---|---|")
    token: dict[str, float] = {str(s): 0.0 for s in specs}
    token_bytes: dict[str, float] = {str(s): 0.0 for s in specs}
    heads = [QuantSpec.parse(s) for s in args.head_specs.split(",")]
    rows = [(label, shape, s) for label, shape in LAYER.items() for s in specs] + [(HEAD[0], HEAD[1], h) for h in heads]
    for label, (out, inp), spec in rows:
        qt = random_qt(out, inp, spec)
        kernel = prepare(qt, options)
        x = torch.randn(1, inp)
        want = reference_linear(int8_activations(x), qt)
        assert torch.allclose(kernel(x), want, rtol=1e-3, atol=1e-3 * float(want.abs().max())), (label, spec)
        nbytes = qt.stored_bits() / 8
        buf = torch.ones(int(nbytes) // 4, dtype=torch.float32)
        times = [float("inf")] * 2
        for _ in range(args.rounds):
            times[0] = min(times[0], best_us(lambda: kernel(x), args.reps, flush))
            times[1] = min(times[1], best_us(lambda: buf.sum(), args.reps, flush))
        gemv, read = times
        print(f"| {label} | {spec} | {nbytes / 1e6:.2f} | {gemv:.0f} | {nbytes / gemv / 1e3:.1f} | {read:.0f} | "
              f"{nbytes / read / 1e3:.1f} | {read / gemv:.0%} |", flush=True)
        if label == HEAD[0] and spec != heads[0]:
            continue
        for s in ([str(spec)] if label != HEAD[0] else list(token)):
            token[s] += gemv * (LAYERS if label != HEAD[0] else 1)
            token_bytes[s] += nbytes * (LAYERS if label != HEAD[0] else 1)
        del kernel, qt, buf
    base = "w4g128" if "w4g128" in token else next(iter(token))
    print(f"\n| spec | gemv ms per token (28 layers + {heads[0]} head) | gemv tok/s bound | time / {base} | bytes / {base} |")
    print("|---|---|---|---|---|")
    for s in token:
        print(f"| {s} | {token[s] / 1e3:.2f} | {1e6 / token[s]:.1f} | {token[s] / token[base]:.2f} | "
              f"{token_bytes[s] / token_bytes[base]:.2f} |")


if __name__ == "__main__":
    main()
