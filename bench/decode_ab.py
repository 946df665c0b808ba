"""Paired end-to-end decode speed of several checkpoints (or one checkpoint under several runtime
options) in one process: greedy decode tok/s, rounds that take the variants in turn, so on a shared
machine each round's figures are comparable and the ratios are the result.

    python bench/decode_ab.py NAME=CHECKPOINT[@OPTION=VALUE...] ... [--new 64] [--rounds 5] [--threads 1]

e.g. ``vq=ckpt-w2g64vq scalar=ckpt-w2g64 scalar-perlayer=ckpt-w2g64@fused_decode=0``. An option is a
``RuntimeOptions`` field (``fused_decode``, ``int8_decode``: 0/1). Prints every round, the median and
best per variant, and each variant's median over the first one's. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import torch

from common import text_path


def parse_variant(text: str, threads: int):
    from bitsmith.runtime.options import RuntimeOptions

    name, _, rest = text.partition("=")
    path, *opts = rest.split("@")
    if not name or not path:
        raise SystemExit(f"variant {text!r}: expected NAME=CHECKPOINT[@OPTION=VALUE...]")
    fields = {f.name: f.type for f in dataclasses.fields(RuntimeOptions)}
    values: dict[str, object] = {"threads": threads}
    for opt in opts:
        key, _, value = opt.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown runtime option {key!r}; one of {', '.join(sorted(fields))}")
        values[key] = value.lower() not in ("0", "false", "no", "off") if value.lower() in (
            "0", "1", "true", "false", "yes", "no", "on", "off") else value
    return name, Path(path), RuntimeOptions(**values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--new", type=int, default=64, help="new tokens per generation")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chars", type=int, default=400, help="prompt: this many characters of the shipped prose")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from bitsmith.infer.generate import generate
    from bitsmith.runtime.load import load_model

    variants = [parse_variant(v, args.threads) for v in args.variants]
    loaded = {name: load_model(path, options=options) for name, path, options in variants}
    opts = {name: options for name, _, options in variants}  # generate() takes them too (the lean runner)
    prompt = text_path().read_text()[: args.chars]
    for name, one in loaded.items():  # warm-up: kernels built, caches allocated
        generate(one.model, one.tokenizer, prompt, max_new_tokens=4, stop_at_eos=False, options=opts[name])
    speeds: dict[str, list[float]] = {name: [] for name in loaded}
    for r in range(args.rounds):
        for name, one in loaded.items():
            result = generate(one.model, one.tokenizer, prompt, max_new_tokens=args.new, stop_at_eos=False,
                              options=opts[name])
            speeds[name].append(result.decode_tok_s)
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in speeds.items()), flush=True)
    first = statistics.median(next(iter(speeds.values())))
    print(f"\n{args.threads} thread(s), {args.new} new tokens, {args.rounds} paired rounds\n")
    print("| variant | median tok/s | best tok/s | median / first |")
    print("|---|---|---|---|")
    for name, values in speeds.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.1f} | {max(values):.1f} | {med / first:.2f} |")


if __name__ == "__main__":
    main()
