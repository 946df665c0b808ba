"""A `bitsmith export --to gptq` folder loaded by transformers (GPTQModel backend) on CPU, against
bitsmith's own run of the checkpoint (a benchmark, not a test; run on demand):

    .venv/bin/python bench/export_gptq_peer.py [--model smollm2-135m] [--spec w4g64] [--peer VENV]

The peer venv (outside the repo): `make bench-tools` creates it (bench/tools.py's `gptqmodel` peer: torch
held at constraints.txt, gptqmodel transformers accelerate safetensors optimum; transformers 5 refuses GPTQ without optimum). SmolLM2's hidden size 576
is not divisible by 128: use group 64 or 32. Steps: bitsmith quantizes (RTN) and exports the GPTQ
folder; bitsmith scores --windows windows of the prose slice with the checkpoint (fp32) and saves
token ids and logits; the peer loads the folder with AutoModelForCausalLM.from_pretrained
(env GPTQMODEL_CPU_WORKERS=2) and computes logits on the same ids; the table compares them: max |logit
difference|, mean KL(bitsmith || peer), top-1 agreement, and each side's ppl on those positions.
Work files go to $WORK (default: bench/common.work_dir, ~/.cache/bitsmith/bench/export-gptq).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import tools
from common import text_path, work_dir

ROOT = Path(__file__).resolve().parents[1]
PROSE = text_path()  # first 60,000 chars of Pride and Prejudice, shipped in bitsmith/data

PEER = r'''
import os, sys, time, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
folder, io_file, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
torch.set_num_threads(2)
ids = load_file(io_file)["ids"]
t0 = time.time()
model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=getattr(torch, dtype))
model.eval()
print("peer: loaded in %.1f s; q_proj is %s" % (time.time() - t0, type(model.model.layers[0].self_attn.q_proj).__module__ + "." + type(model.model.layers[0].self_attn.q_proj).__name__), flush=True)
out = []
with torch.no_grad():
    for w in ids:
        out.append(model(input_ids=w.unsqueeze(0), use_cache=False).logits[0].float())
save_file({"logits": torch.stack(out).contiguous()}, io_file + ".peer")
'''


def spec_decode(folder: Path) -> dict[str, "torch.Tensor"]:
    """Dequantize every GPTQ layer of ``folder`` from the layout's written-out formulas (AutoGPTQ's
    4/8-bit packing), independently of bitsmith's unpacker: q[i, j] = (qweight[i * bits // 32, j] >>
    (bits * (i % (32 // bits)))) & mask, zero[g, j] likewise from qzeros along j, plus 1 for
    checkpoint_format "gptq" (v1 stores zero - 1), w[j, i] = scales[g_idx[i], j] (q[i, j] - zero[g_idx[i], j])."""
    import json

    import torch
    from safetensors.torch import load_file

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    bits, mask = int(qc["bits"]), (1 << int(qc["bits"])) - 1
    per = 32 // bits
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    out = {}
    for key in [k for k in tensors if k.endswith(".qweight")]:
        m = key[: -len(".qweight")]
        qw = tensors[key].long() & 0xFFFFFFFF  # [in / per, out]
        rows = torch.arange(qw.shape[0] * per)
        q = (qw[rows // per] >> (bits * (rows % per)).unsqueeze(1)) & mask  # [in, out]
        qz = tensors[m + ".qzeros"].long() & 0xFFFFFFFF  # [G, out / per]
        cols = torch.arange(qz.shape[1] * per)
        z = (qz[:, cols // per] >> (bits * (cols % per))) & mask  # [G, out]
        z = z + (1 if qc.get("checkpoint_format", "gptq") == "gptq" else 0)
        g = tensors[m + ".g_idx"].long()
        sc = tensors[m + ".scales"].float()
        out[m] = (sc[g] * (q - z[g]).float()).T.contiguous()  # [out, in]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--spec", default="w4g64")
    ap.add_argument("--format", default="gptq", choices=["gptq", "gptq_v2"])
    ap.add_argument("--peer", default=None, help="the GPTQModel venv (default: bench/tools.py's, from `make bench-tools`)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--dtype", default="float32", help="peer compute dtype (float32 or bfloat16)")
    args = ap.parse_args()
    args.peer = args.peer or str(tools.peer_python("gptqmodel").parents[1])  # fails early, naming the fix

    import torch
    from safetensors.torch import load_file, save_file

    import bitsmith
    from bitsmith.eval.perplexity import convention_adds_bos, tokenize_text, windows

    work = Path(os.environ.get("WORK") or work_dir("export-gptq"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"{args.model}-{args.spec}"
    folder = work / f"{args.model}-{args.spec}-{args.format}"
    py = [sys.executable, "-m", "bitsmith"]
    if not ckpt.exists():
        subprocess.run(py + ["quantize", args.model, "--spec", args.spec, "--out", str(ckpt)], check=True)
    if not folder.exists():
        subprocess.run(py + ["export", str(ckpt), "--to", "gptq", "--gptq-format", args.format, "--out", str(folder)], check=True)
    from bitsmith.io.checkpoint import read_info
    from bitsmith.io.packed import quantized_tensors

    decoded = spec_decode(folder)
    reference = {m: qt.dequantize() for m, qt in quantized_tensors(ckpt, read_info(ckpt)).items()}
    layout_ok = set(decoded) == set(reference) and all(torch.equal(decoded[m], reference[m]) for m in reference)
    print(f"layout check: {len(decoded)} layers decoded from the written-out GPTQ formulas "
          f"{'equal' if layout_ok else 'DIFFER FROM'} the checkpoint's weights bit for bit")
    ours = bitsmith.load(ckpt)
    tok = ours.tokenizer
    text = PROSE.read_text(encoding="utf-8")[:60000]
    ids = windows(tokenize_text(tok, text, add_bos=False), 512, bos=tok.bos_token_id if convention_adds_bos(tok) else None)
    ids = ids[: args.windows].contiguous()
    io_file = work / "io.safetensors"
    with torch.inference_mode():
        mine = torch.stack([ours.model(input_ids=w.unsqueeze(0), use_cache=False).logits[0].float() for w in ids])
    save_file({"ids": ids}, str(io_file))
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([f"{args.peer}/bin/python", "-c", PEER, str(folder), str(io_file), args.dtype], env=env,
                       capture_output=True, text=True)
    print(r.stdout.strip())
    if r.returncode:
        print(r.stderr[-4000:])
        print(f"peer loader failed (exit {r.returncode}); see above")
        return 1
    peer = load_file(str(io_file) + ".peer")["logits"]
    lp_m, lp_p = torch.log_softmax(mine.double(), -1), torch.log_softmax(peer.double(), -1)
    kld = (lp_m.exp() * (lp_m - lp_p)).sum(-1)  # [n, ctx]
    top1 = (mine.argmax(-1) == peer.argmax(-1)).double().mean().item()
    tgt = ids[:, 1:]

    def ppl(lp: torch.Tensor) -> float:
        return float(torch.exp(-lp[:, :-1].gather(-1, tgt.unsqueeze(-1)).mean()))

    print()
    print(f"{args.model} {args.spec} ({args.format}), {ids.shape[0]} windows x 512 tokens, peer dtype {args.dtype}")
    print("| max abs logit diff | mean abs logit diff | KLD mean (bitsmith || peer) | KLD max | top-1 agreement | bitsmith ppl | peer ppl |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {float((mine - peer).abs().max()):.4g} | {float((mine - peer).abs().mean()):.3g} | {float(kld.mean()):.3g} | "
          f"{float(kld.max()):.3g} | {top1:.4f} | {ppl(lp_m):.4f} | {ppl(lp_p):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
