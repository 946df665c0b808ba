"""Does ``bitsmith probe`` tell llama.cpp's quantization levels apart from the outside?

For each GGUF type (default Q8_0, Q4_K_M, Q3_K_M, Q2_K) of one model: make the file with
``llama-quantize`` from an F16 GGUF of the alias's own weights (the same requantization bench/speed.py's
``ggufs()`` does: alias GGUF -> F16 -> type, so every file and bitsmith's reference share one set of
weights), start ``llama-server`` on it on a free localhost port, run ``bitsmith probe`` against it
in-process (stepwise teacher forcing: llama-server does not echo prompt log-probabilities), stop it.
With ``--bitsmith SPEC=CKPT,...`` it does the same against ``bitsmith serve CKPT`` for each bitsmith
checkpoint (echo mode: prompt log-probabilities in one request per text).
Prints one row per endpoint: the probe's bits estimate and interval, the rung it names, the pooled top-k
KL and top-1, and the probe's time per endpoint; then whether the ranking is right and each named level
is within one rung of the type's nominal level (Q8_0 -> w8, Q4_K_M -> w4g128, Q3_K_M -> w3g128,
Q2_K -> w2g64) and of the rung nearest the file's measured bits per decoder weight (llama.cpp stores a
tensor whose rows are not a multiple of 256 in a legacy type instead: SmolLM2's 576-wide rows make its
"Q2_K" mostly Q4_0, ~4.2 bits per decoder weight).

    python bench/probe_ladder.py --model smollm2-135m --positions 128 --out bench/results/probe \
        --bitsmith w8=CKPT8,w4g128=CKPT4,w3g128=CKPT3,w2g64=CKPT2

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
from collections.abc import Callable
from pathlib import Path

import tools
from common import work_dir

EXPECTED = {"Q8_0": "w8", "Q6_K": "w8", "Q5_K_M": "w4g128", "Q4_K_M": "w4g128", "Q4_0": "w4g128",
            "Q3_K_M": "w3g128", "Q3_K_S": "w3g128", "Q2_K": "w2g64"}
RUNGS = ["w8", "w4g128", "w3g128", "w2g64"]


def free_port() -> int:
    """A localhost port nobody listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def decoder_bpw(gguf: Path) -> float:
    """Bits per weight of the file's 2-D tensors other than the embedding and output head (what the ladder's
    rungs quantize), from the header's byte counts."""
    from bitsmith.io.gguf.header import read_header

    tensors = [t for t in read_header(gguf).tensors if len(t.shape) == 2
               and not t.name.startswith(("token_embd", "output"))]
    return 8 * sum(t.n_bytes for t in tensors) / sum(t.shape[0] * t.shape[1] for t in tensors)


def checkpoint_bpw(ckpt: Path) -> float:
    """Bits per weight of a bitsmith checkpoint's decoder linears (codes, scales, zeros)."""
    from bitsmith.io.checkpoint import read_info

    info = read_info(ckpt)
    layers = [n for n in info.specs if ".layers." in n]
    bits = sum(info.specs[n].stored_bits(*info.shapes[n]) for n in layers)
    return bits / sum(info.shapes[n][0] * info.shapes[n][1] for n in layers)


