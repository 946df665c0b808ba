"""What the decode kernels' shortcuts cost in quality: KLD and top-1 of token-by-token decode logits.

``eval`` scores whole windows through prefill (dequantize + BLAS, exact float arithmetic), so it never
sees the decode kernels. This script decodes real text one token at a time (teacher-forced) through the
lean runner and its fused native step, once with the default int8-activation path (4/8-bit codes with
VNNI; every width 2-8, and the w8 head inside the step, on AVX-512 VBMI CPUs) and once with
the exact float path (``BITSMITH_INT8_DECODE=0``), and scores both against the unquantized model's
logits on the same positions (docs/PROTOCOL.md metrics), plus the two decode paths against each other.

    python bench/decode_accuracy.py --model smollm2-135m --checkpoint ~/.cache/bitsmith/bench/speed/smollm2-135m-w4g128

Prints one table; nothing is asserted (tests/kernels/test_kernels.py holds each path to its oracle).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

import bitsmith
from bitsmith.eval.metrics import summarize, token_stats
from bitsmith.eval.perplexity import tokenize_text
from bitsmith.infer.lean import lean_runner
from bitsmith.kernels.build import native_library
from bitsmith.runtime.options import RuntimeOptions
from common import text_path

# The shipped 60,000-character prose slice (~13k tokens): the default 2 windows use its first ~1,030
# tokens; pass --text for a longer file when asking for more windows than it holds.
DEFAULT_TEXT = text_path()


def decode_logits(model, ids: torch.Tensor, prompt: int, options: RuntimeOptions) -> torch.Tensor:
    """Logits [T - prompt, V] at positions prompt-1 .. T-2, each from a one-token decode step."""
    runner = lean_runner(model, ids.numel(), options)
    if runner is None:
        raise SystemExit("this model is outside the lean path; nothing to measure")
    rows = []
    with torch.no_grad():
        rows.append(runner(ids[:prompt]).float())  # the prompt's last position
        for pos in range(prompt, ids.numel() - 1):
            rows.append(runner(ids[pos : pos + 1]).float())
    return torch.stack(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="the unquantized model (reference)")
    ap.add_argument("--checkpoint", required=True, help="a bitsmith checkpoint of that model")
    ap.add_argument("--text", default=str(DEFAULT_TEXT))
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64, help="tokens prefilled before decoding")
    ap.add_argument("--decode", type=int, default=448, help="tokens decoded one by one per window")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lib = native_library()
    if lib is None:
        raise SystemExit("the native kernels could not be built; the decode paths compared here do not exist")

    ref = bitsmith.load(args.model)  # float32, the reference dtype
    options = RuntimeOptions.from_env()
    # the same checkpoint twice: its kernels with int8 activations (the default) and with exact floats
    quant = bitsmith.load(args.checkpoint, options=replace(options, int8_decode=True))
    quant_exact = bitsmith.load(args.checkpoint, options=replace(options, int8_decode=False))
    text = Path(args.text).read_text(encoding="utf-8")[:200_000]
    ids = torch.tensor(tokenize_text(ref.tokenizer, text))
    span = args.prompt + args.decode + 1
    runs: dict[str, list] = {"int8 activations (default)": [], "exact float": [], "int8 vs exact": []}
    t0 = time.perf_counter()
    for w in range(args.windows):
        window = ids[w * span : (w + 1) * span]
        if window.numel() < span:
            break
        targets = window[args.prompt :]
        with torch.no_grad():
            want = ref.model(input_ids=window[None]).logits[0, args.prompt - 1 : -1].float()
        fast = decode_logits(quant.model, window, args.prompt, options)
        exact = decode_logits(quant_exact.model, window, args.prompt, options)
        runs["int8 activations (default)"].append(token_stats(want, fast, targets))
        runs["exact float"].append(token_stats(want, exact, targets))
        runs["int8 vs exact"].append(token_stats(exact, fast, targets))
    seconds = time.perf_counter() - t0
    tokens = sum(s.tokens for s in runs["exact float"])
    print(f"{args.checkpoint}: {tokens} decoded positions over {len(runs['exact float'])} windows "
          f"({args.prompt}-token prompt each), reference {args.model} fp32; {seconds:.0f} s")
    print("| decode path | against | KLD mean | KLD p99 | top-1 | ppl |")
    print("|---|---|---:|---:|---:|---:|")
    for name, stats in runs.items():
        r = summarize(stats)
        against = "exact-float decode" if name == "int8 vs exact" else f"{args.model} fp32"
        print(f"| {name} | {against} | {r.kld_mean:.5f} | {r.kld_p99:.4f} | {r.top1:.4f} | {r.ppl:.3f} |")
    print(f"reference ppl on these positions: {summarize(runs['exact float']).ref_ppl:.3f}")


if __name__ == "__main__":
    main()
