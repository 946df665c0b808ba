"""Evaluation reports: ``report.md``, ``report.json`` and PNG plots in one folder.

Every ``bitsmith eval --report DIR`` or ``bitsmith compare --report DIR`` appends one
:class:`Run` to ``DIR/report.json``; the Markdown and the plots are then redrawn from all runs,
so the bits/weight-vs-KLD Pareto plot grows as variants are evaluated into the same folder.

Plots (matplotlib, Agg canvas, no pyplot global state):

- ``pareto.png``: bits per weight of the quantized linear layers vs mean KLD, one series per
  domain, the lower-left frontier drawn as a step line (latest result per variant and domain);
- ``domains.png``: mean KLD and top-1 agreement per domain, one bar per variant scored against the
  latest run's reference in any run of the folder (latest result per variant);
- ``layers.png``: per-layer SQNR (dB) of each quantized variant by block index and layer type,
  from the checkpoint's quantization report.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["VariantInfo", "Run", "ReportFiles", "write_report", "load_runs", "CAVEAT_DEQUANTIZED_GGUF"]

log = logging.getLogger(__name__)

REPORT_VERSION = 1
CAVEAT_DEQUANTIZED_GGUF = (
    "The real models here are dequantized GGUF files (SmolLM2 from Q4_1, Gemma-3 and "
    "Qwen2.5-Coder from Q4_K_M): their \"full precision\" weights sit on the grid of their "
    "original quantization, so a 4-bit asymmetric group-32 quantizer can reproduce many layers "
    "exactly; compare methods at other settings too (group 64/128, 3 and 2 bits, 8 bits)."
)
_COLUMNS = (("ppl", "ppl"), ("ppl_ratio", "ppl ratio"), ("kld_mean", "KLD mean"),
            ("kld_median", "KLD median"), ("kld_p99", "KLD p99"), ("top1", "top-1"),
            ("dprob_mean", "Δp(target)"))


@dataclass(frozen=True)
class VariantInfo:
    """One evaluated model: its short ``name`` in this run, where it lives and how it is stored."""

    name: str
    path: str
    spec: str | None = None  # e.g. "w4g128" for bitsmith checkpoints, "Q4_1" for GGUF
    bits_per_weight: float | None = None  # of the quantized linear layers
    layers: tuple[dict[str, Any], ...] = ()  # {"name", "sqnr_db", "bits_per_weight", "spec"}


@dataclass(frozen=True)
class Run:
    """One evaluation: per domain and variant, the metrics of ``domain_metrics``."""

    command: str  # "eval" | "compare"
    reference: str | None
    kl: str  # how KL was computed: "exact" or "top-64 cache (lower bound)"
    ctx: int
    domains: dict[str, dict[str, Any]]  # name -> {"source", "tokens"}
    variants: tuple[VariantInfo, ...]
    results: dict[str, dict[str, dict[str, Any]]]  # domain -> variant name -> metrics
    verdict: str | None = None
    notes: tuple[str, ...] = ()
    time: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S"))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Run:
        variants = tuple(VariantInfo(**{**v, "layers": tuple(v.get("layers", ()))}) for v in data["variants"])
        return cls(**{**data, "variants": variants, "notes": tuple(data.get("notes", ()))})


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    json: Path
    plots: tuple[Path, ...]


def load_runs(folder: Path) -> list[Run]:
    """The runs already recorded in ``folder/report.json`` (none when it does not exist)."""
    path = Path(folder) / "report.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [Run.from_dict(r) for r in data["runs"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a bitsmith report ({exc}); choose another --report folder or delete the file") from exc


def write_report(folder: str | Path, run: Run) -> ReportFiles:
    """Append ``run`` to ``folder/report.json`` and redraw report.md and the plots."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    runs = load_runs(folder) + [run]
    json_path = folder / "report.json"
    payload = {"version": REPORT_VERSION, "runs": [r.as_dict() for r in runs]}
    json_path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    plots = [p for p in (_plot_pareto(folder, runs), _plot_domains(folder, runs), _plot_layers(folder, run)) if p]
    md_path = folder / "report.md"
    md_path.write_text(_markdown(run, runs, plots) + harness_section(folder), encoding="utf-8")
    log.info("report written to %s (%d runs)", folder, len(runs))
    return ReportFiles(md_path, json_path, tuple(plots))


# ----------------------------------------------------------------------------- Markdown


def _count(value: Any) -> str:
    """A token count as people read it (``15,360``); '?' when unknown."""
    if value is None:
        return "?"
    return f"{int(value):,}" if isinstance(value, (int, float)) and float(value).is_integer() else str(value)


def _cell(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if key == "top1":
        return f"{100 * value:.1f}%"
    if key == "dprob_mean":
        return f"{value:+.4f}"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4g}"
    return str(value)


