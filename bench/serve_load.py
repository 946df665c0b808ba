"""Load on `bitsmith serve` next to llama.cpp's `llama-server` serving the same model at the same bits.

For each server (bitsmith: a w4g128 checkpoint; llama-server: the Q4_0 GGUF of the same weights, both
4-bit with 32/128-weight groups, both on this machine's CPU threads), and for 1, 4 and 16 concurrent
clients: every client sends ``--requests`` streamed greedy completions one after another (distinct
prose prompts from the shipped Pride and Prejudice text, ``--max-tokens`` new tokens). Reported per
phase: aggregate completion tokens/s (all tokens over the phase's wall time), p50/p99 time to first
token, p50/p99 per-token latency (gaps between streamed tokens, pooled over requests), failures.

Then, bitsmith only: overload (a server with a small ``--max-batch``/``--max-queue`` and more concurrent
clients than both hold: every answer must be 200 or a JSON 429 ``queue_full``), and 200 malformed
requests (bad JSON, wrong types, huge max_tokens, unknown model, prompt over the context, ...): each
must get a JSON error and the server must still answer /health and a good request afterwards.

The load clients run in this process (asyncio + httpx) on the same CPU as the server. Usage:

    python bench/serve_load.py --clients 1,4,16 --requests 2 --max-tokens 32 --out bench/results/serve
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

import tools
from common import text_path, work_dir

MODEL = "smollm2-135m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoint(spec: str) -> Path:
    path = work_dir("speed") / f"{MODEL}-{spec}"
    if not (path / "bitsmith.json").exists():
        subprocess.run([sys.executable, "-m", "bitsmith.cli", "quantize", MODEL, "--spec", spec, "--method", "rtn",
                        "--out", str(path)], check=True)
    return path


def prompts(n: int, chars: int = 320) -> list[str]:
    text = text_path().read_text(encoding="utf-8")
    start = 2000
    step = (len(text) - start - chars) // max(n, 1)
    return [" ".join(text[start + i * step : start + i * step + chars].split()) for i in range(n)]


class Server:
    """A server subprocess on a free port, ready once /health answers 200."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict | None = None) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(work_dir("serve") / f"{name}.log", "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not become healthy in {timeout:.0f} s")

    def stop(self) -> int:
        self.proc.terminate()  # SIGTERM: the graceful path
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()


def bitsmith_server(ckpt: Path, batch: int, queue: int, threads: int) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "bitsmith.cli", "serve", str(ckpt), "--port", str(port), "--name", MODEL,
            "--max-batch", str(batch), "--max-queue", str(queue), "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "BITSMITH_THREADS": str(threads)}  # torch ops and kernels
    return Server(f"bitsmith-b{batch}-q{queue}", argv, port, env)


