"""bitsmith demo: the main job with no arguments.

Quantizes the embedded default model (smollm2-135m) at w8 and w4g128, evaluates both against the
original on the shipped public-domain text, prints one table and one short generation."""

from __future__ import annotations

import argparse

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_SPECS = ("w8", "w4g128")
PROMPT = "The best way to keep a small garden healthy is"
SPEED_PROMPT_TOKENS = 512  # the decode column follows a prompt this long, as bench/speed.py's does


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="quantize the default model at w8 and w4g128, evaluate, print a table")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model to demo (default {DEFAULT_MODEL})")
    p.add_argument("--specs", default=",".join(DEFAULT_SPECS), help="comma-separated specs (default w8,w4g128)")
    p.add_argument("--method", default="hqq", help="calibration-free method (default hqq, as bitsmith quantize)")
    p.add_argument("--out", default="bitsmith-demo", help="folder for the demo checkpoints (replaced each run)")
    p.add_argument("--windows", type=int, default=12, help="512-token windows of text to score (default 12)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per variant for the speed column")
    p.set_defaults(run=run)


def _quantize_all(args, specs, bar) -> dict:
    from pathlib import Path

    from bitsmith.pipeline.outputs import AUTO, with_output_spec
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize
    from bitsmith.spec import QuantSpec

    paths = {}
    for spec in specs:
        task = bar.add_task(f"quantize {spec}", total=None, rate="")
        done = lambda name, i, n, task=task: bar.update(task, completed=i, total=n, rate="")  # noqa: E731
        out = Path(args.out) / f"{Path(str(args.model)).stem}-{spec}"
        # the outputs as `bitsmith quantize` sets them without flags
        plan = with_output_spec(QuantizePlan(QuantSpec.parse(spec), args.method), args.model, AUTO)
        paths[spec] = quantize(args.model, out, plan, progress=done, overwrite=True)
    return paths


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from bitsmith.cli.common import console, dir_size_mb, fmt, out, progress_bar
    from bitsmith.cli.common import timed_progress
    from bitsmith.cli.scoring import load_measured
    from bitsmith.eval.suite import evaluate_variants, shipped_text, text_windows
    from bitsmith.infer.generate import generate

    specs = [s.strip() for s in args.specs.split(",") if s.strip()]
    with progress_bar(transient=False) as bar:
        paths = _quantize_all(args, specs, bar)
    reference = load_measured(args.model)
    variants = {spec: load_measured(path) for spec, path in paths.items()}
    wins = text_windows(reference.tokenizer, shipped_text(), 512, args.windows)
    with progress_bar(transient=False) as bar:
        task = bar.add_task(f"evaluate {len(specs)} variants + reference", total=wins.numel(), rate="")
        results = evaluate_variants(reference.model, {s: v.model for s, v in variants.items()}, wins, timed_progress(bar, task))
    speeds, texts = {}, {}
    context = getattr(reference.model.config, "max_position_embeddings", None) or SPEED_PROMPT_TOKENS * 2
    n_prompt = max(1, min(SPEED_PROMPT_TOKENS, context // 2))  # a tiny model's short context still fits
    long_prompt = reference.tokenizer.decode(wins.reshape(-1)[:n_prompt].tolist())
    for name, loaded in [("reference", reference), *variants.items()]:
        # a short warm-up first: the first call builds the fused decode plan and touches every page,
        # which a user's second and later requests never pay; the column is the steady decode rate
        # after a 512-token prompt, as bench/speed.py measures it (a short prompt reads less KV cache)
        texts[name] = generate(loaded.model, loaded.tokenizer, PROMPT, max_new_tokens=args.new_tokens, stop_at_eos=False).text
        g = generate(loaded.model, loaded.tokenizer, long_prompt, max_new_tokens=args.new_tokens, stop_at_eos=False)
        speeds[name] = g.decode_tok_s

    params = sum(p.numel() for p in reference.model.parameters())
    table = Table(title=f"{args.model}: {wins.numel():,} tokens of Pride and Prejudice, ctx 512 ({args.method})")
    for col in ("variant", "size MB", "bits/weight", "ppl", "KLD", "top-1", "decode tok/s\n(512 ctx)"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    table.add_row("fp32 (reference)", f"{params * 4 / 1e6:.1f}", "32", fmt(results["reference"].ppl), "0", "1", f"{speeds['reference']:.1f}")
    for spec, loaded in variants.items():
        r = results[spec]
        table.add_row(spec, f"{dir_size_mb(paths[spec]):.1f}", f"{loaded.info.report['bits_per_weight']:.3f}",
                      fmt(r.ppl), fmt(r.kld_mean), f"{r.top1:.3f}", f"{speeds[spec]:.1f}")
    out.print(table)
    console.print("[dim]bits/weight: every quantized tensor, the w8 embedding and head (bitsmith quantize's default) included. The reference is the "
                  "package's GGUF dequantized to fp32, so its weights already sit on a 4-bit grid.[/]")
    last = specs[-1]
    out.print(f"\n[bold]{last}[/] continues {PROMPT!r}:\n{texts[last]}")
    out.print(f"\ncheckpoints: {', '.join(str(p) for p in paths.values())}")
    return 0
