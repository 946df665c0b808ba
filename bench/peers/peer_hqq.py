"""The `hqq` package (mobiusml) on the reference folder; writes the dequantized model as a plain
Hugging Face folder so bitsmith evaluates it like any other. Run in the hqq peer venv
(`make bench-tools` creates it; `python3 bench/tools.py peer-python hqq` prints its interpreter):

    $(python3 bench/tools.py peer-python hqq) bench/peers/peer_hqq.py REF_DIR OUT_DIR --bits 4 --group 64
"""

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ref")
    ap.add_argument("out")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    model = AutoModelForCausalLM.from_pretrained(args.ref, torch_dtype=torch.float32)
    cfg = BaseQuantizeConfig(nbits=args.bits, group_size=args.group)
    t0 = time.perf_counter()
    with torch.no_grad():
        for name, module in list(model.model.layers.named_modules()):
            if isinstance(module, torch.nn.Linear):
                q = HQQLinear(module, quant_config=cfg, compute_dtype=torch.float32, device="cpu", del_orig=False)
                module.weight.copy_(q.dequantize().reshape(module.weight.shape).float())
    seconds = time.perf_counter() - t0
    model.save_pretrained(args.out, safe_serialization=True)
    # hqq stores a fp16 scale and zero per group (its default; quant_zero/quant_scale off)
    json.dump({"quantize_s": seconds, "bits_per_weight": args.bits + 32 / args.group},
              open(f"{args.out}/peer.json", "w"))


if __name__ == "__main__":
    main()
