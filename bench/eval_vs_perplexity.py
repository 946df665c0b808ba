"""Token-scoring throughput: `bitsmith eval` next to `llama-perplexity` on the same windows.

    python bench/eval_vs_perplexity.py --pair smollm2-135m=CKPT,GGUF --windows 8 --threads 2

For each pair (a bitsmith checkpoint and a GGUF of the same model at the same bits, e.g. w4g128 and
Q4_0) it scores the first ``--windows`` windows of 512 tokens of the evaluation prose and prints
tokens per second for:

- ``llama-perplexity -c 512 --chunks N``: the time from its "calculating perplexity" line to its
  final estimate (tokenization and model load excluded), over N x 512 tokens. It runs the whole
  window through the model but computes logits only for the second half (the half it scores);
- bitsmith, loaded as `bitsmith eval` loads it (``prefill`` ``exact`` unless ``--prefill`` says
  otherwise), with load and tokenization excluded, split into parts:
  ``forward`` (the model's logits for every position of each window), ``eval`` (what `bitsmith eval
  MODEL` runs: forward plus perplexity), ``eval --reference-cache`` (forward plus KL against a
  top-256 reference cache) and ``metrics with a reference`` (the exact KL, top-1 and both
  perplexities over the full vocabulary for one window's logits, without the reference's own forward,
  which a live ``--reference`` adds; the stand-in reference logits are the model's own, shifted by
  one position, since the cost does not depend on the values).

With ``--kl-base REF.gguf`` it also times ``llama-perplexity --kl-divergence`` against base logits
written once (untimed) from the unquantized model: llama.cpp's own scoring with a stored reference,
the like-for-like anchor of ``eval --reference-cache`` (it reads the full vocabulary's log-probs per
scored position, where bitsmith's cache keeps the top 256).

The reference cache is built from the model itself (only its cost is measured here; a real one comes
from the unquantized model). Nothing is asserted; times depend on the load, which the caller states.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import text_path  # noqa: E402
from tools import llama_bin  # noqa: E402

CTX = 512
# Positions scored per window: bitsmith every predicted one (docs/PROTOCOL.md); llama-perplexity only the
# second half's (tools/perplexity/perplexity.cpp: first = n_ctx/2, n_ctx - 1 - first tokens), computing
# the head for those positions only. The window columns compare the forwards; "scored tok/s" what each
# tool's number rests on.
SCORED_BITSMITH, SCORED_LLAMA = CTX - 1, CTX - 1 - CTX // 2


def _stamp(text: str, pattern: str) -> float:
    """Seconds since llama.cpp's log start of the first line matching ``pattern`` (min.sec.ms.us prefix)."""
    m = re.search(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) .*" + pattern, text, re.M)
    if m is None:
        raise RuntimeError(f"llama-perplexity printed no {pattern!r} line:\n{text[-2000:]}")
    minutes, seconds, ms, us = (int(g) for g in m.groups())
    return minutes * 60 + seconds + ms / 1e3 + us / 1e6


