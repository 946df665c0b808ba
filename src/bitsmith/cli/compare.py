"""bitsmith compare A B [--text NAME=PATH ...] [--reference REF] [--json OUT] [--report DIR]

Which of two models (checkpoints, Hugging Face folders, GGUF files; same tokenizer) lost more
quality, per domain, against one reference: ``--reference``, else the source model named in a
bitsmith checkpoint's report, else A itself."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

MAX_CHARS = 60_000  # bitsmith.eval.domains.MAX_CHARS, repeated so --help imports nothing heavy


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="which of two models is worse, per domain (prose, code, your texts), and by how much")
    p.add_argument("a", metavar="A", help="first model: checkpoint, Hugging Face folder, .gguf file or alias")
    p.add_argument("b", metavar="B", help="second model, with the same tokenizer")
    p.add_argument("--text", action="append", metavar="[NAME=]PATH", help="a domain: built-in prose, code, humaneval, stdlib, or a file/folder; repeat for several (default: prose and code)")
    p.add_argument("--reference", help="the unquantized model (default: the source named in a checkpoint, else A)")
    from bitsmith.cli.eval import add_cache_arguments

    add_cache_arguments(p)
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows of each domain")
    p.add_argument("--max-chars", type=int, default=MAX_CHARS, help=f"use the first N characters of each text (default {MAX_CHARS:,}, as PROTOCOL.md)")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT ('-' for stdout)")
    p.add_argument("--report", metavar="DIR", help="write report.md, report.json and plots into DIR (runs accumulate)")
    p.set_defaults(run=run)


def checkpoint_source(loaded: Any) -> str | None:
    """The model a bitsmith checkpoint was quantized from, when its report names one that exists."""
    source = (loaded.info.report or {}).get("source") if loaded.info is not None else None
    return source if source and Path(source).exists() else None


def variant_info(name: str, loaded: Any) -> Any:
    """What a report says about a model: spec, bits/weight of its quantized layers, per-layer error."""
    from bitsmith.eval.report import VariantInfo

    path = str(loaded.source.path)
    if loaded.info is not None:
        report = loaded.info.report or {}
        layers = tuple({k: l.get(k) for k in ("name", "spec", "bits_per_weight", "sqnr_db")} for l in report.get("layers", ()))
        return VariantInfo(name, path, report.get("spec"), report.get("bits_per_weight"), layers)
    if loaded.source.kind == "gguf":
        from bitsmith.io.inspect import inspect_path

        try:
            found = inspect_path(path)
        except ValueError:
            return VariantInfo(name, path)
        return VariantInfo(name, path, found.summary, found.total_bits_per_weight(only_quantized=True))
    return VariantInfo(name, path)


def report_notes(*models: Any) -> tuple[str, ...]:
    """The docs/PROTOCOL.md caveat whenever a real (dequantized GGUF) model is involved."""
    from bitsmith.eval.report import CAVEAT_DEQUANTIZED_GGUF

    def from_gguf(m: Any) -> bool:
        src = (m.info.report or {}).get("source", "") if m.info is not None else ""
        return m.source.kind == "gguf" or str(src).lower().endswith(".gguf")

    return (CAVEAT_DEQUANTIZED_GGUF,) if any(from_gguf(m) for m in models if m is not None) else ()


def _bar_per_label(bar: Any) -> Any:
    """A progress callback ``(label, done, total)`` that gives each label its own timed task on ``bar``."""
    from bitsmith.cli.eval import timed_progress

    callbacks: dict[str, Any] = {}

    def progress(label: str, done: int, total: int) -> None:
        if label not in callbacks:
            callbacks[label] = timed_progress(bar, bar.add_task(label, total=total, rate=""))
        callbacks[label](done, total)

    return progress


def evaluate_cli(reference: Any, variants: dict[str, Any], tokenizer: Any, domains: list, ctx: int, max_windows: int | None) -> dict:
    """Per-domain evaluation with a progress bar showing tokens/s."""
    from bitsmith.cli.common import progress_bar
    from bitsmith.eval.domains import evaluate_domains

    with progress_bar() as bar:
        return evaluate_domains(reference, variants, tokenizer, domains, ctx, max_windows, _bar_per_label(bar))


def evaluate_cli_cached(cache_dir: str, reference_path: str | None, load_reference: Any, variants: dict[str, Any],
                        tokenizer: Any, domains: list, ctx: int, max_windows: int | None, k: int) -> tuple[dict, dict]:
    """:func:`bitsmith.eval.domains.evaluate_domains_cached` with a progress bar; says per domain
    whether the cache was built or reused."""
    from bitsmith.cli.common import out, progress_bar
    from bitsmith.eval.domains import evaluate_domains_cached

    with progress_bar() as bar:
        results, info = evaluate_domains_cached(cache_dir, reference_path, load_reference, variants, tokenizer,
                                                domains, ctx, max_windows, k, _bar_per_label(bar))
    for d in domains:
        out.print(f"reference cache for {d.name}: {info[d.name]} ({cache_dir}, top-{info['k']}, KL is a lower bound)", markup=False)
    return results, info


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
    from bitsmith.cli.eval import check_same_tokenizer
    from bitsmith.io.load import load_model

    path = args.reference or checkpoint_source(a) or checkpoint_source(b)
    if path is None or Path(path).resolve() == Path(a.name).resolve():  # A itself: no second copy
        return None, a.name
    reference = load_model(path)
    check_same_tokenizer(reference, a)
    return reference, reference.name


def _self_row(ref: dict[str, Any]) -> dict[str, Any]:
    """A scored against itself as the reference: zero divergence, full agreement."""
    return {"ppl": ref["ppl"], "tokens": ref["tokens"], "kld_mean": 0.0, "kld_median": 0.0, "kld_p99": 0.0,
            "top1": 1.0, "ref_ppl": ref["ppl"], "dprob_mean": 0.0, "ppl_ratio": 1.0}


def run(args: argparse.Namespace) -> int:
    from bitsmith.cli.common import out
    from bitsmith.cli.eval import check_same_tokenizer, write_json
    from bitsmith.eval.domains import domain_metrics, resolve_domains, verdict
    from bitsmith.eval.report import Run, write_report
    from bitsmith.io.load import load_model

    domains = resolve_domains(args.text, args.max_chars)
    a, b = load_model(args.a), load_model(args.b)
    check_same_tokenizer(a, b)
    kl = "exact"
    if args.reference_cache:
        from bitsmith.cli.eval import source_path

        ref_path = args.reference or checkpoint_source(a) or checkpoint_source(b) or a.name
        is_a = Path(source_path(ref_path)).resolve() == Path(a.name).resolve()
        reference = None  # never kept loaded: the cache stands for it

        def load_reference() -> Any:
            if is_a:
                return a.model
            ref = load_model(ref_path)
            check_same_tokenizer(ref, a)
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
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for domain, per_model in results.items():
        rows[domain] = {name: domain_metrics(r) for name, r in per_model.items() if name != "reference"}
        if is_a:
            rows[domain] = {"A": _self_row(per_model["reference"].as_dict()), **rows[domain]}
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
