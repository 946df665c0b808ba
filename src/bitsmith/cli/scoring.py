"""What `bitsmith eval` and `bitsmith compare` share once their arguments are parsed: loading
references, scoring per domain with a progress bar, and what a report says about each model.

Heavy imports (torch, transformers, the evaluation code) happen inside the functions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def load_measured(model: str | Path) -> Any:
    """Load ``model`` for scoring: the exact arithmetic quality numbers need
    (:meth:`~bitsmith.runtime.options.RuntimeOptions.for_measurement`), not the generation shortcuts."""
    from bitsmith.runtime.load import load_model
    from bitsmith.runtime.options import RuntimeOptions

    return load_model(model, options=RuntimeOptions.for_measurement())


def source_path(model: str) -> str:
    """The path a model argument (file, folder or alias) names, without loading its weights."""
    from bitsmith.models import open_source

    return str(open_source(model).path)


def check_same_tokenizer(a: Any, b: Any) -> None:
    """Refuse two loaded models whose tokenizers differ (KL needs the same vocabulary)."""
    from bitsmith.cli.common import CommandFailed

    if len(a.tokenizer) != len(b.tokenizer) or a.tokenizer("tokenizer check 123").input_ids != b.tokenizer("tokenizer check 123").input_ids:
        raise CommandFailed(f"{a.name} and {b.name} use different tokenizers; KL divergence needs the same tokenizer on both")


def check_ctx_fits(ctx: int, *models: Any) -> None:
    """Refuse ``--ctx`` longer than any of the loaded models' context, before anything is scored
    (past its context a model's perplexity means nothing)."""
    from bitsmith.models.context import check_context

    for loaded in models:
        if loaded is not None:
            check_context(getattr(loaded.model, "config", None), ctx, f"--ctx {ctx} (for {loaded.name})",
                          "pass --ctx {limit} or less")


def refuse_non_finite(model_name: str, domain: str, metrics: dict[str, Any]) -> None:
    """Refuse to report NaN or inf: they come from NaN/inf logits (an inf scale in a checkpoint, a
    broken kernel), and a printed ``ppl=nan`` with exit 0 passes for a result in scripts."""
    from bitsmith.cli.common import CommandFailed

    bad = [f"{k}={v}" for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isfinite(v)]
    if bad:
        raise CommandFailed(f"the model produced NaN/inf logits: {', '.join(bad)} for {model_name} on {domain}; "
                            f"the checkpoint may hold inf scales; run bitsmith inspect {model_name}")


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


def bar_per_label(bar: Any) -> Any:
    """A progress callback ``(label, done, total)`` that gives each label its own timed task on ``bar``."""
    from bitsmith.cli.common import timed_progress

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
        return evaluate_domains(reference, variants, tokenizer, domains, ctx, max_windows, bar_per_label(bar))


def evaluate_cli_cached(cache_dir: str, reference_path: str | None, load_reference: Any, variants: dict[str, Any],
                        tokenizer: Any, domains: list, ctx: int, max_windows: int | None, k: int) -> tuple[dict, dict]:
    """:func:`bitsmith.eval.domains.evaluate_domains_cached` with a progress bar; says per domain
    whether the cache was built or reused."""
    from bitsmith.cli.common import out, progress_bar
    from bitsmith.eval.domains import evaluate_domains_cached

    with progress_bar() as bar:
        results, info = evaluate_domains_cached(cache_dir, reference_path, load_reference, variants, tokenizer,
                                                domains, ctx, max_windows, k, bar_per_label(bar))
    for d in domains:
        out.print(f"reference cache for {d.name}: {info[d.name]} ({cache_dir}, top-{info['k']}, KL is a lower bound)", markup=False)
    return results, info
