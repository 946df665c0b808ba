"""``bitsmith fit MODEL --memory 24GB``: what fits on this GPU, at which bits, and how fast.

Examples::

    bitsmith fit llama-3-70b --memory 48GB            # 4-bit fits a 48 GB workstation card
    bitsmith fit llama-3-70b --memory 24GB --ctx 8192  # needs layers offloaded to CPU RAM
    bitsmith fit ./my-model/ --memory 24GiB --kv-bits 8 --json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bitsmith.plan.catalog import ArchShape, get_shape, shape_from_gguf, shape_from_path
from bitsmith.plan.fit import (
    DEFAULT_LEVELS,
    GPU_BANDWIDTH_GB_S,
    KV_BITS_CHOICES,
    OUTPUTS,
    PCIE_GB_S,
    PLANNABLE_BITS,
    RAM_GB_S,
    FitPlan,
    Runtime,
    parse_size,
    plan,
)

__all__ = ["add_parser", "run", "resolve_shape"]


def add_parser(subparsers: Any) -> None:
    """Register the ``fit`` subcommand on an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "fit",
        help="plan GPU memory: which bit widths fit, what must be offloaded, estimated speed",
        description="Plan GPU memory for a model at 16..2 bits: weights, KV cache, overhead, "
        "layers to offload and estimated decoding speed. GB = 10^9 bytes.",
    )
    parser.add_argument("model", help="catalog name (e.g. llama-3-70b), a bitsmith model alias "
                        "(e.g. gemma3-270m, read from its local GGUF file), a model folder with "
                        "config.json, a config.json, or a .gguf file")
    parser.add_argument("--memory", required=True, help="GPU memory, e.g. 24GB, 24GiB, 24000MB")
    parser.add_argument("--ctx", type=int, default=8192, help="context length per sequence (8192)")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (1)")
    parser.add_argument("--kv-bits", type=int, choices=KV_BITS_CHOICES, default=16,
                        help="KV cache precision (16)")
    parser.add_argument("--bits", type=int, default=None,
                        help="explain this bit width, 2 to 8 or 16 (default: the best one that fits, else 4)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="quantization group size for every level (default: 128, 64 at 2-bit)")
    parser.add_argument("--outputs", choices=OUTPUTS, default="auto",
                        help="how the embedding table and lm_head are counted: auto (default: as bitsmith "
                        "quantize stores them, a w6g128 head and an untied w4g128 table under 2-4 bits, w8 above), "
                        "16 (runtimes that keep them in 16 bit, e.g. GPTQ/AWQ exports on vLLM) or level "
                        "(at the level's bits)")
    parser.add_argument("--quantize-embeddings", dest="outputs", action="store_const", const="level",
                        help="the same as --outputs level")
    parser.add_argument("--gpu-bandwidth", type=float, default=GPU_BANDWIDTH_GB_S,
                        help=f"GPU memory bandwidth in GB/s ({GPU_BANDWIDTH_GB_S:g})")
    parser.add_argument("--pcie", type=float, default=PCIE_GB_S,
                        help=f"effective CPU->GPU bandwidth in GB/s ({PCIE_GB_S:g}, PCIe 4.0 x16)")
    parser.add_argument("--ram-bandwidth", type=float, default=RAM_GB_S,
                        help=f"CPU memory bandwidth in GB/s, for offloaded layers run on the CPU "
                        f"({RAM_GB_S:g}, dual-channel DDR5)")
    parser.add_argument("--flash-attn", action="store_true",
                        help="the runtime uses flash attention (no score matrix in activations)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(run=run)  # the dispatcher (bitsmith.cli.main) calls args.run(args)


def resolve_shape(model: str) -> ArchShape:
    """A local folder / config.json / .gguf file, else a bitsmith alias whose GGUF file is installed
    (its real metadata), else a catalog name."""
    from bitsmith.models.aliases import ALIASES, resolve_alias
    from bitsmith.models.errors import ModelSourceError

    path = Path(model).expanduser()
    if path.exists():
        return shape_from_path(path)
    if model.strip().lower() in ALIASES:
        try:
            return shape_from_gguf(resolve_alias(model), name=model.strip().lower())
        except ModelSourceError:  # alias package not installed: the catalog may still know the shape
            pass
    try:
        return get_shape(model)
    except KeyError:
        if path.suffix in (".gguf", ".json") or model.startswith((".", "/", "~")):
            raise FileNotFoundError(f"{model} does not exist; check the path") from None
        raise


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _print_table(result: FitPlan) -> None:
    from rich import box
    from rich.console import Console  # the CLI is the only place that prints; keep import local
    from rich.table import Table

    shape = result.shape
    console = Console()
    title = (f"{shape.name} ({shape.n_params / 1e9:.2f}e9 params) on {result.memory_gb:.2f} GB, "
             f"ctx {result.ctx}, batch {result.batch}, KV {result.kv_bits}-bit")
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 1))
    # two-line headers keep the table inside an 80-column terminal
    for column in ("bits", "bits/\nweight", "weights\nGB", "KV\nGB", "overhead\nGB", "total\nGB",
                   "fits", "offload\nlayers", "tok/s\nPCIe", "tok/s\nCPU"):
        table.add_column(column, justify="left" if column == "fits" else "right", no_wrap=True)
    for lvl in result.levels:
        offload = "too big" if lvl.offload_layers is None else f"{lvl.offload_layers}/{shape.layers}"
        table.add_row(
            str(lvl.bits), f"{lvl.bits_per_weight:.2f}", _fmt(lvl.weights_gb), _fmt(lvl.kv_gb),
            _fmt(lvl.overhead_gb), _fmt(lvl.total_gb), "[green]yes[/]" if lvl.fits else "[red]no[/]",
            offload, _fmt(lvl.tok_s, 1 if lvl.fits else 2),
            "" if lvl.fits else _fmt(lvl.tok_s_cpu_offload, 2),
        )
    console.print(table)


