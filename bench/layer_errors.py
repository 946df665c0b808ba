"""Per-layer output error of checkpoints quantized from the same model, side by side by layer kind.

Every calibrated quantize writes, for each decoder matrix, ``output_error`` =
``||X W^T - X Wq^T||^2 / ||X W^T||^2`` on its own calibration inputs (``bitsmith.json``'s report).
Two checkpoints of one model with one calibration text (say vq w3g256vq and GPTQ w3g256s) can then be
compared matrix by matrix without loading either: this prints, per kind (q_proj, ..., down_proj), the
geometric mean of each checkpoint's errors over the blocks and its ratio to the first checkpoint's,
and the share of matrices where each beats the first. The inputs X are each run's own (the blocks
below were quantized by that run), so small differences are not meaningful; factors are.

    python bench/layer_errors.py vq=CKPT_A gptq=CKPT_B

Nothing asserted; reads only the checkpoints' report files.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

REPORT = "bitsmith.json"
BLOCK = re.compile(r"\.layers\.(\d+)\.(?:[a-z_]+\.)?([a-z_]+)$")  # ...layers.3.mlp.down_proj -> (3, down_proj)


def block_errors(report: dict) -> dict[str, dict[int, float]]:
    """kind -> block -> output_error, for the decoder matrices of a checkpoint's report."""
    out: dict[str, dict[int, float]] = {}
    for layer in report["report"]["layers"]:
        match = BLOCK.search(layer["name"])
        if match and "output_error" in layer:
            out.setdefault(match.group(2), {})[int(match.group(1))] = float(layer["output_error"])
    return out


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(max(v, 1e-30)) for v in values) / len(values))


def compare(errors: dict[str, dict[str, dict[int, float]]]) -> list[str]:
    """Markdown rows: per kind, each checkpoint's geometric-mean error, its ratio to the first and the
    share of blocks where it is lower than the first's (only blocks every checkpoint has)."""
    labels = list(errors)
    first = errors[labels[0]]
    head = " | ".join(f"{lab} geomean | ratio | lower in" for lab in labels[1:])
    rows = [f"| kind | blocks | {labels[0]} geomean | {head} |", "|---" * (3 + 3 * (len(labels) - 1)) + "|"]
    for kind in first:
        blocks = sorted(set.intersection(*(set(errors[lab].get(kind, {})) for lab in labels)))
        if not blocks:
            continue
        base = [first[kind][b] for b in blocks]
        cells = []
        for lab in labels[1:]:
            mine = [errors[lab][kind][b] for b in blocks]
            lower = sum(m < b for m, b in zip(mine, base))
            cells.append(f"{geomean(mine):.3e} | {geomean(mine) / geomean(base):.3f} | {lower}/{len(blocks)}")
        rows.append(f"| {kind} | {len(blocks)} | {geomean(base):.3e} | " + " | ".join(cells) + " |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", metavar="LABEL=CKPT", help="two or more; the first is the baseline")
    args = ap.parse_args()
    errors = {}
    for item in args.checkpoints:
        label, sep, path = item.partition("=")
        report = Path(path) / REPORT
        if not sep or not label or not report.is_file():
            ap.error(f"{item!r}: give LABEL=CKPT, a checkpoint folder holding {REPORT}")
        errors[label] = block_errors(json.loads(report.read_text()))
    if len(errors) < 2:
        ap.error("give at least two checkpoints")
    print("\n".join(compare(errors)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
