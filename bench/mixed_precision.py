"""Mixed precision vs uniform at the same size.

For each uniform comparator spec (default w3g64 = 3.5 bpw and w2g64 = 2.5 bpw on these models), the
allocator gets exactly the uniform checkpoint's quantized-layer bits as its budget; both are then
quantized with the same method and scored against the fp32 model (PROTOCOL.md metrics) on the first
60,000 characters of Pride and Prejudice. The sensitivity (Fisher by default) is computed once on
the shipped State of the Union calibration text and shared by every budget.

    .venv/bin/python bench/mixed_precision.py --model smollm2-135m --max-windows 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

DEV_TEXT = Path("/work/shared/data/dev/austen_pride_and_prejudice.txt")
CANDIDATES = "w2g128,w2g64,w3g128,w3g64,w4g128,w4g64,w8"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--uniform", default="w3g64,w2g64", help="uniform comparators; the allocator gets their exact size")
    ap.add_argument("--candidates", default=CANDIDATES)
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--estimator", default="fisher", choices=["fisher", "measured"])
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-clip-search", action="store_true", help="rtn: plain min/max ranges (about 15x faster pricing)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from bitsmith.calib.data import calibration_batches, read_calibration_text
    from bitsmith.eval.suite import evaluate_variants, text_windows
    from bitsmith.io.load import load_model
    from bitsmith.models import open_source
    from bitsmith.pipeline.quantize import QuantizeConfig, quantizable_layers, quantize_model
    from bitsmith.plan.allocate import allocate
    from bitsmith.plan.sensitivity import estimate_sensitivity, float_model
    from bitsmith.spec import QuantSpec

    source = open_source(args.model)
    tokenizer = source.tokenizer()
    layers = quantizable_layers(source.config)
    weights = sum(o * i for o, i in layers.values())
    candidates = [QuantSpec.parse(s) for s in args.candidates.split(",")]
    calib = calibration_batches(tokenizer, read_calibration_text(None), args.calib_windows, args.calib_len)
    net = float_model(source, layers)
    t0 = time.perf_counter()
    options = {"clip_search": False} if args.no_clip_search else {}
    sens = estimate_sensitivity(net, layers, candidates, calib, estimator=args.estimator, method=args.method, options=options)
    sens_s = time.perf_counter() - t0
    print(f"sensitivity ({args.estimator}, {calib.shape[0]} x {calib.shape[1]} tokens): {sens_s:.1f} s", flush=True)

    rows, variants = [], {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-mixed-"))
    for name in args.uniform.split(","):
        spec = QuantSpec.parse(name)
        budget = sum(spec.stored_bits(*shape) for shape in layers.values())
        alloc = allocate(sens.costs, layers, budget)
        print(f"{spec}: allocation {alloc.counts()} at {alloc.bits_per_weight:.4f} bpw", flush=True)
        for label, config in ((f"uniform {spec}", QuantizeConfig(spec, method=args.method, options=options)),
                              (f"mixed @{spec}", QuantizeConfig(spec, method=args.method, options=options, layer_specs=dict(alloc.specs)))):
            t0 = time.perf_counter()
            path = quantize_model(args.model, tmp / label.replace(" ", "_").replace("@", ""), config)
            variants[label] = load_model(path).model
            bits = budget if label.startswith("uniform") else alloc.total_bits
            predicted = sens.total(spec) if label.startswith("uniform") else alloc.predicted_cost
            rows.append({"variant": label, "bpw": bits / weights, "predicted_kl": predicted,
                         "quantize_s": round(time.perf_counter() - t0, 1),
                         **({"counts": alloc.counts()} if label.startswith("mixed") else {})})
    wins = text_windows(tokenizer, DEV_TEXT.read_text(encoding="utf-8")[:60_000], args.ctx, args.max_windows)
    t0 = time.perf_counter()
    results = evaluate_variants(net, variants, wins)
    eval_s = time.perf_counter() - t0
    _table(rows, results, wins, eval_s)
    if args.json:
        out = {"model": args.model, "method": args.method, "estimator": args.estimator, "sensitivity_s": sens_s,
               "windows": list(wins.shape), "rows": rows,
               "results": {k: v.as_dict() for k, v in results.items()}}
        args.json.write_text(json.dumps(out, indent=1, default=str))


def _table(rows: list[dict], results: dict, wins: torch.Tensor, eval_s: float) -> None:
    ref = results["reference"]
    print(f"\n{wins.shape[0]} windows x {wins.shape[1]} tokens of Pride and Prejudice; reference ppl {ref.ppl:.3f}; eval {eval_s:.0f} s")
    print(f"{'variant':<16} {'bpw':>7} {'pred KL':>9} {'kld_mean':>9} {'kld_p99':>8} {'top1':>7} {'ppl':>8}  specs")
    for row in rows:
        r = results[row["variant"]]
        counts = ", ".join(f"{n}x{s}" for s, n in row.get("counts", {}).items())
        print(f"{row['variant']:<16} {row['bpw']:7.4f} {row['predicted_kl']:9.4f} {r.kld_mean:9.4f} {r.kld_p99:8.3f} "
              f"{r.top1:7.4f} {r.ppl:8.3f}  {counts}")


if __name__ == "__main__":
    main()
