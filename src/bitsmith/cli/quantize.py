"""bitsmith quantize MODEL --spec w4g128 --method rtn --out DIR"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model into a packed bitsmith checkpoint")
    p.add_argument("model", help="Hugging Face folder, .gguf file, or alias (smollm2-135m, gemma3-270m, qwen2.5-coder-1.5b)")
    p.add_argument("--spec", default="w4g128", help="quantization spec: w8, w4g128, w3g64s, ... (default w4g128)")
    p.add_argument("--method", default="rtn", help="quantization method (default rtn)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out once the new checkpoint is complete")
    p.add_argument("--no-clip-search", action="store_true", help="RTN: plain min/max ranges, no clipping search")
    p.add_argument("--quantize-head", action="store_true", help="also quantize lm_head (default: keep it and the embeddings unquantized)")
    p.add_argument("--quantize-embeddings", action="store_true", help="also quantize the input embedding table")
    p.add_argument("--unquantized-dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="storage for tensors left unquantized")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bitsmith.cli.common import console, dir_size_mb, out, progress_bar
    from bitsmith.pipeline.quantize import QuantizeConfig, quantize_model
    from bitsmith.spec import QuantSpec

    config = QuantizeConfig(
        spec=QuantSpec.parse(args.spec), method=args.method, options={"clip_search": not args.no_clip_search},
        quantize_head=args.quantize_head, quantize_embeddings=args.quantize_embeddings, unquantized_dtype=args.unquantized_dtype,
    )
    with progress_bar() as bar:
        task = bar.add_task(f"quantize {args.spec}", total=None, rate="")
        done = lambda name, i, n: bar.update(task, completed=i, total=n, rate=name)  # noqa: E731
        path = quantize_model(args.model, Path(args.out), config, overwrite=args.overwrite, progress=done)
    from bitsmith.io.checkpoint import read_info

    info = read_info(path)
    report = info.report if info else {}
    console.print(f"quantized {report.get('quantized_weights', 0):,} weights at {report.get('bits_per_weight', 0):.3f} bits/weight in {report.get('seconds', 0)} s")
    out.print(f"{path}  ({dir_size_mb(path):.1f} MB)")
    return 0
