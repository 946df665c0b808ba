"""HumanEval pass@1 of a GGUF served by llama.cpp's ``llama-server``, through bitsmith's own HumanEval loop.

    python bench/humaneval_server.py MODEL.gguf --tokenizer qwen2.5-coder-1.5b --parallel 8 --threads 1 \\
        --limit 0 --out humaneval_iq3.json

Starts ``llama-server`` (the build ``bench/tools.py`` manages) on a free localhost port with ``--parallel``
slots (continuous batching) and ``--threads`` threads, waits for /health, checks on the first
``--check`` problems that the server received exactly the prompt tokens bitsmith made (its
``tokens_evaluated`` and detokenized prompt), then runs :func:`bitsmith.eval.humaneval.pass_at_1` with
:func:`bitsmith.eval.remote.make_server_complete_many`: the same problems, prompts (bitsmith's tokenizer
and chat template, sent as token ids), greedy decoding, budget, stop cutting and test subprocesses as
``bitsmith tasks --humaneval`` and ``bench/humaneval_speed.py``. The server is stopped however the run
ends. A line per tested problem, so a cut-short run says how far it got; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import tools
from humaneval_speed import recorder
from serve_load import Server, free_port


def start_llama_server(gguf: Path, parallel: int, ctx_per_slot: int, threads: int) -> Server:
    port = free_port()
    argv = [str(tools.llama_bin("llama-server")), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(parallel), "--ctx-size", str(parallel * ctx_per_slot), "--threads", str(threads),
            "--threads-batch", str(threads), "--no-webui"]
    return Server("llama-server", argv, port)


def server_cpu_s(server: Server) -> float:
    """User + system CPU seconds of the running server process (from /proc; NaN where there is none)."""
    try:
        fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(args: argparse.Namespace, url: str, tokenizer, chat: bool) -> dict:
    from bitsmith.eval.humaneval import build_prompt, load_problems, pass_at_1
    from bitsmith.eval.remote import ServerStats, check_prompts, make_server_complete_many

    problems = load_problems()[args.start:]
    problems = problems[: args.limit] if args.limit else problems
    checks = check_prompts(url, tokenizer, [build_prompt(p, chat) for p in problems[: args.check]], chat)
    for p, c in zip(problems, checks):
        print(f"  prompt check {p.task_id}: sent {c.sent_tokens} ids, server counted {c.server_tokens}, "
              f"detokenized prompt {'identical' if c.same_text else 'DIFFERENT'}", flush=True)
    stats = ServerStats()
    many = make_server_complete_many(url, tokenizer, chat, parallel=args.parallel, stats=stats)
    start = time.perf_counter()
    on_outcome, progress = recorder("llama-server", lambda: stats.generated_tokens,
                                    args.out.with_suffix(".jsonl") if args.out else None)
    result = pass_at_1(None, problems, chat=chat, max_new_tokens=args.max_new_tokens, complete_many=many, progress=progress,
                       on_outcome=on_outcome)
    wall = time.perf_counter() - start
    status = {s: sum(o.outcome.status == s for o in result.outcomes) for s in ("passed", "failed", "error", "timeout")}
    return {"n": result.n, "passed": result.passed, "pass_at_1": result.pass_at_1, "wall_s": wall, "status": status,
            "generated": stats.generated_tokens, "prompt_tokens": stats.prompt_tokens, "cached_prompt_tokens": stats.cached_tokens,
            "requests": stats.requests, "continued": stats.continued,
            "prompt_checks": [c.__dict__ | {"ok": c.ok} for c in checks],
            "completions": [o.completion for o in result.outcomes],
            "outcomes": {o.task_id: o.outcome.status for o in result.outcomes}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", type=Path, help="the GGUF file llama-server loads")
    ap.add_argument("--tokenizer", required=True, help="model whose tokenizer and chat template make the prompts "
                    "(checkpoint, Hugging Face folder or alias); the GGUF's own model")
    ap.add_argument("--limit", type=int, default=0, help="first N problems from --start (0: all to the end)")
    ap.add_argument("--start", type=int, default=0, help="skip the first S problems (split a long run into parts)")
    ap.add_argument("--parallel", type=int, default=8, help="server slots and requests in flight")
    ap.add_argument("--ctx-per-slot", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1, help="llama-server --threads and --threads-batch")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--check", type=int, default=3, help="problems whose prompt tokens are checked against the server's")
    ap.add_argument("--chat", choices=("auto", "yes", "no"), default="auto")
    ap.add_argument("--out", type=Path, help="write the result (per-problem statuses and completions) here as JSON; "
                    "each problem's outcome is appended beside it (.jsonl) as soon as it is tested")
    args = ap.parse_args()
    if args.start < 0 or args.limit < 0:
        ap.error("--start and --limit take counts of problems, 0 or more")

    from bitsmith.eval.remote import ServerError
    from bitsmith.eval.tasks import has_chat_template
    from bitsmith.models import open_source

    if not args.gguf.is_file():
        print(f"error: {args.gguf} is not a file; give the GGUF that llama-server should load", file=sys.stderr)
        return 2
    tokenizer = open_source(args.tokenizer).tokenizer()
    chat = has_chat_template(tokenizer) if args.chat == "auto" else args.chat == "yes"
    server = start_llama_server(args.gguf, args.parallel, args.ctx_per_slot, args.threads)
    try:
        server.wait()
        row = run(args, server.url, tokenizer, chat)
        row["server_cpu_s"] = server_cpu_s(server)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()
    row |= {"gguf": str(args.gguf), "tokenizer": args.tokenizer, "chat": chat, "parallel": args.parallel,
            "threads": args.threads, "load": os.getloadavg(), "command": "python bench/humaneval_server.py " + " ".join(sys.argv[1:])}
    print(f"HumanEval pass@1 {row['pass_at_1']:.1%} ({row['passed']}/{row['n']}; " + ", ".join(f"{k} {v}" for k, v in row["status"].items())
          + f"), {row['wall_s']:.1f} s wall, {row['generated']} tokens generated, server CPU {row['server_cpu_s']:.1f} s", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
