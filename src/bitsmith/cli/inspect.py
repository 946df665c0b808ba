"""bitsmith inspect FILE_OR_DIR"""

from __future__ import annotations

import argparse
import re


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show what quantization a checkpoint, GGUF file or model folder carries "
                                       "(bitsmith, GGUF, GPTQ, AWQ, compressed-tensors, bitsandbytes, plain safetensors)")
    p.add_argument("path", help="bitsmith checkpoint, .gguf file, safetensors file or model folder")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--all", action="store_true", help="list every tensor (default: summarise repeated block layers)")
    p.set_defaults(run=run)


def _fold(name: str) -> str:
    """layers.7 / blk.7 -> layers.N, so a 30-layer model prints one row per layer kind."""
    return re.sub(r"(?<=[.])\d+(?=[.])", "N", name)


def run(args: argparse.Namespace) -> int:
    import json

    from rich.table import Table

    from bitsmith.cli.common import out
    from bitsmith.io.inspect import inspect_path

    report = inspect_path(args.path)
    if args.json:
        out.print_json(json.dumps(report.as_dict()))
        return 0
    table = Table(title=f"{report.path}: {report.format}, {report.summary}")
    for col in ("tensor", "type", "shape", "bits/weight", "count"):
        table.add_column(col, justify="right" if col in ("bits/weight", "count") else "left", overflow="fold")
    rows: dict[tuple, list] = {}
    for t in report.tensors:
        kind = f"{t.kind} ({', '.join(t.notes)})" if t.notes else t.kind
        key = (t.name if args.all else _fold(t.name), kind, t.shape, round(t.bits_per_weight, 3))
        rows.setdefault(key, [0])[0] += 1
    first = {}  # folded name -> first position, so a layer kind's variants (Q4_K / Q6_K) sit together
    for i, key in enumerate(rows):
        first.setdefault(key[0], i)
    for (name, kind, shape, bpw), (count,) in sorted(rows.items(), key=lambda kv: first[kv[0][0]]):
        table.add_row(name, kind, "x".join(map(str, shape)), f"{bpw:.3f}", str(count))
    out.print(table)
    for key, value in report.details.items():
        out.print(f"  {key}: {value}", highlight=False)
    total = sum(t.numel for t in report.tensors)
    quantized = sum(t.numel for t in report.tensors if t.quantized)
    out.print(f"all tensors:       {report.total_bits_per_weight():.3f} bits/weight over {total:,} weights", highlight=False)
    out.print(f"quantized tensors: {report.total_bits_per_weight(True):.3f} bits/weight over {quantized:,} weights "
              f"({quantized / max(total, 1):.1%})", highlight=False)
    out.print(f"file size:         {report.size_bytes / 1e6:.1f} MB", highlight=False)
    for w in report.warnings:
        out.print(f"[yellow]warning:[/] {w}", highlight=False)
    return 0
