"""The sweep driver: check everything, build the reference caches once, run the unfinished variants
on an executor, store each result as it arrives, then report.

Order of work (cheap checks before expensive work): variants parsed, model opened (no weights),
texts read, the out folder's key checked; then the reference caches (the reference is loaded only
when a cache is missing); then the tasks; then the report, drawn from every stored result so a
resumed sweep reports the whole sweep."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitsmith.sweep.config import SweepConfig, SweepError, Variant, task_memory_bytes
from bitsmith.sweep.executor import Executor, Resources
from bitsmith.sweep.frontier import Recommendation, recommend
from bitsmith.sweep.report import SweepReport, write_sweep_report
from bitsmith.sweep.store import ResultStore
from bitsmith.sweep.task import VariantJob, run_variant

__all__ = ["SweepOutcome", "Budget", "run_sweep", "prepare", "fit_variants"]

log = logging.getLogger(__name__)

# (event, variant name, done, total, result or error text)
Events = Callable[[str, str, int, int, Any], None]


@dataclass(frozen=True)
class Budget:
    """The memory a recommendation must fit (``fit``'s arithmetic), as the user wrote it."""

    text: str  # e.g. "24GB"
    ctx: int = 8192


@dataclass(frozen=True)
class SweepOutcome:
    results: list[dict[str, Any]]  # every finished variant, in the sweep's order
    ran: list[str]  # run by this call
    reused: list[str]  # finished in an earlier run
    failures: dict[str, str]
    recommendation: Recommendation
    report: tuple[Path, Path, Path | None]
    seconds: float


@dataclass(frozen=True)
class Prepared:
    store: ResultStore
    caches: dict[str, Any]
    sources: dict[str, str]  # domain -> where its text came from
    resources: Resources
    model_path: str
    notes: tuple[str, ...]


def prepare(config: SweepConfig, out: Path, on_cache: Callable[[str, str], None] | None = None) -> Prepared:
    """Open the model and texts, check the out folder, and build or reuse the reference caches."""
    from bitsmith.eval.domains import resolve_domains
    from bitsmith.eval.refcache import domain_cache_file, model_fingerprint, open_or_build, text_fingerprint
    from bitsmith.eval.report import CAVEAT_DEQUANTIZED_GGUF
    from bitsmith.eval.suite import text_windows
    from bitsmith.models import open_source
    from bitsmith.runtime.load import load_model
    from bitsmith.runtime.options import RuntimeOptions

    source = open_source(config.model)
    tokenizer = source.tokenizer()
    domains = resolve_domains(list(config.domains), config.max_chars)
    key = config.key(model_fingerprint(source.path), {d.name: text_fingerprint(d.text) for d in domains})
    store = ResultStore.open(out, key)
    reference: list[Any] = []

    def load_reference() -> Any:
        if not reference:
            reference.append(load_model(config.model, options=RuntimeOptions.for_measurement()).model)
        return reference[0]

    caches = {}
    for d in domains:
        wins = text_windows(tokenizer, d.text, config.ctx, config.max_windows)  # [n, ctx]
        if wins.shape[0] == 0:
            raise SweepError(f"the text of domain {d.name} gives no window of {config.ctx} tokens; "
                             "give a longer text, a larger --max-chars or a smaller --ctx")
        cache, built = open_or_build(domain_cache_file(store.cache_dir, d.name), tokenizer, d.text, wins,
                                     source.path, load_reference, config.cache_topk)
        caches[d.name] = cache
        if on_cache:
            on_cache(d.name, "built" if built else "reused")
    reference.clear()
    n_params = sum(_numel(source.tensor_shape(n)) for n in source.tensor_names())
    vocab = int(getattr(source.config, "vocab_size", 0) or 32000)
    memory = config.memory_per_task or task_memory_bytes(n_params, vocab, config.ctx)
    resources = Resources(num_cpus=config.threads_per_task, memory=memory)
    notes = (CAVEAT_DEQUANTIZED_GGUF,) if source.kind == "gguf" else ()
    return Prepared(store, caches, {d.name: d.source for d in domains}, resources, str(source.path), notes)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def fit_variants(model_path: str, variants: tuple[Variant, ...], budget: Budget) -> dict[str, dict[str, Any]]:
    """{name: {"fits", "need_gb"}}: ``bitsmith fit``'s arithmetic for each variant's width and group
    (per-channel counted as one group per hidden-size row) against the budget."""
    from bitsmith.plan.catalog import shape_from_path
    from bitsmith.plan.fit import parse_size, plan
    from bitsmith.spec import QuantSpec

    memory = parse_size(budget.text)
    shape = shape_from_path(model_path)
    fits = {}
    for v in variants:
        spec = QuantSpec.parse(v.spec)
        level = plan(shape, memory, ctx=budget.ctx, levels=[spec.bits], group_size=spec.group_size or shape.hidden).levels[0]
        fits[v.name] = {"fits": level.fits, "need_gb": round(level.total_gb, 3)}
    return fits


def run_sweep(config: SweepConfig, out: Path, executor: Executor, max_kld: float, budget: Budget | None = None,
              events: Events | None = None) -> SweepOutcome:
    """Run every unfinished variant of ``config`` on ``executor`` and write the report into ``out``."""
    start = time.perf_counter()
    if max_kld <= 0:
        raise SweepError(f"--max-kld must be a positive number of nats (e.g. 0.1), got {max_kld:g}")
    if budget is not None:
        from bitsmith.plan.fit import parse_size

        parse_size(budget.text)  # a malformed --budget-memory is refused before any work
    emit = events or (lambda *a: None)
    prep = prepare(config, out, lambda name, how: emit("cache", name, 0, 0, how))
    names = [v.name for v in config.variants]
    stored = prep.store.done(names)
    todo = [v for v in config.variants if v.name not in stored]
    total = len(names)
    emit("start", "", len(stored), total, [v.name for v in todo])
    jobs = [VariantJob(config.model, v, prep.caches, str(prep.store.checkpoint_path(v.name)), config.keep_checkpoints,
                       config.calib_samples, config.calib_len, max(1, int(config.threads_per_task)),
                       config.method_options) for v in todo]
    results, failures, ran = dict(stored), {}, []
    for job, result, error in executor.run(run_variant, jobs, prep.resources):
        name = job.variant.name
        if error is None:
            prep.store.save(result)  # the commit point: only now does a re-run skip it
            results[name] = result
            ran.append(name)
            emit("done", name, len(results), total, result)
        else:
            failures[name] = " ".join(str(error).split())[:500] or type(error).__name__
            emit("failed", name, len(results), total, failures[name])
    ordered = [results[n] for n in names if n in results]
    fits = fit_variants(prep.model_path, config.variants, budget) if budget else {}
    rec = recommend(ordered, max_kld, fits, budget.text if budget else None)
    wall = round(time.perf_counter() - start, 1)
    settings = {"ctx": config.ctx, "windows": _windows_text(prep.caches), "kl": _kl_text(prep.caches),
                "executor": executor.name, "ran": len(ran), "reused": len(stored), "wall_seconds": wall,
                "fit_ctx": budget.ctx if budget else None, "domain_sources": prep.sources,
                "task_resources": {"num_cpus": prep.resources.num_cpus, "memory_bytes": prep.resources.memory}}
    report = SweepReport(config.model, ordered, rec, max_kld, budget.text if budget else None, fits, settings,
                         failures, prep.notes)
    files = write_sweep_report(prep.store.folder, report)
    return SweepOutcome(ordered, ran, sorted(stored), failures, rec, files, wall)


def _windows_text(caches: dict[str, Any]) -> str:
    return ", ".join(f"{name}: {int(c.windows.shape[0])}" for name, c in caches.items())


def _kl_text(caches: dict[str, Any]) -> str:
    k = min((c.k for c in caches.values()), default=0)
    return f"top-{k} reference cache (a lower bound of the exact KL)"