def _domain_table(run: Run, domain: str) -> list[str]:
    bits = {v.name: v.bits_per_weight for v in run.variants}
    head = ["variant", "bits/weight", *(label for _, label in _COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, metrics in run.results[domain].items():
        cells = [name, _cell(bits.get(name), "bits")] + [_cell(metrics.get(k), k) for k, _ in _COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _latest_points(runs: list[Run]) -> dict[tuple[str, str, str | None], tuple[float, float, str]]:
    """(variant path, domain, reference) -> (bits/weight, KLD mean, short name); later runs win."""
    points: dict[tuple[str, str, str | None], tuple[float, float, str]] = {}
    for run in runs:
        for v in run.variants:
            if v.bits_per_weight is None:
                continue
            for domain, per_variant in run.results.items():
                kld = per_variant.get(v.name, {}).get("kld_mean")
                if kld is not None:
                    points[(v.path, domain, run.reference)] = (v.bits_per_weight, kld, _short(v))
    return points


def _short(v: VariantInfo) -> str:
    return v.spec or Path(v.path).name or v.name


def _markdown(run: Run, runs: list[Run], plots: list[Path]) -> str:
    lines = [f"# bitsmith {run.command} report", "", f"{run.time}. Reference: `{run.reference or 'none'}`; "
             f"KL: {run.kl}; windows of {run.ctx} tokens.", ""]
    if run.verdict:
        lines += [f"**Verdict:** {run.verdict}", ""]
    lines += ["## Variants", "", "| name | path | spec | bits/weight |", "|---|---|---|---|"]
    lines += [f"| {v.name} | `{v.path}` | {v.spec or '-'} | {_cell(v.bits_per_weight, 'bits')} |" for v in run.variants]
    for domain in run.results:
        info = run.domains.get(domain, {})
        lines += ["", f"## {domain}", "", f"{info.get('source', '')}; {_count(info.get('tokens'))} scored tokens per model.", ""]
        lines += _domain_table(run, domain)
    lines += ["", "Columns: ppl ratio = model ppl / reference ppl; KLD = KL(reference || model) per "
              "position, natural log; top-1 = share of positions where both argmaxes agree; "
              "Δp(target) = mean change of the probability of the true next token."]
    points = _latest_points(runs)
    if points:
        lines += ["", "## All variants in this folder", "", "| variant | domain | reference | bits/weight | KLD mean |",
                  "|---|---|---|---|---|"]
        for (path, domain, ref), (bits, kld, _) in sorted(points.items(), key=lambda kv: (kv[0][1], kv[1][0])):
            lines.append(f"| `{path}` | {domain} | `{ref}` | {bits:.3f} | {kld:.4g} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    if run.notes:
        lines += ["", "## Caveats", ""] + [f"- {note}" for note in run.notes]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1) -> tuple[Any, Any]:
    """A figure on an Agg canvas (no display, no pyplot state) and its axes array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _plot_pareto(folder: Path, runs: list[Run]) -> Path | None:
    points = _latest_points(runs)
    if not points:
        return None
    fig, axes = _figure(7, 4.5)
    ax = axes[0][0]
    for domain in sorted({d for _, d, _ in points}):
        pts = sorted((b, k, s) for (_, d, _), (b, k, s) in points.items() if d == domain)
        line = ax.scatter([p[0] for p in pts], [max(p[1], 1e-6) for p in pts], label=domain, zorder=3)
        front, best = [], float("inf")
        for bits, kld, _ in pts:  # sorted by bits: a point is on the frontier if it beats all cheaper ones
            if kld < best:
                front.append((bits, max(kld, 1e-6)))
                best = kld
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color=line.get_facecolor()[0], alpha=0.6)
        for bits, kld, short in pts:
            ax.annotate(short, (bits, max(kld, 1e-6)), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (quantized linear layers)")
    ax.set_ylabel("mean KL(reference || model), nats")
    ax.set_title("Size vs quality (lower left is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path = folder / "pareto.png"
    fig.savefig(path, dpi=110)
    return path


def domain_rows(runs: list[Run]) -> tuple[list[str], dict[str, dict[str, dict[str, Any]]]]:
    """Domains and {label: {domain: metrics}} of every variant scored against the latest run's
    reference, latest run winning, ordered by bits per weight (high first); labels are specs, or
    paths where specs repeat."""
    latest = runs[-1]
    found: dict[str, tuple[VariantInfo, dict[str, dict[str, Any]]]] = {}
    for run in runs:
        if run.reference != latest.reference:
            continue
        for v in run.variants:
            for domain, per_variant in run.results.items():
                if "kld_mean" in per_variant.get(v.name, {}):
                    found.setdefault(v.path, (v, {}))[1][domain] = per_variant[v.name]
                    found[v.path] = (v, found[v.path][1])
    shorts = [_short(v) for v, _ in found.values()]
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for v, metrics in sorted(found.values(), key=lambda item: -(item[0].bits_per_weight or 0.0)):
        label = _short(v) if shorts.count(_short(v)) == 1 else v.path
        rows[label] = metrics
    domains = [d for d in latest.results if any(d in m for m in rows.values())]
    return domains, rows


def _plot_domains(folder: Path, runs: list[Run]) -> Path | None:
    domains, rows = domain_rows(runs)
    names = list(rows)
    if not domains or not names:
        return None
    fig, axes = _figure(max(6, 1.6 * len(domains) * max(1, len(names)) / 2 + 3), 4, ncols=2)
    width = 0.8 / len(names)
    for col, (key, label) in enumerate((("kld_mean", "mean KLD (nats)"), ("top1", "top-1 agreement"))):
        ax = axes[0][col]
        for i, name in enumerate(names):
            values = [rows[name].get(d, {}).get(key) or 0.0 for d in domains]
            ax.bar([j + i * width for j in range(len(domains))], values, width, label=name)
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(domains))], domains)
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][1].set_ylim(0, 1)
    axes[0][0].legend(fontsize=8)
    reference = runs[-1].reference
    fig.suptitle(f"Per-domain quality against {Path(reference).name if reference else 'no reference'}")
    path = folder / "domains.png"
    fig.savefig(path, dpi=110)
    return path


_LAYER = re.compile(r"\.(\d+)\.(?:.*\.)?([^.]+)$")


def _layer_points(layers: tuple[dict[str, Any], ...]) -> dict[str, list[tuple[int, float]]]:
    """Layer type -> [(block index, SQNR dB)]; layers outside the blocks (lm_head) go after the last block."""
    by_type: dict[str, list[tuple[int, float]]] = {}
    parsed = [(_LAYER.search(l["name"]), l) for l in layers if l.get("sqnr_db") is not None]
    last = max((int(m.group(1)) for m, _ in parsed if m), default=-1)
    for match, layer in parsed:
        index, kind = (int(match.group(1)), match.group(2)) if match else (last + 1, layer["name"].rsplit(".", 1)[-1])
        by_type.setdefault(kind, []).append((index, float(layer["sqnr_db"])))
    return by_type


def _plot_layers(folder: Path, run: Run) -> Path | None:
    variants = [v for v in run.variants if v.layers]
    if not variants:
        return None
    fig, axes = _figure(8, 3 * len(variants), nrows=len(variants))
    for row, v in enumerate(variants):
        ax = axes[row][0]
        for kind, pts in sorted(_layer_points(v.layers).items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=kind)
        ax.set_title(f"{v.name}: {_short(v)} - quantization error per layer (higher is better)", fontsize=9)
        ax.set_xlabel("block index")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("SQNR (dB)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=4)
    path = folder / "layers.png"
    fig.savefig(path, dpi=110)
    return path


# ----------------------------------------------------------------------------- lm-evaluation-harness

HARNESS_FILE = "lm_eval.json"  # beside report.json: {"version", "runs": [{"model", "time", "table", "results"}]}


def write_harness_results(folder: str | Path, model: str, table: str, results: dict[str, dict[str, float]]) -> Path:
    """Append one harness run (``bitsmith tasks --lm-eval --report DIR``) to ``DIR/lm_eval.json`` and
    add its tables to report.md, after bitsmith's own metrics when the folder has them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / HARNESS_FILE
    runs = json.loads(path.read_text(encoding="utf-8"))["runs"] if path.is_file() else []
    runs.append({"model": model, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "table": table, "results": results})
    path.write_text(json.dumps({"version": REPORT_VERSION, "runs": runs}, indent=1) + "\n", encoding="utf-8")
    md = folder / "report.md"
    text = md.read_text(encoding="utf-8") if md.is_file() else "# bitsmith report\n"
    md.write_text(text.split(HARNESS_HEADING)[0].rstrip("\n") + "\n" + harness_section(folder), encoding="utf-8")
    return path


HARNESS_HEADING = "\n## lm-evaluation-harness\n"


def harness_section(folder: Path) -> str:
    """report.md's harness section: every recorded run's own table (empty without runs)."""
    path = Path(folder) / HARNESS_FILE
    if not path.is_file():
        return ""
    lines = [HARNESS_HEADING]
    for run in json.loads(path.read_text(encoding="utf-8"))["runs"]:
        lines += [f"### `{run['model']}` ({run['time']})", "", run["table"].rstrip(), ""]
    return "\n".join(lines)
