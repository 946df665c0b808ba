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

Several drafts and draft lengths at once: ``--draft w3g128,w2g64 --k 2,3,4`` runs every (draft, k) pair on
every prompt, interleaved with plain decoding (the order rotates per prompt), so all speedups are ratios
from the same run.

Arithmetic (``--arith``): ``int8`` (default, bitsmith's default decode) decodes the target with int8
activations, plain and speculative alike; the speculative verify is then the fused verify step
(infer/verify.py, csrc/verify.cpp), whose rows are plain decoding's bit for bit. ``exact`` decodes the
target with float32 activations (``int8_decode=False``; the verify's rows go through csrc/smallbatch.cpp),
and ``--int8-baseline`` then also times plain int8 decoding of a second copy. The draft always decodes
with int8 activations (a draft only proposes: its arithmetic cannot change the output).
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
    ap.add_argument("--draft", default="w2g64", help="spec or checkpoint; several: comma-separated")
    ap.add_argument("--draft-head", default="w4g128")
    ap.add_argument("--k", default="4", help="draft tokens per round; several: comma-separated (2,3,4)")
    ap.add_argument("--arith", choices=["int8", "exact"], default="int8", help="the target's decode arithmetic")
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
    fast = replace(env, int8_decode=True)
    options = fast if args.arith == "int8" else replace(env, int8_decode=False)
    source = open_source(args.model)
    t0 = time.perf_counter()
    head = QuantSpec.parse(args.draft_head) if args.draft_head != "none" else None
    drafts = {d: _model(d, source, fast, head) for d in args.draft.split(",")}  # first: the float source's peak
    target = _model(args.target, source, options, None)
    fast_target = _model(args.target, source, fast, None) if args.int8_baseline and args.arith == "exact" else None
    print(f"built target {args.target} and drafts {args.draft} (head {args.draft_head}) in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    variants = [(d, int(k)) for d in drafts for k in args.k.split(",")]
    tok = source.tokenizer()
    prompts = [p.prompt for p in load_problems()][: args.prompts]
    common = dict(max_new_tokens=args.new, stop_at_eos=False, options=options)
    generate(target, tok, prompts[0], **{**common, "max_new_tokens": 4})  # warm-up: kernels, plans
    for d, k in variants:
        speculative_generate(target, drafts[d], tok, prompts[0], k=k, **{**common, "max_new_tokens": 4})
    rows: dict[tuple[str, int], list[dict]] = {v: [] for v in variants}
    for i, prompt in enumerate(prompts):
        runs: dict = {}
        order = ["plain", *variants, *(["int8"] if fast_target is not None else [])]
        shift = i % len(order)  # rotate, so load hits every variant alike
        for which in order[shift:] + order[:shift]:
            if which == "plain":
                runs["plain"] = generate(target, tok, prompt, **common)
            elif which == "int8":
                runs["int8"] = generate(fast_target, tok, prompt, **{**common, "options": fast})
            else:
                runs[which] = speculative_generate(target, drafts[which[0]], tok, prompt, k=which[1], **common)
        plain = runs["plain"]
        for v in variants:
            spec = runs[v]
            rows[v].append({"prompt": i, "identical": plain.token_ids == spec.generation.token_ids,
                            "tokens": plain.new_tokens, "plain_decode_s": plain.decode_s,
                            "spec_decode_s": spec.generation.decode_s,
                            **({"int8_decode_s": runs["int8"].decode_s} if "int8" in runs else {}),
                            **spec.stats.as_json()})
        print(f"  prompt {i:2d}: plain {plain.decode_tok_s:.2f} tok/s; " + "; ".join(
            f"{Path(d).name}/k{k} identical {rows[d, k][-1]['identical']}, acceptance {runs[d, k].stats.acceptance_rate:.0%}, "
            f"{runs[d, k].generation.decode_tok_s:.2f} tok/s" for d, k in variants), flush=True)
    for (d, k), found in rows.items():
        _summary(args, d, k, found)


def _model(spec_or_path: str, source, options, head):  # type: ignore[no-untyped-def]
    """A checkpoint path loaded as is, or a spec built in memory from the alias (head at ``head``)."""
    from bitsmith.infer.draft import quantized_copy
    from bitsmith.runtime.load import load_model
    from bitsmith.spec import QuantSpec

    if Path(spec_or_path).expanduser().exists():
        return load_model(spec_or_path, options=options).model.eval()
    return quantized_copy(str(source.path), QuantSpec.parse(spec_or_path), options, head)


def _summary(args: argparse.Namespace, draft: str, k: int, rows: list[dict]) -> None:
    steps = sum(r["tokens"] - 1 for r in rows)  # decode steps: the first token comes from the prefill
    plain_s, spec_s = sum(r["plain_decode_s"] for r in rows), sum(r["spec_decode_s"] for r in rows)
    proposed, accepted = sum(r["proposed"] for r in rows), sum(r["accepted"] for r in rows)
    rounds = sum(r["rounds"] for r in rows)
    ratios = [r["plain_decode_s"] / r["spec_decode_s"] for r in rows if r["spec_decode_s"] > 0]
    lines = [
        f"model {args.model}: target {args.target}, draft {draft} (head {args.draft_head}), k={k}, "
        f"{len(rows)} HumanEval prompts x {args.new} greedy tokens, {args.threads} threads; target "
        f"{'int8-activation' if args.arith == 'int8' else 'exact float'} decode, draft int8-activation decode",
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
        stem = f"speculative_{args.model}_{Path(args.target).name}_{Path(draft).name}_k{k}_{args.arith}"  # spec or folder
        (args.out / f"{stem}.md").write_text(text + "\n")
        (args.out / f"{stem}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
