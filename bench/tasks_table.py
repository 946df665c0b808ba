"""HumanEval pass@1 and the reasoning probe over several variants of one model, as one table.

    python bench/tasks_table.py --humaneval 10 --reasoning 2 --out bench/results/tasks/qwen-tasks-10 \\
        full=qwen2.5-coder-1.5b w8=WORK/w8-rtn w3g128=WORK/w3g128-rtn

Runs ``bitsmith tasks MODEL --humaneval --limit N`` (greedy; chat replies stop at the end of their
first code block) and/or ``--reasoning --n-per-family K`` once per variant (one model in memory at
a time; a variant whose JSON is already in --out is not run again), then prints pass@1 and the
probe's accuracy per family and per level with the number of items and a binomial standard error
sqrt(p (1 - p) / n), and writes ``tasks_summary.{md,json}``. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

FAMILIES = ("arithmetic", "comparison", "counting", "sorting", "substitution")
LEVELS = 3


def cell(p: float, n: int) -> str:
    return f"{100 * p:.0f}% ± {100 * math.sqrt(p * (1 - p) / n):.0f} (n={n})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+", metavar="NAME=MODEL")
    ap.add_argument("--humaneval", type=int, default=0, metavar="N", help="first N HumanEval problems (0: skip)")
    ap.add_argument("--reasoning", type=int, default=0, metavar="K", help="reasoning tasks per family and level (0: skip)")
    ap.add_argument("--reasoning-only", default="", help="comma-separated variant names that get the probe (default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    probe_for = set(filter(None, args.reasoning_only.split(",")))
    results: dict[str, dict] = {}
    for item in args.variants:
        name, _, model = item.partition("=")
        suites = []
        if args.humaneval:
            suites += ["--humaneval", "--limit", str(args.humaneval), "--max-new-tokens", str(args.max_new_tokens)]
        if args.reasoning and (not probe_for or name in probe_for):
            suites += ["--reasoning", "--n-per-family", str(args.reasoning)]
        if not suites:
            continue
        dest = out / f"tasks-{name}.json"
        if not dest.exists():
            cmd = [sys.executable, "-m", "bitsmith", "tasks", model, *suites, "--json", str(dest)]
            print("$ " + " ".join(cmd), flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            data = json.loads(dest.read_text())
            data["seconds"] = time.perf_counter() - t0
            dest.write_text(json.dumps(data, indent=1) + "\n")
        results[name] = json.loads(dest.read_text())

    lines: list[str] = []
    he = {k: v["humaneval"] for k, v in results.items() if "humaneval" in v}
    if he:
        lines += [f"### HumanEval pass@1 (greedy, first {args.humaneval} problems, same subset for all)", "",
                  "| variant | pass@1 | passed | failed | error | timeout |", "|---|---:|---:|---:|---:|---:|"]
        for name, h in he.items():
            s = h["status"]
            lines.append(f"| {name} | {cell(h['pass_at_1'], h['n'])} | {s['passed']} | {s['failed']} | {s['error']} | {s['timeout']} |")
        lines.append("")
    rs = {k: v["reasoning"] for k, v in results.items() if "reasoning" in v}
    if rs:
        k = args.reasoning
        lines += [f"### Reasoning probe ({k} per family and level; ± is one binomial standard error)", "",
                  "| variant | all | " + " | ".join(FAMILIES) + " | " + " | ".join(f"level {l}" for l in range(1, LEVELS + 1)) + " |",
                  "|---|" + "---:|" * (1 + len(FAMILIES) + LEVELS)]
        for name, r in rs.items():
            fam = [cell(r["by_family"].get(f, 0.0), k * LEVELS) for f in FAMILIES]
            lev = [cell(r["by_level"].get(str(l), 0.0), k * len(FAMILIES)) for l in range(1, LEVELS + 1)]
            lines.append(f"| {name} | {cell(r['accuracy'], r['n'])} | " + " | ".join(fam + lev) + " |")
        names = list(rs)
        if len(names) >= 2:
            a, b = rs[names[0]], rs[names[-1]]
            diff = a["accuracy"] - b["accuracy"]
            se = math.sqrt(a["accuracy"] * (1 - a["accuracy"]) / a["n"] + b["accuracy"] * (1 - b["accuracy"]) / b["n"])
            lines += ["", f"{names[0]} - {names[-1]}: {100 * diff:+.1f} points, standard error of the difference "
                      f"{100 * se:.1f} points ({diff / se if se else float('inf'):.1f} SE)"]
    lines += ["", f"load average at the end: {os.getloadavg()[0]:.1f} (timings under load); seconds per variant: "
              + ", ".join(f"{n} {v.get('seconds', 0):.0f}" for n, v in results.items())]
    text = "\n".join(lines)
    print(text)
    (out / "tasks_summary.md").write_text(text + "\n", encoding="utf-8")
    (out / "tasks_summary.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
