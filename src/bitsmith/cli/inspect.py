"""bitsmith inspect FILE_OR_DIR"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show what quantization a checkpoint, GGUF file or model folder carries")
    p.add_argument("path", help="bitsmith checkpoint, .gguf file, safetensors file or model folder")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--all", action="store_true", help="list every tensor (default: summarise repeated block layers)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json
    import re
    from collections import OrderedDict

    from rich.table import Table

    from bitsmith.cli.common import dir_size_mb, out
    from bitsmith.io.inspect import inspect_path

    report = inspect_path(args.path)
    if args.json:
        out.print_json(json.dumps(report.as_dict()))
        return 0
    table = Table(title=f"{report.path}: {report.format}, {report.summary}")
    for col in ("tensor", "type", "shape", "bits/weight", "count"):
        table.add_column(col, justify="right" if col in ("bits/weight", "count") else "left")
    rows: "OrderedDict[tuple, list]" = OrderedDict()
    for t in report.tensors:
        # Fold block indices (layers.7 / blk.7) so a 30-layer model prints one row per layer kind.
        name = t.name if args.all else re.sub(r"(?<=[.])\d+(?=[.])", "N", t.name)
        key = (name, t.kind, t.shape)
        rows.setdefault(key, [t, 0])[1] += 1
    for (name, kind, shape), (t, count) in rows.items():
        table.add_row(name, kind, "x".join(map(str, shape)), f"{t.bits_per_weight:.3f}", str(count))
    out.print(table)
    out.print(f"all tensors: {report.total_bits_per_weight():.3f} bits/weight; "
              f"quantized tensors: {report.total_bits_per_weight(True):.3f} bits/weight; size {dir_size_mb(report.path):.1f} MB")
    for w in report.warnings:
        out.print(f"[yellow]warning:[/] {w}")
    return 0
