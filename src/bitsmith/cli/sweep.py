"""bitsmith sweep MODEL --specs w8,w4g128,... --methods rtn,hqq,gptq [--budget-memory 24GB] [--max-kld X]
[--text [NAME=]PATH ...] [--workers N | --ray-address ADDR] [--out DIR]

Which quantization to use: every method at every spec quantized and scored per domain against one
cached reference, as tasks on Ray (a local Ray by default, a cluster with --ray-address, this
process alone with --workers 0); finished variants are stored and skipped on a re-run; the report
gives size vs KLD per domain, the Pareto frontier and a recommendation."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bitsmith.cli.textargs import positive_int


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="quantize and score many variants (on Ray), then recommend one")
    p.add_argument("model", help="Hugging Face folder, .gguf file or alias")
    p.add_argument("--specs", type=_csv, default=["w8", "w4g128", "w3g128"], help="comma-separated specs (default w8,w4g128,w3g128)")
    p.add_argument("--methods", type=_csv, default=["rtn", "hqq"], help="comma-separated methods (default rtn,hqq)")
    p.add_argument("--text", action="append", metavar="[NAME=]PATH", help="an evaluation domain, repeatable (default: prose and code)")
    p.add_argument("--max-kld", type=_positive_float, default=0.1, help="the largest mean KLD a recommended variant may have on any domain (default 0.1)")
    p.add_argument("--budget-memory", metavar="SIZE", help="memory the recommended variant must fit, e.g. 24GB (bitsmith fit's arithmetic)")
    p.add_argument("--fit-ctx", type=positive_int, default=8192, help="context the memory budget must hold (default 8192)")
    p.add_argument("--out", default="bitsmith-sweep", help="results folder; a re-run skips the variants finished there (default bitsmith-sweep)")
    p.add_argument("--workers", type=int, default=2, help="local Ray worker CPUs (default 2); 0 runs every task in this process without Ray")
    p.add_argument("--ray-address", metavar="ADDR", help="run on an existing Ray cluster (host:port or auto) instead of a local Ray")
    p.add_argument("--threads-per-task", type=positive_int, default=1, help="CPUs each task declares and uses (default 1)")
    p.add_argument("--memory-per-task", metavar="SIZE", help="memory each task declares (default: estimated from the model size)")
    p.add_argument("--ctx", type=positive_int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--max-windows", type=positive_int, default=None, help="score only the first N windows of each domain")
    p.add_argument("--max-chars", type=positive_int, default=60_000, help="use the first N characters of each text")
    p.add_argument("--calib-samples", type=positive_int, default=128, help="calibration sequences for calibrated methods (default 128)")
    p.add_argument("--calib-len", type=positive_int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--no-clip-search", action="store_true",
                   help="plain min/max ranges for rtn and gptq instead of their clipping search (~30x faster rtn, a little worse)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each variant's checkpoint under OUT/checkpoints")
    p.set_defaults(run=run)


def _config(args: argparse.Namespace) -> Any:
    from bitsmith.plan.fit import parse_size
    from bitsmith.sweep.config import SweepConfig, expand_variants

    variants = expand_variants(args.specs, args.methods)
    return SweepConfig(
        model=args.model, variants=variants, domains=tuple(args.text or ("prose", "code")), ctx=args.ctx,
        max_windows=args.max_windows, max_chars=args.max_chars, calib_samples=args.calib_samples,
        calib_len=args.calib_len, keep_checkpoints=args.keep_checkpoints, workers=args.workers,
        threads_per_task=args.threads_per_task,
        method_options=(("clip_search", False),) if args.no_clip_search else (),
        memory_per_task=parse_size(args.memory_per_task) if args.memory_per_task else None,
    )


def _events(bar: Any) -> Any:
    from bitsmith.cli.common import console

    task: list[Any] = []

    def on(event: str, name: str, done: int, total: int, payload: Any) -> None:
        if event == "cache":
            console.print(f"reference cache for {name}: {payload}", markup=False)
        elif event == "start":
            console.print(f"{total} variants: {done} finished earlier, {len(payload)} to run: {', '.join(payload) or '-'}", markup=False)
            task.append(bar.add_task("sweep", total=total, completed=done, rate=""))
        elif event == "done":
            kld = ", ".join(f"{d} {m['kld_mean']:.4g}" for d, m in payload["domains"].items())
            console.print(f"[{done}/{total}] {name}: {payload['size_bytes'] / 1e6:,.1f} MB, KLD {kld} "
                          f"(quantize {payload['quantize_seconds']} s, eval {payload['eval_seconds']} s, {payload['node']})", markup=False)
            bar.update(task[0], completed=done, rate=name)
        elif event == "failed":
            console.print(f"failed: {name}: {payload}", markup=False)

    return on


def run(args: argparse.Namespace) -> int:
    from bitsmith.cli.common import out, progress_bar
    from bitsmith.sweep.driver import Budget, run_sweep
    from bitsmith.sweep.executor import make_executor

    config = _config(args)  # every spec and method checked before Ray starts
    budget = Budget(args.budget_memory, args.fit_ctx) if args.budget_memory else None
    executor = make_executor(args.workers, args.ray_address)
    try:
        with progress_bar(transient=False) as bar:
            outcome = run_sweep(config, Path(args.out), executor, args.max_kld, budget, _events(bar))
    finally:
        executor.close()
    out.print(f"{len(outcome.results)}/{len(config.variants)} variants done ({len(outcome.ran)} now, "
              f"{len(outcome.reused)} from earlier runs) in {outcome.seconds} s on {executor.name}", markup=False)
    out.print(f"recommendation: {outcome.recommendation.reason}", markup=False, soft_wrap=True)
    out.print(f"report: {outcome.report[0]}", markup=False)
    if outcome.failures:
        out.print(f"{len(outcome.failures)} variant(s) failed: {', '.join(sorted(outcome.failures))}; "
                  "run the sweep again to retry them", markup=False)
        return 1
    return 0
