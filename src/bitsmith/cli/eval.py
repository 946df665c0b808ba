"""bitsmith eval MODEL [--text [NAME=]PATH ...] [--reference REF] [--json OUT] [--report DIR]"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bitsmith.cli.textargs import add_cache_arguments, add_window_arguments


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity, and KL divergence / top-1 agreement against a reference, per domain")
    p.add_argument("model", help="checkpoint, Hugging Face folder, .gguf file or alias")
    p.add_argument("--text", action="append", metavar="[NAME=]PATH",
                   help="text to score: a file, a folder, or a built-in domain (prose, code, humaneval, stdlib); "
                        "repeat for several domains (default: the shipped Pride and Prejudice slice)")
    p.add_argument("--reference", help="the unquantized model to compare against (same tokenizer)")
    add_cache_arguments(p)
    add_window_arguments(p, "text")
    p.add_argument("--json", metavar="OUT", help="write the result as JSON to OUT ('-' for stdout); one text gives a flat "
                   "object, several give {\"domains\": {name: result}}")
    p.add_argument("--report", metavar="DIR", help="write report.md, report.json and plots into DIR (runs accumulate)")
    p.set_defaults(run=run)


def _domains(args: argparse.Namespace) -> list:
    from bitsmith.eval.domains import Domain, resolve_domains
    from bitsmith.eval.suite import DEFAULT_TEXT, shipped_text

    if not args.text:  # the historical default: the shipped prose slice
        return [Domain("prose", shipped_text()[: args.max_chars], f"bitsmith/data/{DEFAULT_TEXT}")]
    return resolve_domains(args.text, args.max_chars)


def run(args: argparse.Namespace) -> int:
    from bitsmith.cli.common import fmt, out, write_json
    from bitsmith.cli.scoring import (
        check_ctx_fits, check_same_tokenizer, evaluate_cli, evaluate_cli_cached, load_measured, refuse_non_finite,
        report_notes, source_path, variant_info,
    )
    from bitsmith.eval.domains import domain_metrics

    domains = _domains(args)
    model = load_measured(args.model)
    check_ctx_fits(args.ctx, model)
    reference, kl, ref_name = None, "exact", args.reference
    if args.reference_cache:
        def load_reference() -> Any:
            if Path(source_path(args.reference)).resolve() == Path(model.name).resolve():
                return model.model  # the model is its own reference: one copy in memory
            ref = load_measured(args.reference)
            check_same_tokenizer(model, ref)
            check_ctx_fits(args.ctx, ref)
            return ref.model

        results, info = evaluate_cli_cached(
            args.reference_cache, source_path(args.reference) if args.reference else None,
            load_reference if args.reference else None, {"model": model.model}, model.tokenizer, domains,
            args.ctx, args.max_windows, args.cache_topk)
        ref_name = args.reference or info.get("model_path")
        kl = f"top-{info['k']} reference cache (a lower bound)"
    else:
        reference = load_measured(args.reference) if args.reference else None
        if reference is not None:
            check_same_tokenizer(model, reference)
            check_ctx_fits(args.ctx, reference)
        results = evaluate_cli(reference and reference.model, {"model": model.model}, model.tokenizer, domains, args.ctx, args.max_windows)
    rows: dict[str, dict[str, Any]] = {}
    for domain, per_model in results.items():
        rows[domain] = domain_metrics(per_model["model"])
        if "reference" in per_model:
            refuse_non_finite(ref_name or "the reference", domain, {"ppl": per_model["reference"].ppl})
            rows[domain]["ref_ppl"] = per_model["reference"].ppl
        refuse_non_finite(args.model, domain, rows[domain])
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
