"""Does code degrade faster than prose? Per-domain quality of quantized variants of one model.

    python bench/report_domains.py --model smollm2-135m --method rtn --quantize-args=--no-clip-search \\
        --tag rtn-noclip --max-windows 4 --work WORK --report bench/results/quality-per-bit/smollm2-135m

(the report in bench/results/quality-per-bit was made so; on a quiet machine use ``--method gptq`` and
``--max-windows 8`` or more.) ``--reference REF`` scores against another model than ``--model``
(e.g. an 8-bit checkpoint as a stand-in when the fp32 reference does not fit in memory).

For each spec (default w8, w4g128, w3g128, w2g64) it quantizes the model once into --work (an
existing checkpoint there is reused), then runs

    bitsmith eval CKPT --reference MODEL --reference-cache WORK/refcache --text prose --text code
        --max-windows N --report DIR --json ...

so the reference runs once per domain (top-256 cache; its KL is a lower bound, see
``bitsmith eval --help``) and every variant lands in the same report (Pareto, per-domain bars,
per-layer error). It then prints one table: per spec and domain KLD, top-1 and ppl ratio, and the
code/prose KLD ratio, and writes it as ``domains_summary.{md,json}`` beside the report.
Nothing is asserted: it prints what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BITSMITH = [sys.executable, "-m", "bitsmith"]


def run(cmd: list[str]) -> float:
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--specs", default="w8,w4g128,w3g128,w2g64")
    ap.add_argument("--method", default="hqq")
    ap.add_argument("--quantize-args", default="", help="extra `bitsmith quantize` arguments, e.g. '--calib-samples 32'")
    ap.add_argument("--reference", default=None, help="reference model (default: --model)")
    ap.add_argument("--tag", default=None, help="checkpoint folder suffix (default: the method)")
    ap.add_argument("--max-windows", type=int, default=8, help="windows of 512 tokens per domain (default 8)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--work", required=True, help="folder for checkpoints and the reference cache")
    ap.add_argument("--report", required=True, help="report folder (report.md, plots, report.json)")
    args = ap.parse_args()

    work, report = Path(args.work), Path(args.report)
    work.mkdir(parents=True, exist_ok=True)
    report.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    for spec in [s for s in args.specs.split(",") if s]:
        tag = args.tag or args.method
        ckpt = work / f"{spec}-{tag}"
        quantize_s = None
        if not (ckpt / "bitsmith.json").exists() and not any(ckpt.glob("*.safetensors")):
            quantize_s = run(["/usr/bin/time", "-f", "quantize: %e s wall, %M KB peak RSS", *BITSMITH, "quantize", args.model, "--spec", spec, "--method", args.method,
                              "--out", str(ckpt), "--overwrite", *args.quantize_args.split()])
        out = work / f"eval-{spec}-{tag}.json"
        eval_s = run([*BITSMITH, "eval", str(ckpt), "--reference", args.reference or args.model, "--reference-cache", str(work / "refcache"),
                      "--text", "prose", "--text", "code", "--ctx", str(args.ctx), "--max-windows", str(args.max_windows),
                      "--json", str(out), "--report", str(report)])
        domains = json.loads(out.read_text())["domains"]
        rows[spec] = {"checkpoint": str(ckpt), "quantize_s": quantize_s, "eval_s": eval_s, "domains": domains,
                      "code_over_prose_kld": domains["code"]["kld_mean"] / domains["prose"]["kld_mean"]
                       if domains["prose"]["kld_mean"] > 0 else None}

    load = os.getloadavg()
    ref_note = f", reference {args.reference} instead of the fp32 model" if args.reference else ""
    lines = [
        f"## {args.model}: prose vs code ({args.method} {args.quantize_args}, {args.max_windows} x {args.ctx} tokens per domain, "
        f"KL from a top-256 reference cache{ref_note})",
        "",
        "| spec | prose KLD | code KLD | code/prose KLD | prose top-1 | code top-1 | prose ppl ratio | code ppl ratio | "
        "prose Δp | code Δp |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for spec, r in rows.items():
        p, c = r["domains"]["prose"], r["domains"]["code"]
        lines.append(
            f"| {spec} | {p['kld_mean']:.4f} | {c['kld_mean']:.4f} | {'-' if r['code_over_prose_kld'] is None else format(r['code_over_prose_kld'], '.2f')} | "
            f"{100 * p['top1']:.1f}% | {100 * c['top1']:.1f}% | {p['ppl_ratio']:.3f} | {c['ppl_ratio']:.3f} | "
            f"{p['dprob_mean']:+.4f} | {c['dprob_mean']:+.4f} |"
        )
    first = next(iter(rows.values()))["domains"]
    lines += ["", f"reference ppl: prose {first['prose']['ref_ppl']:.3f}, code {first['code']['ref_ppl']:.3f}; "
              f"tokens scored: prose {first['prose']['tokens']}, code {first['code']['tokens']}; "
              f"load average at the end {load[0]:.1f} (timings under load)"]
    text = "\n".join(lines)
    print(text)
    (report / f"domains_summary-{args.tag or args.method}.md").write_text(text + "\n", encoding="utf-8")
    (report / f"domains_summary-{args.tag or args.method}.json").write_text(json.dumps({"model": args.model, "method": args.method, "quantize_args": args.quantize_args,
                                                             "max_windows": args.max_windows, "ctx": args.ctx,
                                                             "rows": rows}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
