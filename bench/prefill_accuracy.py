"""What the batched-matmul shortcuts cost in quality: KLD and top-1 of whole-window logits per prefill path.

``eval`` and ``compare`` score with the exact float32 prefill (``RuntimeOptions.for_measurement``); a
user's ``generate``, ``serve`` and the calibrated passes may run the default ``auto`` instead: the int8
GEMM (csrc/gemm_int8.cpp, x rounded to int8 per 32-block) on AVX-512 VNNI CPUs, bf16 on AMX ones. This
script runs the same checkpoint under each ``--modes`` prefill over windows of the built-in prose and
code domains (teacher-forced: every position's logits come from one batched forward of the lean runner, as
``eval`` scores and ``generate`` prefills: ``eval.perplexity.window_logits``, the attention kernel included)
and scores each against the unquantized model (docs/PROTOCOL.md metrics) and against the exact path.

    python bench/prefill_accuracy.py --model smollm2-135m --checkpoint ~/.cache/bitsmith/bench/speed/smollm2-135m-w4g128

Prints one table; nothing is asserted (tests/kernels/test_gemm_int8.py holds the kernel to its oracle).
"""

from __future__ import annotations

import argparse
import time

import torch

import bitsmith
from bitsmith.eval.domains import builtin_domain
from bitsmith.eval.metrics import summarize, token_stats
from bitsmith.eval.perplexity import tokenize_text, window_logits
from bitsmith.kernels.cpu import resolve_prefill
from bitsmith.runtime.options import RuntimeOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="the unquantized model (reference)")
    ap.add_argument("--checkpoint", required=True, help="a bitsmith checkpoint of that model")
    ap.add_argument("--modes", default="exact,int8", help="RuntimeOptions.prefill modes; the first is the baseline")
    ap.add_argument("--domains", default="prose,code")
    ap.add_argument("--windows", type=int, default=4, help="windows per domain")
    ap.add_argument("--window", type=int, default=512, help="tokens per window")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    ref = bitsmith.load(args.model)  # float32, the reference dtype
    quant = {m: bitsmith.load(args.checkpoint, options=RuntimeOptions(prefill=m)) for m in modes}
    print(f"{args.checkpoint}, reference {args.model} fp32; modes {', '.join(f'{m} ({resolve_prefill(m)})' for m in modes)}")
    print("| domain | prefill | against | KLD mean | KLD p99 | top-1 | ppl | forward s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name in [d.strip() for d in args.domains.split(",") if d.strip()]:
        ids = torch.tensor(tokenize_text(ref.tokenizer, builtin_domain(name).text))
        stats: dict[str, list] = {m: [] for m in modes}
        versus: dict[str, list] = {m: [] for m in modes[1:]}
        seconds = dict.fromkeys(modes, 0.0)
        for w in range(args.windows):
            window = ids[w * args.window : (w + 1) * args.window]
            if window.numel() < args.window:
                break
            targets = window[1:]
            with torch.no_grad():
                want = window_logits(ref.model, window)[:-1].float()
                logits = {}
                for m in modes:
                    t0 = time.perf_counter()
                    logits[m] = window_logits(quant[m].model, window)[:-1].float()
                    seconds[m] += time.perf_counter() - t0
            for m in modes:
                stats[m].append(token_stats(want, logits[m], targets))
            for m in modes[1:]:
                versus[m].append(token_stats(logits[modes[0]], logits[m], targets))
        for m in modes:
            r = summarize(stats[m])
            print(f"| {name} | {m} | {args.model} fp32 | {r.kld_mean:.5f} | {r.kld_p99:.4f} | {r.top1:.4f} | {r.ppl:.3f} "
                  f"| {seconds[m]:.1f} |")
        for m in modes[1:]:
            r = summarize(versus[m])
            print(f"| {name} | {m} | {modes[0]} prefill | {r.kld_mean:.6f} | {r.kld_p99:.5f} | {r.top1:.4f} | | |")


if __name__ == "__main__":
    main()
