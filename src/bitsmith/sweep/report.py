"""The sweep's report: ``report.md`` (per domain, size vs KLD with the Pareto frontier marked, and
the recommendation), ``report.json`` (everything the Markdown says, for scripts) and ``pareto.png``
(size vs mean KLD, one panel per domain, the frontier as a step line). Written in the style of
:mod:`bitsmith.eval.report`, through temporary files renamed into place."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitsmith.sweep.frontier import Recommendation, frontier_per_domain, size_of
from bitsmith.sweep.store import write_json_atomic

__all__ = ["SweepReport", "write_sweep_report", "markdown"]


@dataclass(frozen=True)
class SweepReport:
    """What the report shows; ``results`` are the frontier module's result dicts."""

    model: str
    results: list[dict[str, Any]]
    recommendation: Recommendation
    max_kld: float
    memory: str | None  # e.g. "24GB", as given
    fits: dict[str, dict[str, Any]]  # name -> {"fits", "need_gb"}
    settings: dict[str, Any]  # ctx, windows, kl, executor, wall seconds...
    failures: dict[str, str]
    notes: tuple[str, ...] = ()


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.{digits}g}"
    return str(value)


def _domain_table(report: SweepReport, domain: str, front: list[str]) -> list[str]:
    rows = sorted((r for r in report.results if domain in r["domains"]), key=lambda r: (size_of(r), r["domains"][domain]["kld_mean"]))
    lines = ["| variant | size MB | bits/weight | KLD mean | KLD p99 | top-1 | ppl ratio | frontier | fits |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["domains"][domain]
        fit = report.fits.get(r["name"])
        fits = "-" if fit is None else ("yes" if fit["fits"] else "no") + f" ({fit['need_gb']:.2f} GB)"
        lines.append(f"| {r['name']} | {r['size_bytes'] / 1e6:,.1f} | {_cell(r.get('bits_per_weight'))} | "
                     f"{_cell(m.get('kld_mean'))} | {_cell(m.get('kld_p99'))} | {100 * m['top1']:.1f}% | "
                     f"{_cell(m.get('ppl_ratio'))} | {'**yes**' if r['name'] in front else ''} | {fits} |")
    return lines


def markdown(report: SweepReport, plot: Path | None) -> str:
    s = report.settings
    lines = [f"# bitsmith sweep: {report.model}", "",
             f"{len(report.results)} variants; windows of {s.get('ctx')} tokens, {s.get('windows')}; KL: {s.get('kl')}; "
             f"run on {s.get('executor')}, {s.get('ran')} variant(s) run now, {s.get('reused')} reused from earlier runs, "
             f"wall {s.get('wall_seconds')} s.", "",
             f"**Recommendation** (mean KLD <= {report.max_kld:g} on every domain"
             f"{', fits ' + report.memory + ' at ctx ' + str(s.get('fit_ctx')) if report.memory else ''}): "
             f"{report.recommendation.reason}", ""]
    fronts = frontier_per_domain(report.results)
    for domain, front in fronts.items():
        lines += [f"## {domain}", "", f"{s.get('domain_sources', {}).get(domain, '')}", "",
                  f"Frontier (smallest first): {' < '.join(front)}.", ""]
        lines += _domain_table(report, domain, front) + [""]
    lines += ["Size: the whole checkpoint on disk (embeddings and head included); bits/weight: the quantized "
              "linear layers (docs/PROTOCOL.md section 4). KLD: KL(reference || variant) per position, natural "
              "log. A variant is on the frontier when no smaller variant has a lower mean KLD on that domain. "
              "Fits: bitsmith fit's arithmetic (weights, KV cache and runtime overhead) for that width against "
              "the memory given."]
    timing = sorted(report.results, key=lambda r: r["name"])
    lines += ["", "## Tasks", "", "| variant | quantize s | eval s | node | checkpoint reused |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r.get('quantize_seconds')} | {r.get('eval_seconds')} | {r.get('node')} | "
              f"{'yes' if r.get('reused_checkpoint') else ''} |" for r in timing]
    if report.failures:
        lines += ["", "## Failed", ""] + [f"- {name}: {err}" for name, err in sorted(report.failures.items())]
    if plot is not None:
        lines += ["", f"![size vs KLD]({plot.name})"]
    if report.notes:
        lines += ["", "## Caveats", ""] + [f"- {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def _plot(folder: Path, report: SweepReport) -> Path | None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fronts = frontier_per_domain(report.results)
    if not fronts:
        return None
    fig = Figure(figsize=(5.5 * len(fronts), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(fronts), squeeze=False)[0]
    for ax, (domain, front) in zip(axes, fronts.items()):
        rows = [r for r in report.results if domain in r["domains"]]
        for method in sorted({r["method"] for r in rows}):
            pts = [(r["size_bytes"] / 1e6, max(r["domains"][domain]["kld_mean"], 1e-6), r) for r in rows if r["method"] == method]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=method, zorder=3)
            for x, y, r in pts:
                ax.annotate(r["spec"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        by_name = {r["name"]: r for r in rows}
        fx = [by_name[n]["size_bytes"] / 1e6 for n in front]
        fy = [max(by_name[n]["domains"][domain]["kld_mean"], 1e-6) for n in front]
        ax.step(fx, fy, where="post", color="black", alpha=0.5, label="frontier")
        if report.max_kld > 0:
            ax.axhline(report.max_kld, color="red", linestyle="--", alpha=0.6, label=f"max KLD {report.max_kld:g}")
        ax.set_yscale("log")
        ax.set_xlabel("checkpoint size (MB)")
        ax.set_ylabel("mean KL(reference || variant), nats")
        ax.set_title(domain)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report.model}: size vs quality (lower left is better)")
    path = folder / "pareto.png"
    tmp = folder / f".pareto.{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path


def write_sweep_report(folder: Path, report: SweepReport) -> tuple[Path, Path, Path | None]:
    """(report.md, report.json, pareto.png or None) in ``folder``."""
    folder = Path(folder)
    plot = _plot(folder, report)
    payload = {"model": report.model, "max_kld": report.max_kld, "memory": report.memory,
               "recommendation": {"name": report.recommendation.name, "reason": report.recommendation.reason},
               "frontier": frontier_per_domain(report.results), "fits": report.fits, "settings": report.settings,
               "failures": report.failures, "results": report.results, "notes": list(report.notes)}
    json_path = folder / "report.json"
    write_json_atomic(json_path, payload)
    md_path = folder / "report.md"
    tmp = folder / f".report.md.{os.getpid()}.tmp"
    tmp.write_text(markdown(report, plot), encoding="utf-8")
    os.replace(tmp, md_path)
    return md_path, json_path, plot
