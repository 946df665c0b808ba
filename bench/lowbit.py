"""Two and three bits (issue 19): each method with and without randomized Hadamard rotations, and
what recovery by distillation adds, against the unquantized model (docs/PROTOCOL.md windows).

    python bench/lowbit.py --model smollm2-135m --max-windows 4 \\
        --variants rtn:w2g64,rtn+rotate:w2g64,gptq:w2g64,gptq+rotate:w2g64 \\
        [--distill gptq+rotate:w2g64 --distill-steps 40]

A variant is ``METHOD[+rotate]:SPEC`` (``vq+rotate:w2g64vq`` for the vector codebook). Each is quantized (timed; ``--reuse`` keeps a checkpoint
already in the work folder), ``--distill`` variants are then tuned by ``bitsmith distill`` on the
calibration text (State of the Union, never the evaluation prose) and added as ``...+distill``
rows, and every variant is scored against the reference in one pass over the evaluation windows.
Prints a Markdown table; --json writes the same numbers. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import report_block_bpw, text_path, work_dir


def parse_variant(text: str) -> tuple[str, bool, str]:
    """``gptq+rotate:w2g64`` -> ("gptq", True, "w2g64")."""
    head, _, spec = text.partition(":")
    method, _, extra = head.partition("+")
    if not spec or extra not in ("", "rotate"):
        raise SystemExit(f"variant {text!r}: write METHOD[+rotate]:SPEC, e.g. gptq+rotate:w2g64")
    return method, extra == "rotate", spec


def variant_folder(args: argparse.Namespace, variant: str, shared: bool) -> str:
    """The checkpoint folder's name: the model, the variant, then what else changes the weights
    (a shared codebook, a mixed-precision budget, a calibration text other than the default)."""
    name = f"{Path(args.model).stem}-{variant.replace(':', '-').replace('+', '_')}{'-sharedcb' if shared else ''}"
    if args.budget:
        name += f"-b{args.budget}"
    if args.calib_text:
        name += "-" + args.calib_text.replace("+", "_")
    return name


def budget_plan(args: argparse.Namespace, plan, calib):
    """``plan`` with one spec per layer from ``--candidates`` under ``--budget`` (bits per weight
    over the blocks' matrices; Fisher costs on the first ``--sensitivity-windows`` calibration
    sequences), then the embedding/head at w8 as without a budget. Returns (plan, allocation)."""
    from dataclasses import replace

    from bitsmith.models import open_source
    from bitsmith.pipeline.outputs import with_output_spec
    from bitsmith.plan.allocate import Budget
    from bitsmith.plan.sensitivity import plan_allocation
    from bitsmith.spec import QuantSpec

    candidates = [QuantSpec.parse(s) for s in args.candidates.split(",") if s.strip()]
    tokens = replace(calib, samples=min(calib.samples, args.sensitivity_windows)).batches(open_source(args.model).tokenizer())
    t0 = time.process_time()
    plan, allocation = plan_allocation(args.model, plan, Budget.parse(args.budget), candidates, tokens)
    print(f"allocated {allocation.bits_per_weight:.3f} bits/weight in {time.process_time() - t0:.0f} cpu s: "
          f"{allocation.counts()}", flush=True)
    return with_output_spec(plan, args.model, QuantSpec.parse("w8")), allocation


def quantize_variant(args: argparse.Namespace, variant: str, work: Path) -> dict:
    from bitsmith.calib import CalibrationConfig
    from bitsmith.pipeline.outputs import with_output_spec
    from bitsmith.pipeline.plan import QuantizePlan, resolve_compute_dtype
    from bitsmith.pipeline.quantize import calibrated_methods, quantize
    from bitsmith.plan.sensitivity import record_allocation
    from bitsmith.spec import QuantSpec

    method, rotate, spec = parse_variant(variant)
    shared = method == "vq" and args.vq_share_codebook
    out = work / variant_folder(args, variant, shared)
    row = {"variant": variant, "method": method, "rotate": rotate, "spec": spec, "path": str(out)}
    if args.reuse and (out / "bitsmith.json").exists():
        row["quantize_s"] = json.loads((out / "bitsmith.json").read_text())["report"].get("seconds")
        return row
    calib = CalibrationConfig(text=args.calib_text, samples=args.calib_samples, seq_len=args.calib_len)
    t0 = time.perf_counter()
    options = {**({"rotate": True} if rotate else {}), **({"share_codebook": True} if shared else {})}
    plan = QuantizePlan(QuantSpec.parse(spec), method, options, compute_dtype=resolve_compute_dtype(args.compute_dtype),
                        calib=calib if method in calibrated_methods() else None)
    allocation = None
    if args.budget:
        plan, allocation = budget_plan(args, plan, calib)
    else:
        plan = with_output_spec(plan, args.model, QuantSpec.parse("w8"))
    quantize(args.model, out, plan, overwrite=True)
    if allocation is not None:
        record_allocation(out, allocation)
    row["quantize_s"] = time.perf_counter() - t0
    print(f"quantized {variant} in {row['quantize_s']:.1f} s", flush=True)
    return row


def distill_variant(args: argparse.Namespace, row: dict) -> dict:
    from bitsmith.recover import DistillConfig, distill

    out = Path(row["path"] + "-" + args.distill_tag)
    start = row["path"] + ("-" + args.distill_from if args.distill_from else "")
    config = DistillConfig(steps=args.distill_steps, lr=args.distill_lr, samples=args.distill_samples,
                           seq_len=args.distill_len, batch=args.distill_batch, check_every=args.distill_check_every,
                           block_steps=args.distill_block_steps, block_lr=args.distill_block_lr,
                           calib_text=args.distill_calib or args.calib_text, random_offsets=args.distill_calib_random)
    t0 = time.perf_counter()
    cpu0 = time.process_time()

    shown: list[dict] = []

    def progress(step: int, total: int, last: dict) -> None:  # live, so a long run can be watched
        if last and (not shown or last is not shown[-1]):
            shown.append(last)
            print(f"  [{time.perf_counter() - t0:7.1f} s wall, {time.process_time() - cpu0:7.1f} s cpu] step {step}/{total} "
                  f"{json.dumps(last)}", flush=True)

    result = distill(start, args.model, out, config, overwrite=True, progress=progress)
    seconds = time.perf_counter() - t0
    print(f"distilled {row['variant']} in {seconds:.1f} s ({time.process_time() - cpu0:.1f} s cpu): calibration KLD {result.initial_loss:.4f} -> "
          f"{result.best_loss:.4f}", flush=True)
    for point in result.curve:
        print(f"  step {point['step']:>4}  calibration KLD {point['kld']:.4f}  {'accepted' if point['accepted'] else 'rejected'}",
              flush=True)
    return {**row, "variant": row["variant"] + "+" + args.distill_tag, "path": str(out), "distill_s": seconds,
            "distill_cpu_s": time.process_time() - cpu0, "calib_kld_before": result.initial_loss,
            "calib_kld_after": result.best_loss, "distill_curve": result.curve}


def earlier_distilled(args: argparse.Namespace, starts: list[dict]) -> list[dict]:
    """With ``--distill-from TAG`` (a second stage), the checkpoints distilled earlier with that tag,
    as rows scored beside the new ones; refused before any work when one is missing."""
    if not args.distill_from:
        return []
    rows = [{**r, "variant": f"{r['variant']}+{args.distill_from}", "path": f"{r['path']}-{args.distill_from}"}
            for r in starts]
    missing = [r["path"] for r in rows if not (Path(r["path"]) / "bitsmith.json").exists()]
    if missing:
        raise SystemExit(f"--distill-from {args.distill_from}: no checkpoint at {', '.join(missing)}; distill with "
                         f"--distill-tag {args.distill_from} first")
    return rows


def decode_speeds(args: argparse.Namespace, rows: list[dict], text: str) -> dict[str, float]:
    """Greedy decode tok/s of every variant (the runtime's default options: native kernels, lean
    path), best of ``--decode-rounds`` rounds that take the variants in turn (paired on a shared
    machine); one warm-up generation each first."""
    from bitsmith.infer.generate import generate
    from bitsmith.runtime.load import load_model

    loaded = {r["variant"]: load_model(r["path"]) for r in rows}
    prompt = text[:400]
    for one in loaded.values():
        generate(one.model, one.tokenizer, prompt, max_new_tokens=4, stop_at_eos=False)
    speeds: dict[str, list[float]] = {name: [] for name in loaded}
    for _ in range(args.decode_rounds):
        for name, one in loaded.items():
            result = generate(one.model, one.tokenizer, prompt, max_new_tokens=args.decode, stop_at_eos=False)
            speeds[name].append(result.decode_tok_s)
    for name, values in speeds.items():
        print(f"decode {name}: best {max(values):.1f} tok/s of {', '.join(f'{v:.1f}' for v in values)}", flush=True)
    return {name: max(values) for name, values in speeds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--variants", default="rtn:w2g64,rtn+rotate:w2g64,gptq:w2g64,gptq+rotate:w2g64")
    ap.add_argument("--distill", default="", help="variants (from --variants) to distill too, comma-separated")
    ap.add_argument("--distill-steps", type=int, default=40)
    ap.add_argument("--distill-lr", type=float, default=1e-3)
    ap.add_argument("--distill-samples", type=int, default=16)
    ap.add_argument("--distill-len", type=int, default=128)
    ap.add_argument("--distill-batch", type=int, default=4)
    ap.add_argument("--distill-check-every", type=int, default=None)
    ap.add_argument("--distill-block-steps", type=int, default=0, help="block-wise stage: Adam steps per decoder block")
    ap.add_argument("--distill-block-lr", type=float, default=None)
    ap.add_argument("--distill-calib-random", action="store_true",
                    help="distill on calibration sequences at random offsets across the whole text")
    ap.add_argument("--distill-calib", default=None, help="the distillation's calibration when not --calib-text's: a "
                    "text, prose+code, or generated (sequences the reference samples itself)")
    ap.add_argument("--distill-tag", default="distill", help="name of the distilled variant (and its folder's suffix)")
    ap.add_argument("--distill-from", default="", help="start from the variant distilled earlier with this tag "
                                                       "(its folder in --work; it is scored too) instead of the quantized one")
    ap.add_argument("--text", default=str(text_path()), help="evaluation text (default: docs/PROTOCOL.md's prose slice)")
    ap.add_argument("--chars", type=int, default=60_000)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--work", default=None, help="checkpoint folder (default: work_dir('lowbit'))")
    ap.add_argument("--calib-samples", type=int, default=128, help="calibration sequences (gptq)")
    ap.add_argument("--calib-len", type=int, default=512, help="tokens per calibration sequence (gptq)")
    ap.add_argument("--calib-text", default=None, help="calibration text of the quantize, --budget and --distill: "
                    "prose+code, prose or a file (default: the shipped State of the Union text); folder suffix")
    ap.add_argument("--budget", default=None, help="mixed precision: bits per weight over the blocks (2.5bpw); the "
                    "variant's SPEC is then the plan's default and --candidates the choices; folder suffix -bBUDGET")
    ap.add_argument("--candidates", default="w2g64vq,w3g128vq,w4g128", help="specs a layer may get under --budget")
    ap.add_argument("--sensitivity-windows", type=int, default=16, help="calibration sequences of --budget's Fisher pass")
    ap.add_argument("--vq-share-codebook", action="store_true",
                    help="vq: one codebook per stage of layers reading one input (q/k/v, gate/up); folder suffix -sharedcb")
    ap.add_argument("--compute-dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--reuse", action="store_true", help="keep checkpoints already in the work folder")
    ap.add_argument("--json", default=None)
    ap.add_argument("--decode", type=int, default=0, help="also time greedy decode of this many tokens per variant")
    ap.add_argument("--decode-rounds", type=int, default=3)
    ap.add_argument("--no-eval", action="store_true", help="skip the quality pass (with --decode: speed only)")
    args = ap.parse_args()

    import bitsmith
    from bitsmith.eval.suite import evaluate_variants, text_windows
    from bitsmith.models import open_source
    from bitsmith.pipeline.common import quantizable_layers
    from bitsmith.runtime.options import RuntimeOptions

    work = Path(args.work or work_dir("lowbit"))
    rows = [quantize_variant(args, v, work) for v in args.variants.split(",") if v]
    if args.no_eval and not args.decode:
        return
    wanted = {v for v in args.distill.split(",") if v}
    starts = [r for r in rows if r["variant"] in wanted]
    rows += earlier_distilled(args, starts) + [distill_variant(args, r) for r in starts]
    text = Path(args.text).read_text(encoding="utf-8", errors="replace")[: args.chars]
    if args.decode:
        for name, speed in decode_speeds(args, rows, text).items():
            next(r for r in rows if r["variant"] == name)["decode_tok_s"] = speed
    if args.no_eval:
        return
    exact = RuntimeOptions.for_measurement()
    reference = bitsmith.load(args.model, options=exact)
    wins = text_windows(reference.tokenizer, text, args.ctx, args.max_windows)
    blocks = quantizable_layers(open_source(args.model).config)  # the blocks' matrices: what bits/weight counts
    t0 = time.perf_counter()
    results = {}
    for row in rows:  # one quantized model in memory at a time (three at once peaked at 11 GB on Gemma)
        loaded = bitsmith.load(row["path"], options=exact)
        row["bits_per_weight"] = report_block_bpw(loaded.info.report, blocks)
        results.update(evaluate_variants(reference.model, {row["variant"]: loaded.model}, wins))
        del loaded
    print(f"\n{args.model}, {wins.numel():,} tokens ({wins.shape[0]} x {args.ctx}) of {Path(args.text).name}[:{args.chars}], "
          f"reference ppl {results['reference'].ppl:.3f}, gptq calibration {args.calib_samples} x {args.calib_len}; "
          f"evaluation took {time.perf_counter() - t0:.0f} s\n")
    print("| variant | bits/weight | ppl | KLD mean | KLD median | KLD p99 | top-1 | quantize s | distill s | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        r = results[row["variant"]]
        row.update(r.as_dict())
        q = row.get("quantize_s")
        print(f"| {row['variant']} | {row['bits_per_weight']:.3f} | {r.ppl:.3f} | {r.kld_mean:.4f} | {r.kld_median:.3f} | {r.kld_p99:.3f} | "
              f"{r.top1:.3f} | {'' if q is None else f'{q:.0f}'} | {row.get('distill_s', 0):.0f} | "
              f"{row.get('decode_tok_s', 0):.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "tokens": wins.numel(),
                                               "reference_ppl": results["reference"].ppl, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
