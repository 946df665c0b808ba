"""Offloaded execution vs fully resident: tokens/s, peak RSS and whether greedy output is identical.

For each model a w4g128 RTN checkpoint is made once (in --workdir, reused when present). Each run is
a fresh process (so its peak RSS is its own): load the checkpoint, greedily generate --tokens new
tokens from a fixed prompt, report prefill and decode speed. The offloaded run gets
``--max-memory`` = half the checkpoint's quantized decoder-block bytes (what ``max_memory`` budgets:
embeddings, lm_head and norms stay resident either way), so about half the blocks are streamed from
the memory-mapped checkpoint on every forward pass.

    .venv/bin/python bench/offload.py --models smollm2-135m,qwen2.5-coder-1.5b
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import work_dir

PROMPT = "The history of the printing press begins"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-1.5b")
    ap.add_argument("--spec", default="w4g128")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per run (greedy, no stop at EOS)")
    ap.add_argument("--fraction", type=float, default=0.5, help="max_memory as a fraction of the block bytes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None, help="checkpoint folder (default: work_dir('offload'), ~/.cache/bitsmith/bench)")
    ap.add_argument("--child", nargs=2, metavar=("CHECKPOINT", "MAX_MEMORY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(Path(args.child[0]), int(args.child[1]), args.tokens, args.threads)
        return
    rows = []
    for model in args.models.split(","):
        ckpt = _checkpoint(model, args.spec, args.workdir or work_dir("offload"))
        blocks = _block_bytes(ckpt)
        file_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
        for label, budget in (("resident", 0), (f"offload {args.fraction:g}x", int(blocks * args.fraction))):
            out = subprocess.run([sys.executable, __file__, "--child", str(ckpt), str(budget), "--tokens",
                                  str(args.tokens), "--threads", str(args.threads)],
                                 check=True, capture_output=True, text=True).stdout
            rows.append({"model": model, "run": label, "file_mb": file_bytes / 1e6, "blocks_mb": blocks / 1e6,
                         "max_memory_mb": budget / 1e6 if budget else None, **json.loads(out.strip().splitlines()[-1])})
            print(f"{model} {label}: {rows[-1]['decode_tok_s']:.2f} tok/s", file=sys.stderr, flush=True)
    _table(rows, args)


def _checkpoint(model: str, spec: str, workdir: Path) -> Path:
    """The model's ``spec`` RTN checkpoint in ``workdir``, quantized once (plain min/max ranges: speed only)."""
    import bitsmith

    path = workdir / f"{model}-{spec}"
    if not (path / "bitsmith.json").is_file():
        workdir.mkdir(parents=True, exist_ok=True)
        bitsmith.quantize(model, path, spec, "rtn", options={"clip_search": False}, overwrite=True)
    return path


def _block_bytes(ckpt: Path) -> int:
    """Quantized decoder-block bytes, the quantity ``max_memory`` budgets (the plan with no limit)."""
    from bitsmith.io.checkpoint import read_info
    from bitsmith.io.packed import PACKED_PARTS
    from bitsmith.runtime.offload import tensor_index  # the sizes the offload planner uses

    info = read_info(ckpt)
    index = tensor_index(ckpt)
    return sum(index.get(f"{m}.{part}", (None, 0))[1] for m in info.specs if ".layers." in m for part in PACKED_PARTS)


def _child(ckpt: Path, max_memory: int, tokens: int, threads: int) -> None:
    import torch

    from bitsmith.infer.generate import generate
    from bitsmith.runtime.load import load_model

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    loaded = load_model(ckpt, max_memory=max_memory or None)
    load_s = time.perf_counter() - t0
    result = generate(loaded.model, loaded.tokenizer, PROMPT, max_new_tokens=tokens, stop_at_eos=False)
    plan = loaded.offload
    print(json.dumps({
        "load_s": load_s, "prefill_tok_s": result.prefill_tok_s, "decode_tok_s": result.decode_tok_s,
        "new_tokens": result.new_tokens, "token_ids": list(result.token_ids),
        "streamed": None if plan is None else len(plan.streamed),
        "blocks": None if plan is None else len(plan.block_bytes),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,  # KiB on Linux
        "text": result.text,
    }))


def _table(rows: list[dict], args: argparse.Namespace) -> None:
    import os

    print(f"\n{args.spec} RTN checkpoints, greedy, {args.tokens} new tokens, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}; prompt {PROMPT!r}")
    print(f"{'model':<20} {'run':<14} {'file MB':>8} {'blocks MB':>9} {'max-mem MB':>10} {'streamed':>9} "
          f"{'prefill t/s':>11} {'decode t/s':>10} {'ratio':>6} {'peak RSS MB':>11} {'same tokens':>11}")
    base: dict[str, dict] = {}
    for r in rows:
        ref = base.setdefault(r["model"], r)
        streamed = "-" if r["streamed"] is None else f"{r['streamed']}/{r['blocks']}"
        same = "ref" if r is ref else ("yes" if r["token_ids"] == ref["token_ids"] else "NO")
        mm = "-" if r["max_memory_mb"] is None else f"{r['max_memory_mb']:.1f}"
        print(f"{r['model']:<20} {r['run']:<14} {r['file_mb']:8.1f} {r['blocks_mb']:9.1f} {mm:>10} {streamed:>9} "
              f"{r['prefill_tok_s']:11.1f} {r['decode_tok_s']:10.2f} {r['decode_tok_s'] / ref['decode_tok_s']:6.2f} "
              f"{r['peak_rss_mb']:11.0f} {same:>11}")
    for r in rows:
        print(f"{r['model']} {r['run']}: {r['text']!r}")


if __name__ == "__main__":
    main()