def llama_server(gguf: Path, slots: int, ctx_per_slot: int, threads: int) -> Server:
    port = free_port()
    argv = [str(tools.llama_bin("llama-server")), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-np", str(slots), "-c", str(slots * ctx_per_slot), "-t", str(threads), "-a", MODEL]
    return Server("llama-server", argv, port)


async def one_request(http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, usage = [], None
    try:
        async with http.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"ok": False, "status": r.status_code}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"].get("completion_tokens")
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    times.append(time.perf_counter())
    except httpx.HTTPError as exc:
        return {"ok": False, "status": type(exc).__name__}
    if not times:
        return {"ok": False, "status": "no tokens"}
    return {"ok": True, "ttft": times[0] - start, "gaps": [b - a for a, b in zip(times, times[1:])],
            "tokens": usage or len(times), "end": times[-1]}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def phase(url: str, clients: int, requests: int, max_tokens: int, texts: list[str]) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        async def client(c: int) -> list[dict]:
            return [await one_request(http, url, texts[(c * requests + r) % len(texts)], max_tokens)
                    for r in range(requests)]

        start = time.perf_counter()
        results = [x for xs in await asyncio.gather(*(client(c) for c in range(clients))) for x in xs]
        wall = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    gaps = [g for r in ok for g in r["gaps"]]
    ttft = [r["ttft"] for r in ok]
    return {"clients": clients, "requests": len(results), "failed": len(results) - len(ok),
            "failures": sorted({str(r["status"]) for r in results if not r["ok"]}), "tokens": tokens,
            "wall_s": wall, "tok_s": tokens / wall, "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
            "itl_p50": pct(gaps, 0.5), "itl_p99": pct(gaps, 0.99)}


async def overload(url: str, clients: int) -> dict:
    body = {"model": MODEL, "prompt": "It is a truth universally acknowledged", "max_tokens": 8, "temperature": 0}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        async def one() -> str:
            r = await http.post(url + "/v1/completions", json=body)
            if r.status_code == 200:
                return "200"
            try:
                code = r.json()["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = "not JSON"
            return f"{r.status_code} {code}"

        outcomes = await asyncio.gather(*(one() for _ in range(clients)))
    return {o: outcomes.count(o) for o in sorted(set(outcomes))}


def malformed_bodies(n: int, context: int) -> list[tuple[str, bytes]]:
    good = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
    kinds = [
        ("bad JSON", b'{"model": "smollm2-135m", "prompt": '),
        ("not an object", b"[1, 2, 3]"),
        ("empty body", b""),
        ("prompt wrong type", json.dumps({**good, "prompt": {"text": "hi"}}).encode()),
        ("max_tokens wrong type", json.dumps({**good, "max_tokens": "many"}).encode()),
        ("temperature wrong type", json.dumps({**good, "temperature": [1]}).encode()),
        ("huge max_tokens", json.dumps({**good, "max_tokens": 10**12}).encode()),
        ("negative max_tokens", json.dumps({**good, "max_tokens": -5}).encode()),
        ("unknown model", json.dumps({**good, "model": "gpt-9"}).encode()),
        ("prompt over the context", json.dumps({**good, "prompt": "word " * (context + 10)}).encode()),
    ]
    return [kinds[i % len(kinds)] for i in range(n)]


def malformed(url: str, n: int, context: int) -> dict:
    counts: dict[str, int] = {}
    json_errors = 0
    with httpx.Client(base_url=url, timeout=120) as http:
        for kind, body in malformed_bodies(n, context):
            r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            try:
                is_error = 400 <= r.status_code < 500 and bool(r.json()["error"]["message"])
            except (ValueError, KeyError, TypeError):
                is_error = False
            json_errors += is_error
            counts[f"{kind} -> {r.status_code}"] = counts.get(f"{kind} -> {r.status_code}", 0) + 1
        healthy = http.get("/health").status_code == 200
        good = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 4}).status_code
    return {"sent": n, "json_4xx_errors": json_errors, "by_kind": counts, "healthy_after": healthy,
            "good_request_after": good}


def step_timing(ckpt: Path, sizes: list[int], threads: int, reps: int = 3) -> list[dict]:
    """The batching choice, measured in-process: one decode step for B sequences (prompts of different
    lengths) as serve/batch.py's batched step (linears once for all rows, attention per sequence) and as
    B separate runner steps (the fused native single-sequence decode), interleaved, best of 3 rounds."""
    import torch

    from bitsmith.infer.lean import lean_runner
    from bitsmith.runtime.load import load_model
    from bitsmith.runtime.options import RuntimeOptions
    from bitsmith.serve.batch import decode_step

    torch.set_num_threads(threads)
    model = load_model(ckpt).model.eval()
    rows = []
    for b in sizes:
        runners = [lean_runner(model, 512, RuntimeOptions()) for _ in range(b)]
        best = {"per-sequence": float("inf"), "batched": float("inf")}
        with torch.inference_mode():
            for i, r in enumerate(runners):
                r(torch.arange(60 + 7 * i) % 1000 + 100)
            runs = {"per-sequence": lambda: [r.forward([5]) for r in runners],
                    "batched": lambda: decode_step(runners, [5] * b)}
            for _ in range(3):
                for name, run in runs.items():
                    start = time.perf_counter()
                    for _ in range(reps):
                        run()
                    best[name] = min(best[name], (time.perf_counter() - start) / reps)
        row = {"batch": b, **{f"{k}_ms": v * 1e3 for k, v in best.items()},
               **{f"{k}_tok_s": b / v for k, v in best.items()}}
        print(f"B={b:2d}  per-sequence {row['per-sequence_ms']:7.1f} ms/step ({row['per-sequence_tok_s']:5.1f} tok/s)  "
              f"batched {row['batched_ms']:7.1f} ms/step ({row['batched_tok_s']:5.1f} tok/s)", flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| server | clients | requests | failed | tokens | agg tok/s | TTFT p50 (s) | TTFT p99 (s) | "
             "per-token p50 (ms) | per-token p99 (ms) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['failed']} | {r['tokens']} | "
                     f"{r['tok_s']:.1f} | {r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | {r['itl_p50'] * 1e3:.0f} | "
                     f"{r['itl_p99'] * 1e3:.0f} |")
    return "\n".join(lines)


