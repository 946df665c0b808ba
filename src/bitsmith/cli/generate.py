"""bitsmith generate MODEL "prompt" [--max-new-tokens N] [--seed S] [--max-memory 60MB] [--device cuda] [--json]
[--draft w2g64|CHECKPOINT [--draft-k 4]] (speculative decoding, bitsmith.infer.speculative)"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text, streamed to the terminal")
    p.add_argument("model", help="checkpoint, Hugging Face folder, .gguf file or alias")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-memory", default=None, help="bytes of quantized block weights to keep resident (e.g. 60MB); other blocks stream from the checkpoint")
    p.add_argument("--device", default="cpu", help="cpu (default) or an accelerator such as cuda: packed weights move there and are dequantized on it")
    p.add_argument("--hf-forward", action="store_true", help="use the Hugging Face forward instead of bitsmith's lean path")
    p.add_argument("--json", action="store_true", help='print a last line {"new_tokens", "prefill_tok_s", "decode_tok_s", "text"}')
    p.add_argument("--draft", metavar="SPEC|PATH", default=None,
                   help="speculative decoding: a quantization spec (w2g64, w3g128) for a draft built in memory from "
                        "MODEL's unquantized source, or a quantized checkpoint of the same model; greedy output is "
                        "unchanged, sampled output keeps its distribution")
    p.add_argument("--draft-k", type=int, default=4, help="tokens the draft proposes per target step (1-7, default 4)")
    p.add_argument("--draft-head", default="w4g128",
                   help="spec of a spec-built draft's output head (default w4g128; 'none' keeps it unquantized)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from bitsmith.cli.common import console
    from bitsmith.infer.generate import generate
    from bitsmith.runtime.load import load_model

    from bitsmith.plan.fit import parse_size
    from bitsmith.runtime.options import RuntimeOptions

    options = RuntimeOptions.from_env()  # the user's BITSMITH_* overrides, read once for the whole run
    loaded = load_model(args.model, max_memory=None if args.max_memory is None else parse_size(args.max_memory),
                        options=options)
    if loaded.offload is not None:
        plan = loaded.offload
        console.print(f"[dim]offload: {len(plan.resident)} of {len(plan.block_bytes)} blocks resident "
                      f"({plan.resident_bytes / 1e6:.2f} MB), {len(plan.streamed)} streamed per token[/]")
    if args.device != "cpu":
        if loaded.offload is not None:
            raise SystemExit("--max-memory streams blocks from disk to the CPU; it cannot be combined with --device")
        import torch

        try:
            loaded.model.to(torch.device(args.device))
        except (RuntimeError, AssertionError) as exc:  # e.g. "Torch not compiled with CUDA enabled"
            raise SystemExit(f"cannot use device {args.device!r}: {exc}") from None
    stream = (lambda piece: (sys.stdout.write(piece), sys.stdout.flush())) if not args.json else None
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed, chat=args.chat, on_token=stream, options=options)
    if args.draft is not None:
        return _run_speculative(args, loaded, options, sampling)
    result = generate(loaded.model, loaded.tokenizer, args.prompt, lean=not args.hf_forward, **sampling)
    if args.json:
        print(json.dumps(result.as_json()))
    else:
        sys.stdout.write("\n")
        console.print(f"[dim]{result.new_tokens} tokens; prefill {result.prefill_tok_s:.1f} tok/s, decode {result.decode_tok_s:.1f} tok/s[/]")
    return 0


def _run_speculative(args: argparse.Namespace, loaded, options, sampling: dict) -> int:  # type: ignore[no-untyped-def]
    """generate with a draft: the same output, plus the draft's acceptance rate."""
    import json
    import sys

    from bitsmith.cli.common import console
    from bitsmith.infer.draft import load_draft
    from bitsmith.infer.speculative import MAX_DRAFT_TOKENS, speculative_generate

    if args.hf_forward or args.device != "cpu" or loaded.offload is not None:
        raise ValueError("--draft runs on the CPU lean path; drop --hf-forward, --device and --max-memory")
    if not 1 <= args.draft_k <= MAX_DRAFT_TOKENS:  # refused before the draft is built
        raise ValueError(f"--draft-k must be 1 to {MAX_DRAFT_TOKENS}, got {args.draft_k}")
    head = None if args.draft_head.lower() == "none" else args.draft_head
    draft = load_draft(args.draft, loaded, options, head_spec=head)
    console.print(f"[dim]draft: {draft.label} ({draft.build_s:.1f} s)[/]")
    out = speculative_generate(loaded.model, draft.model, loaded.tokenizer, args.prompt, k=args.draft_k, **sampling)
    result, stats = out.generation, out.stats
    if args.json:
        print(json.dumps({**result.as_json(), "draft": draft.label, **stats.as_json()}))
    else:
        sys.stdout.write("\n")
        console.print(f"[dim]{result.new_tokens} tokens; prefill {result.prefill_tok_s:.1f} tok/s, decode "
                      f"{result.decode_tok_s:.1f} tok/s; draft acceptance {stats.acceptance_rate:.0%} "
                      f"({stats.accepted}/{stats.proposed}), {stats.tokens_per_round:.2f} tokens per target step[/]")
    return 0
