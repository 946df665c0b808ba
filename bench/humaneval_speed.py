"""HumanEval pass@1 and wall time at several decode batch sizes, one model loaded once.

    python bench/humaneval_speed.py MODEL --limit 20 --batch 1,8 --threads 1 --out bench/results/speed/humaneval_X.md

For each ``--batch B`` it runs ``bitsmith tasks``' HumanEval loop (greedy, chat template when the
tokenizer has one, solutions tested two at a time while generation goes on) with B problems decoding
together (continuous batching; B = 1 is one problem at a time), and prints wall seconds, seconds per
problem, generated tokens and their rate over the wall time (prefill, decode and testing all inside
it), the prefill token count, the decode steps and their mean batch, pass@1, and how many completions
are identical to the first batch size's (greedy batching changes float summation order only). Nothing
is asserted; times depend on the machine's load, which the caller states.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def recorder(label: str, tokens, jsonl: Path | None = None):
    """(on_outcome, progress) for pass_at_1: a line per tested problem with the passes so far (so a cut-short
    run still says how far it got and how well), and each outcome appended to ``jsonl`` as it comes."""
    start, passed = time.perf_counter(), [0]
    if jsonl is not None:
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        jsonl.write_text("")

    def on_outcome(o) -> None:
        passed[0] += o.outcome.passed
        if jsonl is not None:
            with jsonl.open("a") as f:
                f.write(json.dumps({"task_id": o.task_id, "status": o.outcome.status, "completion": o.completion,
                                    "t_s": round(time.perf_counter() - start, 1)}) + "\n")

    def progress(done: int, total: int) -> None:
        print(f"  {label}: {done}/{total} problems tested, {passed[0]} passed, at {time.perf_counter() - start:.1f} s, "
              f"{tokens()} tokens generated", flush=True)

    return on_outcome, progress


def run_once(loaded, problems, chat: bool, batch: int, max_new_tokens: int, jsonl: Path | None = None) -> dict:
    from bitsmith.eval.humaneval import pass_at_1
    from bitsmith.eval.tasks import make_complete_many
    from bitsmith.infer.batching import BatchStats

    stats = BatchStats()
    many = make_complete_many(loaded.model, loaded.tokenizer, chat=chat, max_batch=batch, stats=stats)
    start = time.perf_counter()
    on_outcome, progress = recorder(f"batch {batch}", lambda: stats.generated_tokens, jsonl)
    result = pass_at_1(None, problems, chat=chat, max_new_tokens=max_new_tokens, complete_many=many, progress=progress,
                       on_outcome=on_outcome)
    wall = time.perf_counter() - start
    status = {s: sum(o.outcome.status == s for o in result.outcomes) for s in ("passed", "failed", "error", "timeout")}
    return {"batch": batch, "n": result.n, "passed": result.passed, "pass_at_1": result.pass_at_1, "wall_s": wall,
            "s_per_problem": wall / result.n, "generated": stats.generated_tokens, "gen_tok_s": stats.generated_tokens / wall,
            "prefill_tokens": stats.prefill_tokens, "steps": stats.steps, "mean_batch": stats.mean_batch,
            "status": status, "completions": [o.completion for o in result.outcomes],
            "outcomes": {o.task_id: o.outcome.status for o in result.outcomes}}


def table(model: str, rows: list[dict], threads: int, chat: bool, start: int) -> str:
    first = rows[0]["completions"]
    lines = [f"HumanEval on {model}, problems {start}-{start + rows[0]['n'] - 1}, greedy, {'chat template' if chat else 'plain prompts'}, "
             f"{threads} thread(s)", "",
             "| batch | problems | pass@1 | wall s | s/problem | generated tok | gen tok/s (wall) | prefill tok | decode steps | mean batch | same completions as batch " + str(rows[0]["batch"]) + " |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = sum(a == b for a, b in zip(first, r["completions"]))
        lines.append(f"| {r['batch']} | {r['n']} | {r['pass_at_1']:.1%} ({r['passed']}/{r['n']}) | {r['wall_s']:.1f} | "
                     f"{r['s_per_problem']:.2f} | {r['generated']} | {r['gen_tok_s']:.1f} | {r['prefill_tokens']} | "
                     f"{r['steps']} | {r['mean_batch']:.2f} | {same}/{r['n']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="checkpoint, Hugging Face folder, .gguf file or alias")
    ap.add_argument("--limit", type=int, default=20, help="first N problems from --start (0: all to the end)")
    ap.add_argument("--start", type=int, default=0, help="skip the first S problems (split a long run into parts)")
    ap.add_argument("--batch", default="1,8", help="comma-separated decode batch sizes")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--chat", choices=("auto", "yes", "no"), default="auto")
    ap.add_argument("--out", help="write the table (markdown) here and the raw rows beside it as .json; each "
                    "problem's outcome is appended beside it (.b<batch>.jsonl) as soon as it is tested")
    args = ap.parse_args()

    import torch

    from bitsmith.eval.humaneval import load_problems
    from bitsmith.eval.tasks import has_chat_template
    from bitsmith.runtime.load import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    chat = has_chat_template(loaded.tokenizer) if args.chat == "auto" else args.chat == "yes"
    problems = load_problems()[args.start:]
    problems = problems[: args.limit] if args.limit else problems
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        jsonl = Path(args.out).with_suffix(f".b{batch}.jsonl") if args.out else None
        rows.append(run_once(loaded, problems, chat, batch, args.max_new_tokens, jsonl))
        r = rows[-1]
        print(f"batch {batch}: pass@1 {r['pass_at_1']:.1%}, {r['wall_s']:.1f} s, {r['generated']} tokens, "
              f"{r['gen_tok_s']:.1f} tok/s, mean batch {r['mean_batch']:.2f}", flush=True)
    text = table(str(args.model), rows, torch.get_num_threads(), chat, args.start)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n\ncommand: `python bench/humaneval_speed.py " + " ".join(sys.argv[1:]) + "`\n")
        out.with_suffix(".json").write_text(json.dumps({"model": str(args.model), "start": args.start, "threads": torch.get_num_threads(),
                                                        "load": os.getloadavg(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
