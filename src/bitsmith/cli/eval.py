"""bitsmith eval MODEL --text FILE [--reference REF] [--json OUT]"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity, and KL divergence / top-1 agreement against a reference")
    p.add_argument("model", help="checkpoint, Hugging Face folder, .gguf file or alias")
    p.add_argument("--text", help="UTF-8 text file to score (default: the shipped Pride and Prejudice slice)")
    p.add_argument("--reference", help="the unquantized model to compare against (same tokenizer)")
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    p.add_argument("--json", metavar="OUT", help="write the result as JSON to OUT ('-' for stdout)")
    p.set_defaults(run=run)


def timed_progress(bar, task):
    """A progress callback that shows tokens/s."""
    import time

    start = time.perf_counter()

    def update(done: int, total: int) -> None:
        rate = done / max(time.perf_counter() - start, 1e-9)
        bar.update(task, completed=done, total=total, rate=f"{rate:,.0f} tok/s")

    return update


def check_same_tokenizer(a, b) -> None:
    from bitsmith.cli.common import CommandFailed

    if len(a.tokenizer) != len(b.tokenizer) or a.tokenizer("tokenizer check 123").input_ids != b.tokenizer("tokenizer check 123").input_ids:
        raise CommandFailed(f"{a.name} and {b.name} use different tokenizers; KL divergence needs the same tokenizer on both")


def run(args: argparse.Namespace) -> int:
    import json

    from bitsmith.cli.common import fmt, out, progress_bar
    from bitsmith.eval.suite import evaluate_variants, read_text, text_windows
    from bitsmith.io.load import load_model

    model = load_model(args.model)
    reference = load_model(args.reference) if args.reference else None
    if reference is not None:
        check_same_tokenizer(model, reference)
    wins = text_windows(model.tokenizer, read_text(args.text), args.ctx, args.max_windows)
    with progress_bar() as bar:
        task = bar.add_task("eval", total=wins.numel(), rate="")
        results = evaluate_variants(reference and reference.model, {"model": model.model}, wins, timed_progress(bar, task))
    result = results["model"].as_dict()
    if reference is not None:
        result["ref_ppl"] = results["reference"].ppl
    line = "  ".join(f"{k}={fmt(v)}" for k, v in result.items())
    out.print(f"{args.model}: {line}")
    if args.json:
        text = json.dumps(result)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0