def load_rows(server: Server, name: str, args: argparse.Namespace, texts: list[str]) -> list[dict]:
    server.wait()
    asyncio.run(phase(server.url, 1, 1, 4, texts))  # warm-up: kernels, caches, first-request costs
    rows = []
    for c in args.clients:
        row = {"server": name, **asyncio.run(phase(server.url, c, args.requests, args.max_tokens, texts))}
        print(table([row]).splitlines()[-1], flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=2, help="requests per client per phase")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="CPU threads of each server (llama-server -t; bitsmith's torch and kernel threads)")
    p.add_argument("--servers", default="bitsmith,llama-server")
    p.add_argument("--malformed", type=int, default=200)
    p.add_argument("--step-timing", default="", help="batch sizes for the in-process decode-step timing "
                   "(batched vs per-sequence), e.g. 1,4,8,16; empty: skip")
    p.add_argument("--out", default=None, help="folder for serve_load.json and serve_load.md")
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    texts = prompts(max(args.clients) * args.requests)
    batch = max(args.clients)
    rows, extra = [], {}
    if args.step_timing:
        extra["step_timing"] = step_timing(checkpoint("w4g128"), [int(b) for b in args.step_timing.split(",")],
                                           args.threads)
    if "bitsmith" in args.servers:
        server = bitsmith_server(checkpoint("w4g128"), batch, 4 * batch, args.threads)
        try:
            rows += load_rows(server, "bitsmith w4g128", args, texts)
            extra["malformed"] = malformed(server.url, args.malformed, httpx.get(server.url + "/v1/models").json()["data"][0]["context_length"])
            print(json.dumps(extra["malformed"], indent=1), flush=True)
        finally:
            extra["exit_code_on_sigterm"] = server.stop()
        server = bitsmith_server(checkpoint("w4g128"), 2, 2, args.threads)
        try:
            server.wait()
            extra["overload"] = {"max_batch": 2, "max_queue": 2, "clients": 12,
                                 "outcomes": asyncio.run(overload(server.url, 12))}
            print(json.dumps(extra["overload"]), flush=True)
        finally:
            server.stop()
    if "llama-server" in args.servers:
        from speed import ggufs

        try:
            gguf = ggufs(work_dir("speed"), MODEL, ["Q4_0"])["Q4_0"]
            server = llama_server(gguf, batch, 512, args.threads)
        except tools.ToolMissing as exc:
            print(f"llama-server rows skipped: {exc}", flush=True)
        else:
            try:
                rows += load_rows(server, "llama-server Q4_0", args, texts)
            finally:
                server.stop()
    text = table(rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"args": vars(args), "loadavg_at_end": os.getloadavg(), "cpus": os.cpu_count()}
        (out / "serve_load.json").write_text(json.dumps({"rows": rows, **extra, **meta}, indent=1) + "\n")
        (out / "serve_load.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