def _check_flags(args: argparse.Namespace) -> None:
    """--bits and --group-size in the user's terms (plan() says "levels" and "group size")."""
    if args.bits is not None and args.bits not in PLANNABLE_BITS:
        raise ValueError(f"--bits {args.bits} is not a width bitsmith quantizes to; use 2 to 8, or 16 (unquantized)")
    if args.group_size is not None and args.group_size < 1:
        raise ValueError(f"--group-size {args.group_size} is not a group size; use a positive number of weights "
                         "per group (e.g. 32, 64, 128), or leave it out for the default (128, 64 at 2-bit)")


def run(args: argparse.Namespace) -> int:
    """Execute ``bitsmith fit``; returns the process exit code (0 ok, 1 bad input, as other commands)."""
    try:
        shape = resolve_shape(args.model)
        memory = parse_size(args.memory) if isinstance(args.memory, str) else int(args.memory)
        runtime = Runtime(gpu_bandwidth_gb_s=args.gpu_bandwidth, pcie_gb_s=args.pcie,
                          ram_gb_s=getattr(args, "ram_bandwidth", RAM_GB_S),
                          materialize_scores=not args.flash_attn)
        _check_flags(args)
        levels = DEFAULT_LEVELS if args.bits is None else tuple(sorted({*DEFAULT_LEVELS, args.bits}))
        result = plan(shape, memory, ctx=args.ctx, batch=args.batch, kv_bits=args.kv_bits,
                      levels=levels, group_size=args.group_size,
                      outputs=args.outputs, runtime=runtime)
        lines = result.explain(args.bits)
    except (KeyError, ValueError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"error: {message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    _print_table(result)
    chosen = result.level(args.bits) if args.bits is not None else result.recommended()
    print(f"\nArithmetic for {chosen.bits}-bit:")
    for line in lines:
        print(f"  {line}")
    print(f"\nAssumptions: GB = 10^9 bytes; {runtime.cuda_context_gb:g} GB CUDA context; activations "
          f"of a {runtime.prefill_chunk}-token prefill chunk; decoding reads all weights (but an untied "
          f"input embedding) + the full KV cache once per step at {runtime.gpu_bandwidth_gb_s:g} GB/s; "
          f"offloaded layers stream over PCIe at {runtime.pcie_gb_s:g} GB/s each step ('tok/s PCIe'), "
          f"or run on the CPU reading RAM at {runtime.ram_gb_s:g} GB/s ('tok/s CPU'). Change them "
          "with --gpu-bandwidth, --pcie and --ram-bandwidth.")
    return 0
