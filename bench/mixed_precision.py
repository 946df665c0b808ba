"""Mixed precision vs uniform at the same size.

For each uniform comparator spec (default w3g64 = 3.5 bpw and w2g64 = 2.5 bpw on these models), the
allocator gets exactly the uniform checkpoint's quantized-layer bits as its budget; both are then
quantized with the same method and scored against the fp32 model (docs/PROTOCOL.md metrics) on the first
60,000 characters of Pride and Prejudice. The sensitivity (Fisher by default) is computed once on
the shipped State of the Union calibration text and shared by every budget. Each budget's pair is
loaded, scored and dropped before the next (the fp32 reference runs once per pair), so peak memory
is the fp32 model plus two quantized ones.

    .venv/bin/python bench/mixed_precision.py --model smollm2-135m --no-clip-search
    .venv/bin/python bench/mixed_precision.py --model qwen2.5-coder-1.5b --no-clip-search \
        --calib-windows 4 --calib-len 256 --max-windows 4 --fisher-gb 1.5
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import text_path

DEV_TEXT = text_path()  # the shipped prose slice (docs/PROTOCOL.md); the script reads its first 60,000 chars
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
    ap.add_argument("--fisher-gb", type=float, default=None,
                    help="cap on the Fisher accumulators alive at once, GB (layers split into passes; same result)")
    ap.add_argument("--fake-quant", action="store_true",
                    help="score each variant by swapping its dequantized weights into the fp32 model (no checkpoints "
                         "written; same weights the checkpoint would hold; for models too slow to quantize 4 times here)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="reference model and sensitivity pass in bf16: half the memory, ~3x faster on AVX512-bf16 "
                         "CPUs; deviates from PROTOCOL's fp32 reference (say so)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="JSON file of sensitivity costs: reused when model and settings match, else written")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import bitsmith
    from bitsmith.calib.data import calibration_batches, read_calibration_text
    from bitsmith.eval.suite import evaluate_variants, text_windows
    from bitsmith.models import open_source
    from bitsmith.pipeline.common import quantizable_layers
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize
    from bitsmith.plan.allocate import allocate
    from bitsmith.plan.sensitivity import estimate_sensitivity, float_model
    from bitsmith.spec import QuantSpec

    source = open_source(args.model)
    tokenizer = source.tokenizer()
    layers = quantizable_layers(source.config)
    weights = sum(o * i for o, i in layers.values())
    candidates = [QuantSpec.parse(s) for s in args.candidates.split(",")]
    calib = calibration_batches(tokenizer, read_calibration_text(None), args.calib_windows, args.calib_len)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    net = float_model(source, layers, dtype)
    t0 = time.perf_counter()
    options = {"clip_search": False} if args.no_clip_search else {}
    key = {"model": args.model, "dtype": args.dtype, "estimator": args.estimator, "method": args.method, "options": options,
           "calib": list(calib.shape), "candidates": args.candidates}
    sens = _cached(args.cache, key, layers)
    if sens is None:
        fisher_bytes = None if args.fisher_gb is None else int(args.fisher_gb * 1e9)
        sens = estimate_sensitivity(net, layers, candidates, calib, estimator=args.estimator, method=args.method,
                                    options=options, fisher_bytes=fisher_bytes)
        if args.cache:
            costs = {n: {str(spec): c for spec, c in cs.items()} for n, cs in sens.costs.items()}
            args.cache.write_text(json.dumps({"key": key, "costs": costs}))
    sens_s = time.perf_counter() - t0
    print(f"sensitivity ({args.estimator}, {calib.shape[0]} x {calib.shape[1]} tokens): {sens_s:.1f} s", flush=True)

    rows, results = [], {}
    wins = text_windows(tokenizer, DEV_TEXT.read_text(encoding="utf-8")[:60_000], args.ctx, args.max_windows)
    if args.fake_quant:
        from bitsmith.plan.sensitivity import make_quantizer

        _, quantize_weight = make_quantizer(args.method, options)
        plans = {}
        for name in args.uniform.split(","):
            spec = QuantSpec.parse(name)
            budget = sum(spec.stored_bits(*shape) for shape in layers.values())
            alloc = allocate(sens.costs, layers, budget)
            print(f"{spec}: allocation {alloc.counts()} at {alloc.bits_per_weight:.4f} bpw", flush=True)
            plans[f"uniform {spec}"] = {n: spec for n in layers}
            plans[f"mixed @{spec}"] = dict(alloc.specs)
            rows.append({"variant": f"uniform {spec}", "bpw": budget / weights, "predicted_kl": sens.total(spec)})
            rows.append({"variant": f"mixed @{spec}", "bpw": alloc.total_bits / weights,
                         "predicted_kl": alloc.predicted_cost, "counts": alloc.counts()})
        t0 = time.perf_counter()
        results = _fake_quant_eval(net, source, plans, quantize_weight, wins)
        eval_s = time.perf_counter() - t0
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        _table(rows, results, wins, eval_s)
        print(f"times: sensitivity {sens_s:.0f} s, fake-quant eval (incl. quantizing) {eval_s:.0f} s; "
              f"peak RSS {peak_gb:.2f} GB")
        _write_json(args, calib, wins, sens_s, rows, eval_s, peak_gb, results)
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-mixed-"))
    eval_s = 0.0
    try:
        for name in args.uniform.split(","):
            spec = QuantSpec.parse(name)
            budget = sum(spec.stored_bits(*shape) for shape in layers.values())
            alloc = allocate(sens.costs, layers, budget)
            print(f"{spec}: allocation {alloc.counts()} at {alloc.bits_per_weight:.4f} bpw", flush=True)
            variants = {}
            for label, plan in ((f"uniform {spec}", QuantizePlan(spec, method=args.method, options=options)),
                                (f"mixed @{spec}", QuantizePlan(spec, method=args.method, options=options,
                                                                layer_specs=dict(alloc.specs)))):
                t0 = time.perf_counter()
                path = quantize(args.model, tmp / label.replace(" ", "_").replace("@", ""), plan)
                variants[label] = bitsmith.load(path).model
                uniform = label.startswith("uniform")
                rows.append({"variant": label, "bpw": (budget if uniform else alloc.total_bits) / weights,
                             "predicted_kl": sens.total(spec) if uniform else alloc.predicted_cost,
                             "quantize_s": round(time.perf_counter() - t0, 1),
                             **({} if uniform else {"counts": alloc.counts()})})
                print(f"  {label}: quantized in {rows[-1]['quantize_s']} s", flush=True)
            t0 = time.perf_counter()
            results.update(evaluate_variants(net, variants, wins))
            eval_s += time.perf_counter() - t0
            del variants
            gc.collect()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is KiB on Linux
    _table(rows, results, wins, eval_s)
    print(f"times: sensitivity {sens_s:.0f} s, quantize {sum(r['quantize_s'] for r in rows):.0f} s, "
          f"eval {eval_s:.0f} s; peak RSS {peak_gb:.2f} GB")
    _write_json(args, calib, wins, sens_s, rows, eval_s, peak_gb, results)


def _write_json(args, calib, wins, sens_s, rows, eval_s, peak_gb, results) -> None:  # type: ignore[no-untyped-def]
    if args.json:
        out = {"model": args.model, "method": args.method, "estimator": args.estimator, "sensitivity_s": sens_s,
               "calib": list(calib.shape), "windows": list(wins.shape), "rows": rows, "eval_s": eval_s,
               "peak_rss_gb": peak_gb, "fake_quant": args.fake_quant, "dtype": args.dtype,
               "results": {k: v.as_dict() for k, v in results.items()}}
        args.json.write_text(json.dumps(out, indent=1, default=str))


def _fake_quant_eval(net, source, plans: dict, quantize, wins: torch.Tensor) -> dict:
    """PROTOCOL metrics of each plan (layer -> spec), its dequantized weights swapped into ``net`` in
    turn. The reference logits of every window are computed once and kept (windows x ctx x vocab
    floats); each layer's float weights are restored from the source afterwards, not held twice."""
    from bitsmith.eval.metrics import summarize, token_stats
    from bitsmith.plan.sensitivity import layer_weight

    net.eval()
    with torch.inference_mode():
        refs = [net(input_ids=w[None], use_cache=False).logits[0, :-1] for w in wins]  # each [ctx-1, V]
        results = {"reference": summarize([token_stats(None, r, w[1:]) for r, w in zip(refs, wins)])}
        for label, specs in plans.items():
            t0 = time.perf_counter()
            for name, spec in specs.items():
                param = layer_weight(net, name)
                param.data = quantize(param.data.float(), spec).to(param.dtype)  # [out, in] dequantized
            stats = [token_stats(r, net(input_ids=w[None], use_cache=False).logits[0, :-1], w[1:])
                     for r, w in zip(refs, wins)]
            results[label] = summarize(stats)
            for name in specs:
                param = layer_weight(net, name)
                param.data = source.load_tensor(f"{name}.weight").to(param.dtype)
            print(f"  {label}: kld_mean {results[label].kld_mean:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return results


def _cached(path: Path | None, key: dict, layers: dict):
    """Costs from ``path`` when it was written for the same model and settings, else None."""
    from bitsmith.plan.sensitivity import Sensitivity
    from bitsmith.spec import QuantSpec

    if path is None or not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("key") != json.loads(json.dumps(key)):
        return None
    costs = {n: {QuantSpec.parse(s): c for s, c in cs.items()} for n, cs in data["costs"].items()}
    print(f"sensitivity costs read from {path}", flush=True)
    return Sensitivity(costs, dict(layers), key["estimator"], key["method"], key["calib"][0])


def _table(rows: list[dict], results: dict, wins: torch.Tensor, eval_s: float) -> None:
    ref = results["reference"]
    print(f"\n{wins.shape[0]} windows x {wins.shape[1]} tokens of Pride and Prejudice; reference ppl {ref.ppl:.3f}")
    print(f"{'variant':<16} {'bpw':>7} {'pred KL':>9} {'kld_mean':>9} {'kld_p99':>8} {'top1':>7} {'ppl':>8}  specs")
    for row in rows:
        r = results[row["variant"]]
        counts = ", ".join(f"{n}x{s}" for s, n in row.get("counts", {}).items())
        print(f"{row['variant']:<16} {row['bpw']:7.4f} {row['predicted_kl']:9.4f} {r.kld_mean:9.4f} {r.kld_p99:8.3f} "
              f"{r.top1:7.4f} {r.ppl:8.3f}  {counts}")


if __name__ == "__main__":
    main()