def wait_healthy(proc: subprocess.Popen, url: str, what: str, limit: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{what} did not become healthy in {limit:.0f} s")


def start_bitsmith(ckpt: Path, threads: int) -> tuple[subprocess.Popen, str]:
    """``bitsmith serve ckpt`` at a free localhost port, once /health answers 200."""
    import os

    port = free_port()
    cmd = [sys.executable, "-m", "bitsmith.cli", "serve", str(ckpt), "--port", str(port), "--log-level", "warning"]
    print("  $", " ".join(cmd), flush=True)
    env = {**os.environ, "BITSMITH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, "bitsmith serve")
    return proc, url


def probe_one(args: argparse.Namespace, label: str, family: str, nominal: str, bpw: float,
              start: Callable[[], tuple[subprocess.Popen, str]]) -> dict:
    from bitsmith.probe.run import ProbeConfig, probe

    proc, url = start()
    try:
        t0 = time.perf_counter()
        report = probe(ProbeConfig(url=url, reference=args.model, texts=tuple(args.texts.split(",")),
                                   positions=args.positions, k=args.topk, ladder_method=args.ladder_method)).as_json()
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    o = report["overall"]
    ladder = o["ladder"]
    by_bits = min(ladder, key=lambda r: abs(ladder[r]["bits"] - bpw))
    print(f"  {report['verdict']}  (KL {o['kl']:.4g}, top-1 {o['top1']:.1%}, {wall:.1f} s)", flush=True)
    return {"type": label, "family": family, "nominal": nominal, "file_bpw": bpw, "by_bits": by_bits,
            "bits": o["bits"], "bits_interval": o["bits_interval"], "nearest": o["nearest"],
            "placement": o["placement"], "kl": o["kl"], "top1": o["top1"], "wall_s": wall,
            "timing_s": report["timing_s"], "verdict": report["verdict"], "report": report}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--types", default="Q8_0,Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--positions", type=int, default=128, help="predictions per text")
    ap.add_argument("--topk", type=int, default=20)
    ap.add_argument("--texts", default="prose,code")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="folder for probe_<model>.json and .md")
    ap.add_argument("--ladder-method", default="hqq", help="how the reference's rungs are made (hqq, rtn, rtn-clip)")
    ap.add_argument("--bitsmith", default="", help="SPEC=CKPT[,SPEC=CKPT]: also probe `bitsmith serve CKPT`")
    args = ap.parse_args()

    types = [t for t in args.types.split(",") if t]
    files = make_ggufs(args.model, types) if types else {}
    rows = []
    for t in types:
        bpw = decoder_bpw(files[t])
        print(f"{t}: {files[t].name} ({files[t].stat().st_size / 1e6:.0f} MB, {bpw:.3f} bits per decoder weight)",
              flush=True)
        rows.append(probe_one(args, t, "llama-server", EXPECTED.get(t, "?"), bpw,
                              lambda f=files[t]: start_server(f, args.threads, 2 * (args.positions + 8))))
    for item in [i for i in args.bitsmith.split(",") if i]:
        spec, _, ckpt = item.partition("=")
        bpw = checkpoint_bpw(Path(ckpt).expanduser())
        print(f"bitsmith {spec}: {ckpt} ({bpw:.3f} bits per decoder weight)", flush=True)
        rows.append(probe_one(args, spec, "bitsmith serve", spec, bpw,
                              lambda c=Path(ckpt).expanduser(): start_bitsmith(c, args.threads)))
    _summary(args, rows)


def _steps(a: str, b: str) -> int:
    return abs(RUNGS.index(a) - RUNGS.index(b)) if a in RUNGS and b in RUNGS else 99


def _summary(args: argparse.Namespace, rows: list[dict]) -> None:
    ladder = rows[0]["report"]["overall"]["ladder"]
    lines = [f"model {args.model}, {args.positions} positions x {args.texts}, top-{rows[0]['report']['k']}, "
             f"modes {sorted({r['report']['mode'] for r in rows})}",
             f"ladder (reference's {args.ladder_method} rungs, same positions): "
             + ", ".join(f"{r} ({ladder[r]['bits']:.2f} bpw) KL {ladder[r]['kl']:.4g} top-1 {ladder[r]['top1']:.1%}"
                         for r in ladder),
             "", "| endpoint | probe says | bits (90% interval) | nearest rung | nominal | file bpw | rung nearest that bpw "
             "| KL>= | top-1 | probe s | of which ladder s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    ok_rank, ok_nominal, ok_bpw = True, True, True
    for family in dict.fromkeys(r["family"] for r in rows):
        mine = [r for r in rows if r["family"] == family]  # in the order given: best first
        ok_rank &= all(a["bits"] >= b["bits"] for a, b in zip(mine, mine[1:]))
    for r in rows:
        ok_nominal &= _steps(r["nearest"], r["nominal"]) <= 1
        ok_bpw &= _steps(r["nearest"], r["by_bits"]) <= 1
        lo, hi = r["bits_interval"]
        lines.append(f"| {r['family']} {r['type']} | {r['placement']} | {r['bits']:.2f} ({lo:.2f}-{hi:.2f}) | "
                     f"{r['nearest']} | {r['nominal']} | {r['file_bpw']:.2f} | {r['by_bits']} | {r['kl']:.4g} | "
                     f"{r['top1']:.1%} | {r['wall_s']:.1f} | {r['timing_s']['ladder_s']:.1f} |")
    lines += ["", f"ranking within each family matches its order: {ok_rank}; every nearest rung within one step of "
              f"the nominal level: {ok_nominal}; of the rung nearest the file's bits per weight: {ok_bpw}"]
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"probe_{args.model}.md").write_text(text + "\n")
        (args.out / f"probe_{args.model}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
