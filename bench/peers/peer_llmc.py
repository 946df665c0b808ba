"""llm-compressor GPTQ W4A16 (oneshot) on the reference folder with the shared calibration tokens;
saved uncompressed (dense dequantized weights) so bitsmith evaluates it. Run in the llmc peer venv
(`make bench-tools` creates it; `python3 bench/tools.py peer-python llmc` prints its interpreter):

    $(python3 bench/tools.py peer-python llmc) bench/peers/peer_llmc.py REF_DIR CALIB_IDS.pt OUT_DIR --group 64
"""

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ref")
    ap.add_argument("calib")
    ap.add_argument("out")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--samples", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    ids = torch.load(args.calib, weights_only=True)[: args.samples]  # [N, L]
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.ref, torch_dtype=torch.float32)
    recipe = GPTQModifier(
        targets="Linear", ignore=["lm_head"],
        config_groups={"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                                "strategy": "group", "group_size": args.group}}})
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0])
    seconds = time.perf_counter() - t0
    model.save_pretrained(args.out, save_compressed=False)
    json.dump({"quantize_s": seconds, "bits_per_weight": 4 + 16 / args.group}, open(f"{args.out}/peer.json", "w"))


if __name__ == "__main__":
    main()
