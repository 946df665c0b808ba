"""transformers' AutoModelForCausalLM.from_pretrained on bitsmith checkpoints, against bitsmith's own
load_model (a benchmark, not a test; run on demand):

    .venv/bin/python bench/transformers_load.py [--windows 1] [--tokens 512] [--new-tokens 24] [--out FILE] LABEL=CKPT ...

For each checkpoint (made with `bitsmith quantize`, so its config.json carries the bitsmith
quantization_config): transformers loads it in a fresh process after `import bitsmith` (dtype
float32), scores --windows windows of --tokens tokens (512 by default) of the shipped prose slice and greedy-generates
--new-tokens tokens from a fixed prompt; bitsmith's load_model does the same in another process.
The table gives each side's load seconds, the max |logit difference| over every scored position,
top-1 agreement, whether the generated tokens are identical, and transformers' generated text.
Seconds are wall-clock on whatever machine ran it (the README says how loaded it was).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import text_path, work_dir

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"

SIDE = r'''
import json, sys, time, torch
from safetensors.torch import save_file
import bitsmith
side, ckpt, text, windows, length, new_tokens, prompt, out, threads = sys.argv[1:10]
windows, length, new_tokens = int(windows), int(length), int(new_tokens)
torch.set_num_threads(int(threads))
t0 = time.perf_counter()
if side == "transformers":
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), AutoTokenizer.from_pretrained(ckpt)
else:
    from bitsmith.runtime.load import load_model
    loaded = load_model(ckpt)
    model, tok = loaded.model, loaded.tokenizer
load_s = time.perf_counter() - t0
ids = tok(open(text).read(), return_tensors="pt").input_ids[0][: windows * length].view(windows, length)
with torch.no_grad():
    logits = torch.stack([model(w.unsqueeze(0), use_cache=False).logits[0].float() for w in ids])
    p = tok(prompt, return_tensors="pt").input_ids
    gen = model.generate(p, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)[0, p.shape[1]:]
kinds = sorted({type(m).__name__ for m in model.modules()} & {"QuantLinear", "QuantEmbedding", "Linear"})
save_file({"logits": logits.contiguous(), "gen": gen.contiguous()}, out)
json.dump({"load_s": round(load_s, 1), "text": tok.decode(gen, skip_special_tokens=True), "modules": kinds},
          open(out + ".json", "w"))
'''


def run_side(side: str, ckpt: Path, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-c", SIDE, side, str(ckpt), str(text_path()), str(args.windows), str(args.tokens),
           str(args.new_tokens), PROMPT, str(out), str(args.threads)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{side} failed on {ckpt}:\n{done.stderr[-3000:]}")
    from safetensors.torch import load_file

    return {**json.loads(Path(f"{out}.json").read_text()), **load_file(str(out))}


def compare(label: str, ckpt: Path, args: argparse.Namespace, work: Path) -> dict:
    config = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    hf = run_side("transformers", ckpt, args, work / f"{label}.hf.safetensors")
    bs = run_side("bitsmith", ckpt, args, work / f"{label}.bs.safetensors")
    diff = (hf["logits"] - bs["logits"]).abs().max().item()
    top1 = (hf["logits"].argmax(-1) == bs["logits"].argmax(-1)).float().mean().item()
    return {"label": label, "spec": config["spec"], "method": config["method"], "hf_load_s": hf["load_s"],
            "bitsmith_load_s": bs["load_s"], "positions": hf["logits"].shape[0] * hf["logits"].shape[1],
            "max_abs_logit_diff": diff, "top1_agreement": top1, "same_tokens": bool((hf["gen"] == bs["gen"]).all()),
            "modules": hf["modules"], "text": hf["text"]}


def table(rows: list[dict]) -> str:
    lines = ["| checkpoint | spec | method | from_pretrained s | load_model s | positions | max abs logit diff "
             "| top-1 agree | same generated tokens | layers built by transformers |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['spec']} | {r['method']} | {r['hf_load_s']} | {r['bitsmith_load_s']} | "
                     f"{r['positions']} | {r['max_abs_logit_diff']:.3g} | {r['top1_agreement']:.4f} | "
                     f"{'yes' if r['same_tokens'] else 'NO'} | {', '.join(r['modules'])} |")
    lines.append("")
    lines.append(f"Greedy continuations (transformers' generate(), prompt {PROMPT!r}):")
    lines.append("")
    for r in rows:
        lines.append(f"- **{r['label']}**: {r['text']!r}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="LABEL=CHECKPOINT_DIR")
    ap.add_argument("--windows", type=int, default=1, help="windows of the prose slice scored (default 1)")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per window (default 512, docs/PROTOCOL.md's)")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each side (1 under a shared CPU slot)")
    args = ap.parse_args()
    work = work_dir("transformers-load")
    rows = []
    for item in args.checkpoints:
        label, _, path = item.partition("=")
        rows.append(compare(label, Path(path), args, work))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "text"}), flush=True)
    text = table(rows)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
