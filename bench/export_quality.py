"""bitsmith's GGUF k-quant mixes vs llama.cpp's own llama-quantize, at equal file size (a benchmark):

    .venv/bin/python bench/export_quality.py [--model smollm2-135m] [--mixes Q4_K_M Q3_K_M Q2_K] [--chunks 16]

Same reference weights for everyone: bitsmith exports the model's unquantized (fp32) weights as an
F32 GGUF, which llama.cpp's llama-quantize then quantizes, without and with an importance matrix
from llama-imatrix on the calibration text (the first --chunks x 512 tokens of the shipped State of
the Union text, PROTOCOL's calibration set). bitsmith quantizes the same mixes (same per-tensor types,
llama.cpp's own rules and row-length fallbacks) straight from the weights: `imatrix` = importance
from the same number of tokens of the same text, `imatrix+gptq` = plus GPTQ error feedback on the
GGUF grid. Every file is then scored by bitsmith's evaluator (it reads GGUF) against the fp32
reference on the PROTOCOL prose windows (first 60,000 chars of Pride and Prejudice, ctx 512):
KLD, top-1, ppl. bpw = stored bits / weights of the decoder blocks' matrices; MB = whole file.
Work files go to $WORK (default: bench/common.work_dir, ~/.cache/bitsmith/bench/export-quality).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import tools
from common import block_bpw, text_path, work_dir

ROOT = Path(__file__).resolve().parents[1]
PROSE = text_path()  # first 60,000 chars of Pride and Prejudice, shipped in bitsmith/data


def run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--mixes", nargs="+", default=["Q4_K_M", "Q3_K_M", "Q2_K"])
    ap.add_argument("--chunks", type=int, default=16, help="calibration chunks of 512 tokens (default 16)")
    ap.add_argument("--bin", default=None, help="folder of llama.cpp's binaries (default: bench/tools.py's, from `make bench-tools`)")
    ap.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (default: all, PROTOCOL)")
    ap.add_argument("--variants", nargs="+", default=["llama", "llama+imatrix", "bitsmith imatrix", "bitsmith imatrix+gptq"])
    args = ap.parse_args()
    args.bin = args.bin or str(tools.llama_bin("llama-quantize").parent)  # fails early, naming the fix

    import torch

    import bitsmith
    from bitsmith.eval.perplexity import convention_adds_bos, evaluate, tokenize_text, windows
    from bitsmith.io.gguf.calibration import calibration_statistics
    from bitsmith.io.gguf.export import export_gguf
    from bitsmith.runtime.load import load_model

    torch.set_num_threads(2)
    work = Path(os.environ.get("WORK") or work_dir("export-quality")) / args.model
    work.mkdir(parents=True, exist_ok=True)
    tokens = args.chunks * 512
    ref_gguf = work / "ref-F32.gguf"
    if not ref_gguf.exists():
        export_gguf(args.model, ref_gguf, "F32")
    calib = work / "calib.txt"
    from importlib.resources import files

    calib.write_text(files("bitsmith.data").joinpath("sotu_calibration.txt").read_text(encoding="utf-8"), encoding="utf-8")
    imatrix = work / f"imatrix-{args.chunks}.gguf"
    if not imatrix.exists() and "llama+imatrix" in args.variants:
        run([f"{args.bin}/llama-imatrix", "-m", str(ref_gguf), "-f", str(calib), "-c", "512", "--chunks", str(args.chunks),
             "-t", "2", "-o", str(imatrix)])
    files_by_row = []
    stats = None  # one calibration pass (importance and Hessians) serves every bitsmith file
    for mix in args.mixes:
        for variant in args.variants:
            out = work / f"{mix}-{variant.replace(' ', '_').replace('+', '_')}.gguf"
            t0 = time.time()
            if not out.exists():
                if variant == "llama":
                    run([f"{args.bin}/llama-quantize", str(ref_gguf), str(out), mix, "2"])
                elif variant == "llama+imatrix":
                    run([f"{args.bin}/llama-quantize", "--imatrix", str(imatrix), str(ref_gguf), str(out), mix, "2"])
                else:
                    if stats is None:
                        stats = calibration_statistics(args.model, tokens, hessians=True)
                    export_gguf(args.model, out, mix, calibration_tokens=tokens, error_feedback=variant.endswith("gptq"),
                                calibration=stats)
                print(f"{out.name}: {time.time() - t0:.0f} s", flush=True)
            files_by_row.append((mix, variant, out))

    reference = bitsmith.load(args.model)
    tok = reference.tokenizer
    text = PROSE.read_text(encoding="utf-8")[:60000]
    wins = windows(tokenize_text(tok, text, add_bos=False), 512, bos=tok.bos_token_id if convention_adds_bos(tok) else None)
    wins = wins[: args.max_windows] if args.max_windows else wins
    rows = []
    for mix, variant, path in files_by_row:
        model = load_model(path, dequantize=True).model  # exactly what llama.cpp decodes
        r = evaluate(model, wins, reference.model).as_dict()
        del model
        rows.append((mix, variant, r, path.stat().st_size / 1e6, block_bpw(path)))
        print(f"{mix} {variant}: {r}", flush=True)
    print()
    print(f"{args.model}, reference ppl {rows[0][2]['ref_ppl']:.3f}; {wins.shape[0]} windows x 512 tokens; "
          f"calibration {tokens} tokens of State of the Union")
    print("| mix | quantizer | MB | bpw (blocks) | KLD | top-1 | ppl |")
    print("|---|---|---|---|---|---|---|")
    for mix, variant, r, mb, bpw in rows:
        print(f"| {mix} | {variant} | {mb:.1f} | {bpw:.3f} | {r['kld_mean']:.4f} | {r['top1']:.3f} | {r['ppl']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
