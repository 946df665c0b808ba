"""Does ``bitsmith probe`` tell llama.cpp's quantization levels apart from the outside?

For each GGUF type (default Q8_0, Q4_K_M, Q3_K_M, Q2_K) of one model: make the file with
``llama-quantize`` from an F16 GGUF of the alias's own weights (the same requantization bench/speed.py's
``ggufs()`` does: alias GGUF -> F16 -> type, so every file and bitsmith's reference share one set of
weights), start ``llama-server`` on it on a free localhost port, run ``bitsmith probe`` against it
in-process (stepwise teacher forcing: llama-server does not echo prompt log-probabilities), stop it.
Prints one row per endpoint: the probe's bits estimate and interval, the rung it names, the pooled top-k
KL and top-1, and the probe's time per endpoint; then whether the ranking is right and each named level
is within one rung of the type's nominal level (Q8_0 -> w8, Q4_K_M -> w4g128, Q3_K_M -> w3g128,
Q2_K -> w2g64).

    python bench/probe_ladder.py --model smollm2-135m --positions 128 --out bench/results/probe

The ladder is computed on the first endpoint's run and cached (``~/.cache/bitsmith/probe``), so later
endpoints cost only their own requests and the reference's forward.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import tools
from common import work_dir

EXPECTED = {"Q8_0": "w8", "Q6_K": "w8", "Q5_K_M": "w4g128", "Q4_K_M": "w4g128", "Q4_0": "w4g128",
            "Q3_K_M": "w3g128", "Q3_K_S": "w3g128", "Q2_K": "w2g64"}
RUNGS = ["w8", "w4g128", "w3g128", "w2g64"]


def make_ggufs(model: str, types: list[str]) -> dict[str, Path]:
    """alias GGUF -> F16 -> each type, cached under bench/common.work_dir('speed')/gguf: speed.py's files."""
    from speed import ggufs

    return ggufs(work_dir("speed"), model, types)


def start_server(gguf: Path, threads: int, ctx: int) -> tuple[subprocess.Popen, str]:
    """llama-server on gguf at a free localhost port, once /health answers 200."""
    import httpx

    port = free_port()
    cmd = [str(tools.llama_bin("llama-server")), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "-c", str(ctx), "-np", "1"]
    print("  $", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("llama-server did not become healthy in 120 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--types", default="Q8_0,Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--positions", type=int, default=128, help="predictions per text")
    ap.add_argument("--topk", type=int, default=20)
    ap.add_argument("--texts", default="prose,code")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="folder for probe_<model>.json and .md")
    args = ap.parse_args()

    from bitsmith.probe.run import ProbeConfig, probe

    types = args.types.split(",")
    files = make_ggufs(args.model, types)
    rows = []
    for t in types:
        print(f"{t}: {files[t].name} ({files[t].stat().st_size / 1e6:.0f} MB)", flush=True)
        proc, url = start_server(files[t], args.threads, 2 * (args.positions + 8))
        try:
            t0 = time.perf_counter()
            report = probe(ProbeConfig(url=url, reference=args.model, texts=tuple(args.texts.split(",")),
                                       positions=args.positions, k=args.topk)).as_json()
            wall = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        o = report["overall"]
        rows.append({"type": t, "bits": o["bits"], "bits_interval": o["bits_interval"], "nearest": o["nearest"],
                     "placement": o["placement"], "kl": o["kl"], "top1": o["top1"], "wall_s": wall,
                     "timing_s": report["timing_s"], "verdict": report["verdict"], "report": report})
        print(f"  {report['verdict']}  (KL {o['kl']:.4g}, top-1 {o['top1']:.1%}, {wall:.1f} s)", flush=True)
    _summary(args, rows)


def _summary(args: argparse.Namespace, rows: list[dict]) -> None:
    ladder = rows[0]["report"]["overall"]["ladder"]
    lines = [f"model {args.model}, {args.positions} positions x {args.texts}, top-{rows[0]['report']['k']}, "
             f"mode {rows[0]['report']['mode']}",
             "ladder (reference's RTN rungs, same positions): "
             + ", ".join(f"{r} KL {ladder[r]['kl']:.4g} top-1 {ladder[r]['top1']:.1%}" for r in ladder),
             "", "| endpoint | probe says | bits (90% interval) | nearest rung | expected | KL>= | top-1 | probe s | of which ladder s |",
             "|---|---|---|---|---|---|---|---|---|"]
    ok_rank = all(a["bits"] >= b["bits"] for a, b in zip(rows, rows[1:]))
    ok_step = True
    for r in rows:
        expected = EXPECTED.get(r["type"], "?")
        step = abs(RUNGS.index(r["nearest"]) - RUNGS.index(expected)) if expected in RUNGS else 99
        ok_step &= step <= 1
        lo, hi = r["bits_interval"]
        lines.append(f"| llama-server {r['type']} | {r['placement']} | {r['bits']:.2f} ({lo:.2f}-{hi:.2f}) | "
                     f"{r['nearest']} | {expected} | {r['kl']:.4g} | {r['top1']:.1%} | {r['wall_s']:.1f} | "
                     f"{r['timing_s']['ladder_s']:.1f} |")
    lines += ["", f"ranking by bits matches the types' order: {ok_rank}; every nearest rung within one step of the "
              f"expected: {ok_step}"]
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"probe_{args.model}.md").write_text(text + "\n")
        (args.out / f"probe_{args.model}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
