"""optimum-quanto qint4 weights on the reference folder; dequantized weights saved as a plain
Hugging Face folder. Run in the quanto peer venv
(`make bench-tools` creates it; `python3 bench/tools.py peer-python quanto` prints its interpreter):

    $(python3 bench/tools.py peer-python quanto) bench/peers/peer_quanto.py REF_DIR OUT_DIR
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
    ap.add_argument("--weights", default="qint4")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from optimum.quanto import QLinear, freeze, qint4, qint8, quantize

    model = AutoModelForCausalLM.from_pretrained(args.ref, torch_dtype=torch.float32)
    t0 = time.perf_counter()
    quantize(model.model.layers, weights={"qint4": qint4, "qint8": qint8}[args.weights])
    freeze(model)
    seconds = time.perf_counter() - t0
    bits, count = 0.0, 0
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, QLinear):
                qw = module.qweight
                deq = qw.dequantize().float()
                n = deq.numel()
                scale = getattr(qw, "_scale", None)
                shift = getattr(qw, "_shift", None)
                extra = sum(16 * t.numel() for t in (scale, shift) if t is not None)
                bits += (4 if args.weights == "qint4" else 8) * n + extra
                count += n
                plain = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                plain.weight.copy_(deq)
                if module.bias is not None:
                    plain.bias.copy_(module.bias.float())
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, plain)
    model.save_pretrained(args.out, safe_serialization=True)
    json.dump({"quantize_s": seconds, "bits_per_weight": bits / max(count, 1)}, open(f"{args.out}/peer.json", "w"))


if __name__ == "__main__":
    main()
