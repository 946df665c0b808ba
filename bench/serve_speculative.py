"""`bitsmith serve --draft` against `bitsmith serve` without one: same greedy text, and the speed ratio.

Starts two servers on the same checkpoint (one with ``--draft DRAFT --draft-k K``), each on ``--threads``
threads, and sends each of ``--prompts`` HumanEval prompts to both as a non-streamed greedy completion
(``temperature 0``, ``--max-tokens`` new tokens, no logprobs: the case the scheduler decodes speculatively,
a lone decoding sequence), one request at a time, the order alternating per prompt so load on a shared
machine hits both alike. Prints per prompt whether the two texts are identical and both request times;
then the totals (completion tokens per second of request time, which includes each prompt's prefill) and
the draft server's /health counters (rounds, acceptance).

    python bench/serve_speculative.py --model CKPT --draft CKPT3 --draft-k 3 --prompts 5 --max-tokens 16 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from probe_ladder import free_port, wait_healthy


def start(model: str, threads: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "bitsmith.cli", "serve", model, "--port", str(port), "--log-level", "warning", *extra]
    print("  $", " ".join(cmd), flush=True)
    env = {**os.environ, "BITSMITH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, "bitsmith serve", limit=600)
    return proc, url


def complete(url: str, prompt: str, max_tokens: int) -> tuple[str, int, float]:
    import httpx

    model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/completions", timeout=600,
                   json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    r.raise_for_status()
    body = r.json()
    return body["choices"][0]["text"], body["usage"]["completion_tokens"], time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the target checkpoint")
    ap.add_argument("--draft", required=True, help="draft checkpoint or spec (serve --draft)")
    ap.add_argument("--draft-k", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="write serve_speculative.json here")
    args = ap.parse_args()

    import httpx

    from bitsmith.eval.humaneval import load_problems

    prompts = [p.prompt for p in load_problems()][: args.prompts]
    plain, plain_url = start(args.model, args.threads, [])
    spec, spec_url = start(args.model, args.threads, ["--draft", args.draft, "--draft-k", str(args.draft_k)])
    rows = []
    try:
        for url in (plain_url, spec_url):  # warm-up: plans, kernels, the draft's runner
            complete(url, prompts[0], 4)
        for i, prompt in enumerate(prompts):
            order = [("plain", plain_url), ("draft", spec_url)]
            got = {name: complete(url, prompt, args.max_tokens) for name, url in (order if i % 2 == 0 else order[::-1])}
            rows.append({"prompt": i, "identical": got["plain"][0] == got["draft"][0],
                         "tokens": got["plain"][1], "draft_tokens": got["draft"][1],
                         "plain_s": got["plain"][2], "draft_s": got["draft"][2]})
            print(f"  prompt {i:2d}: identical {rows[-1]['identical']}, {got['plain'][1]} tokens, "
                  f"plain {got['plain'][2]:.2f} s, with draft {got['draft'][2]:.2f} s", flush=True)
        health = httpx.get(spec_url + "/health", timeout=10).json()
    finally:
        for proc in (plain, spec):
            proc.terminate()
            proc.wait(timeout=60)
    tokens = sum(r["tokens"] for r in rows)
    plain_s, draft_s = sum(r["plain_s"] for r in rows), sum(r["draft_s"] for r in rows)
    print(f"\nserve: {sum(r['identical'] for r in rows)}/{len(rows)} completions identical; plain {tokens / plain_s:.2f} "
          f"tok/s, with draft {sum(r['draft_tokens'] for r in rows) / draft_s:.2f} tok/s (request time, prefill "
          f"included) -> {plain_s / draft_s:.2f}x; {args.threads} threads, k={args.draft_k}")
    print("draft server /health:", json.dumps(health))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serve_speculative.json").write_text(json.dumps({"rows": rows, "health": health}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