def _run(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, out.stdout + out.stderr


def llama_perplexity(gguf: str, windows: int, threads: int) -> dict:
    """Run llama-perplexity; scoring seconds from its own timestamps (min.sec.ms.us at line start)."""
    cmd = [str(llama_bin("llama-perplexity")), "-m", gguf, "-f", str(text_path()), "-c", str(CTX),
           "--chunks", str(windows), "-t", str(threads), "-tb", str(threads)]
    wall, text = _run(cmd)
    seconds = _stamp(text, "Final estimate") - _stamp(text, "calculating perplexity over")
    ppl = float(re.search(r"Final estimate: PPL = ([\d.]+)", text).group(1))
    # after its last timestamped line: printing, freeing the model, exiting (subtracted from the KL run)
    teardown = max(0.0, wall - _stamp(text, "Final estimate"))
    return {"seconds": seconds, "tokens": windows * CTX, "ppl_second_halves": ppl, "teardown_s": teardown}


def llama_kl(gguf: str, base_gguf: str, windows: int, threads: int, work: Path, teardown_s: float) -> dict:
    """``llama-perplexity --kl-divergence`` against a base-logits file written once from ``base_gguf``
    (untimed): llama.cpp's own way of scoring with a stored reference. Its KL statistics are printed
    without timestamps, so the scoring time is the process's wall time after its "computing over"
    line, less ``teardown_s`` (the plain run's time after its last timestamped line)."""
    exe = str(llama_bin("llama-perplexity"))
    base = work / f"{Path(base_gguf).stem}-{windows}x{CTX}.kld"
    if not base.exists():
        _run([exe, "-m", base_gguf, "-f", str(text_path()), "-c", str(CTX), "--chunks", str(windows),
              "-t", str(threads), "-tb", str(threads), "--kl-divergence-base", str(base)])
    wall, text = _run([exe, "-m", gguf, "-c", str(CTX), "--chunks", str(windows), "-t", str(threads),
                       "-tb", str(threads), "--kl-divergence-base", str(base), "--kl-divergence"])
    kld = re.search(r"Mean\s+KLD:\s+([\d.]+)", text)
    return {"seconds": wall - _stamp(text, "computing over") - teardown_s, "tokens": windows * CTX,
            "kld_second_halves": float(kld.group(1)) if kld else None}


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def load_scored(ckpt: str, prefill: str):
    """A checkpoint loaded as `bitsmith eval` loads it, with ``prefill`` as BITSMITH_PREFILL."""
    import os

    from bitsmith.runtime.load import load_model
    from bitsmith.runtime.options import RuntimeOptions

    options = RuntimeOptions.for_measurement({**os.environ, "BITSMITH_PREFILL": prefill})
    return load_model(ckpt, options=options)


def bitsmith_rows(ckpt: str, windows: int, prefill: str, reference=None) -> dict:
    import torch

    from bitsmith.eval.metrics import token_stats
    from bitsmith.eval.perplexity import eval_mode, evaluate, window_logits
    from bitsmith.eval.refcache import build_cache, evaluate_against_cache
    from bitsmith.eval.suite import text_windows

    loaded = load_scored(ckpt, prefill)
    model = loaded.model.eval()
    wins = text_windows(loaded.tokenizer, text_path().read_text(encoding="utf-8"), CTX, windows)  # [n, ctx]
    tokens = wins.numel()
    with torch.inference_mode():
        window_logits(model, wins[0, :32])  # warm-up: the lean plan, kernels and allocator, not counted

        def forward_all() -> list:  # the forward eval runs (eval.perplexity.window_logits)
            with eval_mode(model):  # the scoring loops' allocator setting (kernels.alloc.heap_reuse)
                return [window_logits(model, w)[:-1] for w in wins[:2]] + [window_logits(model, w)[:1] for w in wins[2:]]

        fwd_s, logits = timed(forward_all)
        metric_s, _ = timed(lambda: token_stats(logits[1][:-1], logits[0][1:], wins[0, 2:]))
        del logits
        eval_s, result = timed(lambda: evaluate(model, wins))
        ref_s, ref_result = (timed(lambda: evaluate(model, wins, reference=reference)) if reference is not None
                             else (float("nan"), None))
        cache = build_cache(model, wins, {}, k=256)
        cached_s, cached = timed(lambda: evaluate_against_cache(model, cache))
    return {"tokens": tokens, "forward_s": fwd_s, "eval_s": eval_s, "cached_s": cached_s, "ref_s": ref_s,
            "kld_vs_reference": None if ref_result is None else ref_result.kld_mean,
            "metrics_ref_s_per_window": metric_s, "ppl": result.ppl, "vocab": model.config.vocab_size}


def bias_vs_exact(ckpt: str, windows: int, prefill: str) -> dict:
    """KL(exact || ``prefill``) of the same checkpoint, teacher-forced on the same windows: what the fast
    path's arithmetic alone moves the distribution (eval's own metrics, the exact path as reference)."""
    from bitsmith.eval.perplexity import evaluate
    from bitsmith.eval.suite import text_windows

    exact = load_scored(ckpt, "exact")
    fast = load_scored(ckpt, prefill)
    wins = text_windows(exact.tokenizer, text_path().read_text(encoding="utf-8"), CTX, windows)
    return evaluate(fast.model, wins, reference=exact.model).as_dict()


def table(rows: list[dict], threads: int, windows: int) -> str:
    lines = [f"Scoring {windows} windows x {CTX} tokens of the evaluation prose, {threads} thread(s); tok/s over the "
             "scoring only (load and tokenization excluded)", "",
             "| model | llama-perplexity (GGUF) | bitsmith forward | bitsmith eval | eval --reference (live) | "
             "eval --reference-cache | ratio eval / llama | ratio eval --reference / llama | KLD vs reference | "
             "exact-KL metrics per window (s) | bitsmith prefill | llama-perplexity --kl-divergence | "
             "ratio eval --reference-cache / llama (plain, --kl-divergence) | scored tok/s: eval, llama | "
             "ratio of scored tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, l = r["bitsmith"], r["llama"]
        llama_rate = l["tokens"] / l["seconds"]
        rate, ref_rate = b["tokens"] / b["eval_s"], b["tokens"] / b["ref_s"]
        kld = "" if b["kld_vs_reference"] is None else f"{b['kld_vs_reference']:.5f}"
        cached_rate = b["tokens"] / b["cached_s"]
        kl_rate = l["kl"]["tokens"] / l["kl"]["seconds"] if "kl" in l else None
        lines.append(f"| {r['name']} | {llama_rate:.1f} ({Path(r['gguf']).name}) | {b['tokens'] / b['forward_s']:.1f} | "
                     f"{rate:.1f} | {ref_rate:.1f} | {b['tokens'] / b['cached_s']:.1f} | {rate / llama_rate:.2f}x | "
                     f"{ref_rate / llama_rate:.2f}x | {kld} | "
                     f"{b['metrics_ref_s_per_window']:.2f} (V={b['vocab']}) | {r['prefill']} | "
                     f"{kl_rate if kl_rate is None else f'{kl_rate:.1f}'} | {cached_rate / llama_rate:.2f}x, "
                     f"{'-' if kl_rate is None else f'{cached_rate / kl_rate:.2f}x'} | "
                     f"{rate * SCORED_BITSMITH / CTX:.1f}, {llama_rate * SCORED_LLAMA / CTX:.1f} | "
                     f"{rate * SCORED_BITSMITH / (llama_rate * SCORED_LLAMA):.2f}x |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", action="append", required=True, metavar="NAME=CKPT,GGUF",
                    help="a bitsmith checkpoint and a GGUF of the same model at the same bits (repeatable)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", default="exact", help="bitsmith's prefill option(s), comma-separated: exact "
                    "(what `bitsmith eval` uses), auto, bf16")
    ap.add_argument("--reference", help="the unquantized model (alias or folder): also time `bitsmith eval "
                    "--reference` with it live (float32, as eval loads it)")
    ap.add_argument("--bias", action="store_true", help="also print KL(exact || each other --prefill mode) of "
                    "the checkpoint on the same windows: the fast path's own accuracy cost")
    ap.add_argument("--kl-base", help="a GGUF of the unquantized model (e.g. speed.py's F16 one): also time "
                    "`llama-perplexity --kl-divergence` against its stored logits, the like-for-like anchor of "
                    "`bitsmith eval --reference-cache`")
    ap.add_argument("--work", help="folder for llama.cpp's base-logits file (default: a temporary one)")
    ap.add_argument("--out", help="write the table (markdown) here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    reference = None
    if args.reference:
        reference = load_scored(args.reference, "exact").model.eval()
    rows, notes = [], []
    for item in args.pair:
        name, _, paths = item.partition("=")
        ckpt, gguf = paths.split(",")
        llama = llama_perplexity(gguf, args.windows, args.threads)
        print(f"{name}: llama-perplexity {llama['tokens'] / llama['seconds']:.1f} tok/s", flush=True)
        if args.kl_base:
            work = Path(args.work or tempfile.mkdtemp(prefix="bitsmith-kl-"))
            work.mkdir(parents=True, exist_ok=True)
            llama["kl"] = llama_kl(gguf, args.kl_base, args.windows, args.threads, work, llama["teardown_s"])
            print(f"{name}: llama-perplexity --kl-divergence {llama['kl']['tokens'] / llama['kl']['seconds']:.1f} tok/s "
                  f"(KLD {llama['kl']['kld_second_halves']})", flush=True)
        for prefill in args.prefill.split(","):
            b = bitsmith_rows(ckpt, args.windows, prefill, reference)
            print(f"{name} ({prefill}): bitsmith eval {b['tokens'] / b['eval_s']:.1f} tok/s, with the live reference "
                  f"{b['tokens'] / b['ref_s']:.1f} (KLD {b['kld_vs_reference']}), forward "
                  f"{b['tokens'] / b['forward_s']:.1f}", flush=True)
            rows.append({"name": name, "gguf": gguf, "llama": llama, "bitsmith": b, "prefill": prefill})
            if args.bias and prefill != "exact":
                bias = bias_vs_exact(ckpt, args.windows, prefill)
                notes.append(f"{name}: {prefill} against exact, same checkpoint and windows: kld_mean "
                             f"{bias['kld_mean']:.6f}, kld_p99 {bias['kld_p99']:.6f}, top1 {bias['top1']:.4f}")
                print(notes[-1], flush=True)
    text = "\n".join([table(rows, args.threads, args.windows), "", *notes])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n\ncommand: `python bench/eval_vs_perplexity.py " + " ".join(sys.argv[1:]) + "`\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
