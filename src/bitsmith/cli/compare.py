"""bitsmith compare A B [--text NAME=PATH ...] [--reference REF] [--json OUT] [--report DIR]

Which of two models (checkpoints, Hugging Face folders, GGUF files; same tokenizer) lost more
quality, per domain, against one reference: ``--reference``, else the source model named in a
bitsmith checkpoint's report, else A itself."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bitsmith.cli.textargs import add_cache_arguments, add_window_arguments


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="which of two models is worse, per domain (prose, code, your texts), and by how much")
    p.add_argument("a", metavar="A", help="first model: checkpoint, Hugging Face folder, .gguf file or alias")
    p.add_argument("b", metavar="B", help="second model, with the same tokenizer")
    p.add_argument("--text", action="append", metavar="[NAME=]PATH", help="a domain: built-in prose, code, humaneval, stdlib, or a file/folder; repeat for several (default: prose and code)")
    p.add_argument("--reference", help="the unquantized model (default: the source named in a checkpoint, else A)")
    add_cache_arguments(p)
    add_window_arguments(p, "domain")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT ('-' for stdout)")
    p.add_argument("--report", metavar="DIR", help="write report.md, report.json and plots into DIR (runs accumulate)")
    p.set_defaults(run=run)


def print_tables(rows: dict[str, dict[str, dict[str, Any]]]) -> None:
    from rich.table import Table

    from bitsmith.cli.common import fmt, out

    columns = (("ppl", "ppl"), ("ppl_ratio", "ppl ratio"), ("kld_mean", "KLD"), ("kld_median", "KLD med"),
               ("kld_p99", "KLD p99"), ("top1", "top-1"), ("dprob_mean", "Δp(target)"))
    for domain, per_model in rows.items():
        table = Table(title=domain)
        table.add_column("model")
        for _, label in columns:
            table.add_column(label, justify="right")
        for name, metrics in per_model.items():
            cells = [f"{100 * metrics['top1']:.1f}%" if key == "top1" and metrics.get(key) is not None
                     else fmt(metrics.get(key), 3) for key, _ in columns]
            table.add_row(name, *cells)
        out.print(table)


def _pick_reference(args: argparse.Namespace, a: Any, b: Any) -> tuple[Any | None, str]:
    """(loaded reference or None when it is A itself, its path)."""
    from bitsmith.cli.scoring import check_ctx_fits, check_same_tokenizer, checkpoint_source, load_measured

    path = args.reference or checkpoint_source(a) or checkpoint_source(b)
    if path is None or Path(path).resolve() == Path(a.name).resolve():  # A itself: no second copy
        return None, a.name
    reference = load_measured(path)
    check_same_tokenizer(reference, a)
    check_ctx_fits(args.ctx, reference)
    return reference, reference.name


def _self_row(ref: dict[str, Any]) -> dict[str, Any]:
    """A scored against itself as the reference: zero divergence, full agreement."""
    return {"ppl": ref["ppl"], "tokens": ref["tokens"], "kld_mean": 0.0, "kld_median": 0.0, "kld_p99": 0.0,
            "top1": 1.0, "ref_ppl": ref["ppl"], "dprob_mean": 0.0, "ppl_ratio": 1.0}


def _rows(results: dict[str, dict[str, Any]], names: dict[str, str], is_a: bool) -> dict[str, dict[str, dict[str, Any]]]:
    """Per domain, each model's metrics (A's own row when A is the reference); NaN or inf from any
    model (``names``: label -> path, "reference" included) is refused, never tabled."""
    from bitsmith.cli.scoring import refuse_non_finite
    from bitsmith.eval.domains import domain_metrics

    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for domain, per_model in results.items():
        if "reference" in per_model:
            refuse_non_finite(names["reference"], domain, {"ppl": per_model["reference"].ppl})
        rows[domain] = {name: domain_metrics(r) for name, r in per_model.items() if name != "reference"}
        for name, metrics in rows[domain].items():
            refuse_non_finite(names[name], domain, metrics)
        if is_a:
            rows[domain] = {"A": _self_row(per_model["reference"].as_dict()), **rows[domain]}
    return rows


def run(args: argparse.Namespace) -> int:
    from bitsmith.cli.common import out, write_json
    from bitsmith.cli.scoring import (
        check_ctx_fits, check_same_tokenizer, checkpoint_source, evaluate_cli, evaluate_cli_cached, load_measured,
        report_notes, source_path, variant_info,
    )
    from bitsmith.eval.domains import resolve_domains, verdict
    from bitsmith.eval.report import Run, write_report

    domains = resolve_domains(args.text, args.max_chars)
    a, b = load_measured(args.a), load_measured(args.b)
    check_same_tokenizer(a, b)
    check_ctx_fits(args.ctx, a, b)
    kl = "exact"
    if args.reference_cache:
        ref_path = args.reference or checkpoint_source(a) or checkpoint_source(b) or a.name
        is_a = Path(source_path(ref_path)).resolve() == Path(a.name).resolve()
        reference = None  # never kept loaded: the cache stands for it

        def load_reference() -> Any:
            if is_a:
                return a.model
            ref = load_measured(ref_path)
            check_same_tokenizer(ref, a)
            check_ctx_fits(args.ctx, ref)
            return ref.model

        variants = {"B": b.model} if is_a else {"A": a.model, "B": b.model}  # A itself: not scored again
        results, info = evaluate_cli_cached(args.reference_cache, source_path(ref_path), load_reference, variants,
                                            a.tokenizer, domains, args.ctx, args.max_windows, args.cache_topk)
        kl = f"top-{info['k']} reference cache (a lower bound)"
    else:
        reference, ref_path = _pick_reference(args, a, b)
        is_a = reference is None
        variants = {"A": a.model, "B": b.model} if reference is not None else {"B": b.model}
        results = evaluate_cli(reference.model if reference else a.model, variants, a.tokenizer, domains, args.ctx, args.max_windows)
    rows = _rows(results, {"A": a.name, "B": b.name, "reference": ref_path}, is_a)
    line = verdict("A", "B", rows)
    out.print(f"A = {a.name}\nB = {b.name}\nreference = {ref_path}{' (A)' if is_a else ''}")
    print_tables(rows)
    out.print(f"[bold]{line}[/]", soft_wrap=True)  # one line, so it can be copied whole
    if args.json:
        write_json(args.json, {"a": a.name, "b": b.name, "reference": ref_path, "domains": rows, "verdict": line})
    if args.report:
        tokens = {d: next(iter(rows[d].values()))["tokens"] for d in rows}
        run_record = Run(
            command="compare", reference=ref_path, kl=kl, ctx=args.ctx,
            domains={d.name: {"source": d.source, "tokens": tokens[d.name]} for d in domains},
            variants=(variant_info("A", a), variant_info("B", b)), results=rows, verdict=line,
            notes=report_notes(a, b, reference),
        )
        files = write_report(args.report, run_record)
        out.print(f"report: {files.markdown}")
    return 0
