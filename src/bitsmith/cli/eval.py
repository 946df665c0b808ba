"""bitsmith eval MODEL [--text [NAME=]PATH ...] [--reference REF] [--json OUT] [--report DIR]"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

MAX_CHARS = 60_000  # bitsmith.eval.domains.MAX_CHARS, repeated so --help imports nothing heavy


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity, and KL divergence / top-1 agreement against a reference, per domain")
    p.add_argument("model", help="checkpoint, Hugging Face folder, .gguf file or alias")
    p.add_argument("--text", action="append", metavar="[NAME=]PATH",
                   help="text to score: a file, a folder, or a built-in domain (prose, code, humaneval, stdlib); "
                        "repeat for several domains (default: the shipped Pride and Prejudice slice)")
    p.add_argument("--reference", help="the unquantized model to compare against (same tokenizer)")
    add_cache_arguments(p)
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows of each text")
    p.add_argument("--max-chars", type=int, default=MAX_CHARS, help=f"use the first N characters of each text (default {MAX_CHARS:,}, as PROTOCOL.md)")
    p.add_argument("--json", metavar="OUT", help="write the result as JSON to OUT ('-' for stdout); one text gives a flat "
                   "object, several give {\"domains\": {name: result}}")
    p.add_argument("--report", metavar="DIR", help="write report.md, report.json and plots into DIR (runs accumulate)")
    p.set_defaults(run=run)


CACHE_HELP = (
    "score against a top-k reference cache in folder DIR (one file per domain): built from --reference "
    "when absent, reused when present (the reference is then not loaded at all), refused with an error "
    "when it was built for another reference, tokenizer, text or ctx. KL from the cache is a lower bound: "
    "at top-k 256 it measured -7.6%% (w8) and -4.7%% (w3g128) of the exact mean KLD on SmolLM2-135M prose, "
    "-4.2%% / -1.9%% on code; ppl and top-1 are exact"
)


def add_cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference-cache", metavar="DIR", help=CACHE_HELP)
    p.add_argument("--cache-topk", type=int, default=256, metavar="K",
                   help="reference log-probs kept per position when building a cache (default 256, ~1.5 KB/token)")


def source_path(model: str) -> str:
    """The path a model argument (file, folder or alias) names, without loading its weights."""
    from bitsmith.models.sources import open_source

    return str(open_source(model).path)


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


def write_json(dest: str, payload: Any) -> None:
    """JSON to a file, or to stdout for '-'."""
    import json

    text = json.dumps(payload)
    if dest == "-":
        print(text)
    else:
        with open(dest, "w", encoding="utf-8") as f:
            f.write(text + "\n")


def _domains(args: argparse.Namespace) -> list:
    from bitsmith.eval.domains import Domain, resolve_domains
    from bitsmith.eval.suite import DEFAULT_TEXT, shipped_text

    if not args.text:  # the historical default: the shipped prose slice
        return [Domain("prose", shipped_text()[: args.max_chars], f"bitsmith/data/{DEFAULT_TEXT}")]
    return resolve_domains(args.text, args.max_chars)


def run(args: argparse.Namespace) -> int:
    from bitsmith.cli.common import fmt, out
    from bitsmith.cli.compare import evaluate_cli, report_notes, variant_info
    from bitsmith.eval.domains import domain_metrics
    from bitsmith.runtime.load import load_model

    domains = _domains(args)
    model = load_model(args.model)
    reference, kl, ref_name = None, "exact", args.reference
    if args.reference_cache:
        from bitsmith.cli.compare import evaluate_cli_cached

        def load_reference() -> Any:
            if Path(source_path(args.reference)).resolve() == Path(model.name).resolve():
                return model.model  # the model is its own reference: one copy in memory
            ref = load_model(args.reference)
            check_same_tokenizer(model, ref)
            return ref.model

        results, info = evaluate_cli_cached(
            args.reference_cache, source_path(args.reference) if args.reference else None,
            load_reference if args.reference else None, {"model": model.model}, model.tokenizer, domains,
            args.ctx, args.max_windows, args.cache_topk)
        ref_name = args.reference or info.get("model_path")
        kl = f"top-{info['k']} reference cache (a lower bound)"
    else:
        reference = load_model(args.reference) if args.reference else None
        if reference is not None:
            check_same_tokenizer(model, reference)
        results = evaluate_cli(reference and reference.model, {"model": model.model}, model.tokenizer, domains, args.ctx, args.max_windows)
    rows: dict[str, dict[str, Any]] = {}
    for domain, per_model in results.items():
        rows[domain] = domain_metrics(per_model["model"])
        if "reference" in per_model:
            rows[domain]["ref_ppl"] = per_model["reference"].ppl
        line = "  ".join(f"{k}={fmt(v)}" for k, v in rows[domain].items())
        out.print(f"{args.model}: {line}" if len(rows) == 1 else f"{args.model} [{domain}]: {line}")
    if args.json:
        write_json(args.json, next(iter(rows.values())) if len(rows) == 1 else {"domains": rows})
    if args.report:
        from bitsmith.eval.report import Run, write_report

        run_record = Run(
            command="eval", reference=ref_name, kl=kl, ctx=args.ctx,
            domains={d.name: {"source": d.source, "tokens": rows[d.name]["tokens"]} for d in domains},
            variants=(variant_info("model", model),), results={d: {"model": r} for d, r in rows.items()},
            notes=report_notes(model, reference),
        )
        out.print(f"report: {write_report(args.report, run_record).markdown}")
    return 0
