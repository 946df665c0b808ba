"""Quality and size of quantized variants against the unquantized model (docs/PROTOCOL.md).

    python bench/quality.py --model smollm2-135m --specs w8,w4g128,w4g32,w3g128,w2g64 --method rtn

Quantizes each spec (timed), then scores every variant and the reference in one pass over the
evaluation windows (the reference runs once per window). Prints a Markdown table; --json writes
the same numbers. Nothing here is asserted: it prints what it measured.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import text_path, work_dir

DEFAULT_TEXT = text_path()  # the shipped 60,000-character prose slice: all that --chars reads by default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--specs", default="w8,w4g128,w4g32,w3g128,w2g64")
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--text", default=str(DEFAULT_TEXT), help="evaluation text (default: docs/PROTOCOL.md's prose slice)")
    ap.add_argument("--chars", type=int, default=60_000, help="first N characters of the text (docs/PROTOCOL.md: 60,000)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--work", default=None, help="folder for the checkpoints (default: work_dir('quality'), ~/.cache/bitsmith/bench)")
    ap.add_argument("--calib-samples", type=int, default=128, help="calibration sequences of 512 tokens (gptq/awq)")
    ap.add_argument("--compute-dtype", choices=["fp32", "bf16"], default="bf16", help="block forwards of calibrated methods")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="method option, repeatable (e.g. awq=true with gptq: AWQ scaling then GPTQ; quantizer=gptq with awq)")
    ap.add_argument("--output-spec", default="w8", help="embedding and head spec, or keep (unquantized); default w8 as bitsmith quantize")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import bitsmith
    from bitsmith.calib import CalibrationConfig
    from bitsmith.cli.common import dir_size_mb
    from bitsmith.eval.suite import evaluate_variants, text_windows
    from bitsmith.pipeline.quantize import calibrated_methods
    from bitsmith.runtime.options import RuntimeOptions

    specs = [s for s in args.specs.split(",") if s]
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        low = value.strip().lower()
        options[key] = True if low in ("true", "yes", "on") else False if low in ("false", "no", "off") else (
            int(value) if value.lstrip("-").isdigit() else value)
    label = args.method + "".join(f"+{k}={v}" for k, v in options.items()) + f"+out={args.output_spec}"
    calibrated = args.method in calibrated_methods() or bool(options.get("awq"))
    rows = {}
    for spec in specs:
        out = Path(args.work or work_dir("quality")) / f"{Path(args.model).stem}-{spec}-{label.replace('=', '_')}"
        t0 = time.perf_counter()
        calib = CalibrationConfig(samples=args.calib_samples) if calibrated else None
        bitsmith.quantize(args.model, out, spec, args.method, calibration=calib, options=options,
                          compute_dtype=args.compute_dtype, output_spec=args.output_spec, overwrite=True)
        rows[spec] = {"path": str(out), "quantize_s": time.perf_counter() - t0, "file_mb": dir_size_mb(out)}
        print(f"quantized {spec} in {rows[spec]['quantize_s']:.1f} s", flush=True)
    exact = RuntimeOptions.for_measurement()  # docs/PROTOCOL.md: the checkpoint's own arithmetic
    reference = bitsmith.load(args.model, options=exact)
    text = Path(args.text).read_text(encoding="utf-8", errors="replace")[: args.chars]
    wins = text_windows(reference.tokenizer, text, args.ctx, args.max_windows)
    variants = {}
    for spec in specs:
        loaded = bitsmith.load(rows[spec]["path"], options=exact)
        variants[spec] = loaded.model
        rows[spec]["bits_per_weight"] = loaded.info.report["bits_per_weight"]
    t0 = time.perf_counter()
    results = evaluate_variants(reference.model, variants, wins)
    eval_s = time.perf_counter() - t0
    calib_note = f", calibration {args.calib_samples} x 512 ({args.compute_dtype} forwards)" if calibrated else ""
    print(f"\n{args.model}, method {label}{calib_note}, {wins.numel():,} tokens ({wins.shape[0]} x {args.ctx}) of {Path(args.text).name}[:{args.chars}], "
          f"reference ppl {results['reference'].ppl:.3f}; evaluation took {eval_s:.0f} s\n")
    print("| spec | bits/weight | file MB | ppl | KLD mean | KLD p99 | top-1 | quantize s |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in specs:
        r, row = results[spec], rows[spec]
        row.update(r.as_dict())
        print(f"| {spec} | {row['bits_per_weight']:.3f} | {row['file_mb']:.1f} | {r.ppl:.3f} | {r.kld_mean:.4f} | {r.kld_p99:.3f} | {r.top1:.3f} | {row['quantize_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "method": label, "tokens": wins.numel(),
                                               "reference_ppl": results["reference"].ppl, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
