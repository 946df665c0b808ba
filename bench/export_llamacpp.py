"""llama.cpp checks of `bitsmith export --to gguf` (a benchmark, not a test; run on demand):

    .venv/bin/python bench/export_llamacpp.py [--models smollm2-135m gemma3-270m] [--bin LLAMA_BIN_DIR]

For each model: quantize with bitsmith (w4g32 RTN, which Q4_1 holds exactly), `bitsmith export --to
gguf` (exact re-encoding of the codes), then with llama.cpp's own tools (built from the
llama-cpp-python sdist by `make bench-tools`; bench/tools.py finds them):
  1. llama-simple: greedy continuation of a prompt (printed: read it) and the count of warning lines
     in its model-load log;
  2. llama-perplexity at ctx 512 on the PROTOCOL prose slice (first 60,000 chars of Pride and
     Prejudice), against bitsmith's own forward pass of the *checkpoint* on the same tokens and
     positions.

Like with like: llama-perplexity tokenizes the whole text (adding BOS first when the GGUF says
add_bos), cuts it into chunks of n_ctx tokens, overwrites the first token of every chunk with BOS when
add_bos, and scores only the second half of each chunk: logits at positions n_ctx/2-1 .. n_ctx-2
predicting tokens n_ctx/2 .. n_ctx-1 (255 per chunk at ctx 512). `bitsmith_llama_ppl` below rebuilds
exactly those chunks from the HF tokenizer and scores exactly those positions. The table also shows
`bitsmith eval`'s PROTOCOL number (every position of every window) to show the two protocols differ.
Work files go to $WORK (default: bench/common.work_dir, ~/.cache/bitsmith/bench/export-llamacpp).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

import tools
from common import text_path, work_dir

ROOT = Path(__file__).resolve().parents[1]
PROSE = text_path()  # first 60,000 chars of Pride and Prejudice, shipped in bitsmith/data
PROMPTS = {"smollm2-135m": "The capital of France is", "gemma3-270m": "The capital of France is"}


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def gguf_add_bos(path: Path) -> tuple[bool, int | None]:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    f = r.fields.get("tokenizer.ggml.add_bos_token")
    b = r.fields.get("tokenizer.ggml.bos_token_id")
    add = bool(f.contents()) if f is not None else False
    return add, (int(b.contents()) if b is not None else None)


def main_type(path: Path) -> str:
    """The GGUF type holding most of the file's matrix weights."""
    from collections import Counter

    from gguf import GGUFReader

    counts = Counter()
    for t in GGUFReader(str(path)).tensors:
        if len(t.shape) > 1:
            counts[t.tensor_type.name] += int(t.n_elements)
    return counts.most_common(1)[0][0]


def bitsmith_llama_ppl(ckpt: Path, text: str, ctx: int, add_bos: bool, bos: int | None) -> tuple[float, int, float]:
    """(ppl on llama-perplexity's chunks and positions, scored tokens, PROTOCOL ppl on whole windows)."""
    import bitsmith
    from bitsmith.eval.perplexity import convention_adds_bos, evaluate, tokenize_text, windows

    loaded = bitsmith.load(ckpt)
    ids_plain = tokenize_text(loaded.tokenizer, text, add_bos=False)
    ids = [bos] + ids_plain if add_bos else list(ids_plain)
    n = len(ids) // ctx
    chunks = torch.tensor(ids[: n * ctx]).reshape(n, ctx)
    if add_bos:
        chunks[:, 0] = bos
    first = ctx // 2
    nll, count = 0.0, 0
    with torch.inference_mode():
        for chunk in chunks:
            logits = loaded.model(input_ids=chunk.unsqueeze(0), use_cache=False).logits[0].double()  # [ctx, V]
            lp = torch.log_softmax(logits[first - 1 : ctx - 1], dim=-1)  # predicts tokens first..ctx-1
            nll -= lp.gather(1, chunk[first:].unsqueeze(1)).sum().item()
            count += ctx - first
    # the PROTOCOL number, windows built as bitsmith eval builds them (eval/suite.py): every position
    tok = loaded.tokenizer
    wins = windows(ids_plain, ctx, bos=tok.bos_token_id if convention_adds_bos(tok) else None)
    full = evaluate(loaded.model, wins).as_dict()["ppl"]
    return math.exp(nll / count), count, float(full)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--spec", default="w4g32")
    ap.add_argument("--bin", default=None, help="folder of llama.cpp's binaries (default: bench/tools.py's, from `make bench-tools`)")
    ap.add_argument("--ctx", type=int, default=512)
    args = ap.parse_args()
    args.bin = args.bin or str(tools.llama_bin("llama-perplexity").parent)  # fails early, naming the fix
    work = Path(os.environ.get("WORK") or work_dir("export-llamacpp"))
    work.mkdir(parents=True, exist_ok=True)
    text = PROSE.read_text(encoding="utf-8")[:60000]
    text_file = work / "pp60k.txt"
    text_file.write_text(text, encoding="utf-8")
    py = [sys.executable, "-m", "bitsmith"]
    rows = []
    for model in args.models:
        ckpt = work / f"{model}-{args.spec}"
        gguf_file = work / f"{model}-{args.spec}.gguf"
        if not ckpt.exists():
            r = sh(py + ["quantize", model, "--spec", args.spec, "--out", str(ckpt)])
            if r.returncode:
                print(r.stderr[-2000:])
                return 1
        if not gguf_file.exists():
            r = sh(py + ["export", str(ckpt), "--to", "gguf", "--out", str(gguf_file)])
            if r.returncode:
                print(r.stderr[-2000:])
                return 1
        qtype = main_type(gguf_file)
        simple = sh([f"{args.bin}/llama-simple", "-m", str(gguf_file), "-n", "40", PROMPTS.get(model, "Once upon a time")])
        warns = [ln for ln in simple.stderr.splitlines() if re.search(r"warn|\bW\b", ln, re.I)]
        print(f"== {model}: llama-simple (greedy, 40 tokens); {len(warns)} warning lines in the load log")
        print(simple.stdout.strip(), flush=True)
        for ln in warns[:10]:
            print("   ", ln)
        ppl_run = sh([f"{args.bin}/llama-perplexity", "-m", str(gguf_file), "-f", str(text_file), "-c", str(args.ctx), "-t", "2"])
        m = re.search(r"Final estimate: PPL = ([\d.]+)", ppl_run.stdout + ppl_run.stderr)
        chunks = re.search(r"perplexity over (\d+) chunks", ppl_run.stdout + ppl_run.stderr)
        llama_ppl = float(m.group(1)) if m else float("nan")
        add_bos, bos = gguf_add_bos(gguf_file)
        ours, scored, full = bitsmith_llama_ppl(ckpt, text, args.ctx, add_bos, bos)
        rows.append((model, args.spec, qtype, add_bos, chunks.group(1) if chunks else "?", scored // (args.ctx - args.ctx // 2),
                     llama_ppl, ours, 100 * (llama_ppl - ours) / ours, full))
        print(f"{model}: llama.cpp ppl {llama_ppl:.4f}, bitsmith ppl on the same positions {ours:.4f} "
              f"({rows[-1][8]:+.2f} %), bitsmith eval (PROTOCOL) {full:.4f}", flush=True)
    print()
    print("| model | checkpoint | GGUF type | add_bos | llama.cpp chunks | bitsmith chunks | llama.cpp ppl | bitsmith ppl (same positions) | diff % | bitsmith eval ppl (PROTOCOL, all positions) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]:.4f} | {r[7]:.4f} | {r[8]:+.2f} | {r[9]:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
