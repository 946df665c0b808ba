"""Speculative decoding with a quantized draft of the same model: same tokens, acceptance rate, speedup.

The target and the draft are both built in memory from the alias's weights with bitsmith's plain
min-max RTN (``bitsmith.infer.draft.quantized_copy``, no clip search): the target's decoder linears at ``--target`` (head left
unquantized, as a default checkpoint keeps it), the draft's at ``--draft`` with its head at w4g128 (what
``bitsmith generate --draft SPEC`` builds). For each of ``--prompts`` HumanEval prompts: plain greedy
decoding and speculative greedy decoding of ``--new`` tokens, in alternating order (plain first on even
prompts, speculative first on odd ones) so load on a shared machine hits both alike. Prints whether the
token ids are identical, the draft's acceptance rate, and the decode speed of both (same run, same
prompts, same tokens).

    python bench/speculative.py --model smollm2-135m --target w4g128 --draft w2g64 --prompts 20

``--target`` / ``--draft`` may also be checkpoint folders of the same model (loaded as they are).

Arithmetic: the target decodes with exact float32 activations (``RuntimeOptions(int8_decode=False)``), where
the verify forward's rows (csrc/smallbatch.cpp) are bit-identical to plain decoding's, so greedy output can
be identical; the draft decodes with int8 activations (faster, and a draft only proposes). ``--int8-baseline``
also times plain decoding of a second copy of the target with the default int8-activation decode, the
fastest plain decoding bitsmith has, so the speedup is reported against both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--target", default="w4g128")
    ap.add_argument("--draft", default="w2g64")
    ap.add_argument("--draft-head", default="w4g128")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--int8-baseline", action="store_true", help="also time plain decoding with int8 activations")
    ap.add_argument("--out", type=Path, default=None, help="write speculative_<model>.json and .md here")
    args = ap.parse_args()

    import torch

    from bitsmith.eval.humaneval import load_problems
    from bitsmith.infer.generate import generate
    from bitsmith.infer.speculative import speculative_generate
    from bitsmith.models import open_source
    from bitsmith.runtime.options import RuntimeOptions
    from bitsmith.spec import QuantSpec

    torch.set_num_threads(args.threads)
    from dataclasses import replace

    env = RuntimeOptions.from_env()
    options, fast = replace(env, int8_decode=False), replace(env, int8_decode=True)
    source = open_source(args.model)
    t0 = time.perf_counter()
    head = QuantSpec.parse(args.draft_head) if args.draft_head != "none" else None
    draft = _model(args.draft, source, fast, head)  # first: building from the float source is the memory peak
    target = _model(args.target, source, options, None)
    fast_target = _model(args.target, source, fast, None) if args.int8_baseline else None
    print(f"built target {args.target} and draft {args.draft} (head {args.draft_head}) in {time.perf_counter() - t0:.0f} s",
          flush=True)
    tok = source.tokenizer()
    prompts = [p.prompt for p in load_problems()][: args.prompts]
    common = dict(max_new_tokens=args.new, stop_at_eos=False, options=options)
    generate(target, tok, prompts[0], **{**common, "max_new_tokens": 4})  # warm-up: kernels, plans
    speculative_generate(target, draft, tok, prompts[0], k=args.k, **{**common, "max_new_tokens": 4})
    rows = []
    for i, prompt in enumerate(prompts):
        runs = {}
        order = ["plain", "spec", "int8"] if i % 2 == 0 else ["int8", "spec", "plain"]
        for which in order:
            if which == "plain":
                runs["plain"] = generate(target, tok, prompt, **common)
            elif which == "int8" and fast_target is not None:
                runs["int8"] = generate(fast_target, tok, prompt, **{**common, "options": fast})
            elif which == "spec":
                runs["spec"] = speculative_generate(target, draft, tok, prompt, k=args.k, **common)
        plain, spec = runs["plain"], runs["spec"]
        rows.append({"prompt": i, "identical": plain.token_ids == spec.generation.token_ids,
                     "tokens": plain.new_tokens, "plain_decode_s": plain.decode_s, "spec_decode_s": spec.generation.decode_s,
                     **({"int8_decode_s": runs["int8"].decode_s} if "int8" in runs else {}),
                     **spec.stats.as_json()})
        print(f"  prompt {i:2d}: identical {rows[-1]['identical']}, acceptance {spec.stats.acceptance_rate:.0%}, "
              f"decode {plain.decode_tok_s:.1f} -> {spec.generation.decode_tok_s:.1f} tok/s", flush=True)
    _summary(args, rows)


def _model(spec_or_path: str, source, options, head):  # type: ignore[no-untyped-def]
    """A checkpoint path loaded as is, or a spec built in memory from the alias (head at ``head``)."""
    from bitsmith.infer.draft import quantized_copy
    from bitsmith.runtime.load import load_model
    from bitsmith.spec import QuantSpec

    if Path(spec_or_path).expanduser().exists():
        return load_model(spec_or_path, options=options).model.eval()
    return quantized_copy(str(source.path), QuantSpec.parse(spec_or_path), options, head)


def _summary(args: argparse.Namespace, rows: list[dict]) -> None:
    steps = sum(r["tokens"] - 1 for r in rows)  # decode steps: the first token comes from the prefill
    plain_s, spec_s = sum(r["plain_decode_s"] for r in rows), sum(r["spec_decode_s"] for r in rows)
    proposed, accepted = sum(r["proposed"] for r in rows), sum(r["accepted"] for r in rows)
    rounds = sum(r["rounds"] for r in rows)
    ratios = [r["plain_decode_s"] / r["spec_decode_s"] for r in rows if r["spec_decode_s"] > 0]
    lines = [
        f"model {args.model}: target {args.target}, draft {args.draft} (head {args.draft_head}), k={args.k}, "
        f"{len(rows)} HumanEval prompts x {args.new} greedy tokens, {args.threads} threads; target exact float "
        "decode, draft int8-activation decode",
        f"greedy tokens identical to plain decoding: {sum(r['identical'] for r in rows)}/{len(rows)} prompts",
        f"draft acceptance: {accepted}/{proposed} = {accepted / max(proposed, 1):.1%}; "
        f"{(accepted + rounds) / max(rounds, 1):.2f} tokens per target forward",
        f"decode: plain {steps / plain_s:.2f} tok/s, speculative {steps / spec_s:.2f} tok/s -> speedup "
        f"{plain_s / spec_s:.2f}x (per-prompt median {statistics.median(ratios):.2f}x, "
        f"range {min(ratios):.2f}-{max(ratios):.2f}x)",
        *([f"plain decoding with int8 activations: {steps / sum(r['int8_decode_s'] for r in rows):.2f} tok/s -> "
           f"speculative speedup over it {sum(r['int8_decode_s'] for r in rows) / spec_s:.2f}x"]
          if "int8_decode_s" in rows[0] else []),
        f"speculative time split: draft {sum(r['draft_s'] for r in rows):.1f} s, "
        f"target verify {sum(r['verify_s'] for r in rows):.1f} s",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"speculative_{args.model}_{Path(args.target).name}_{Path(args.draft).name}"  # a spec or a folder's name
        (args.out / f"{stem}.md").write_text(text + "\n")
        (args.out / f"{stem}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
