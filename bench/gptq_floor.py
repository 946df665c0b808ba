"""How long one plain forward over GPTQ's calibration set takes here: the floor under any GPTQ run.

    python bench/gptq_floor.py --model smollm2-135m --samples 128 --seq-len 512

GPTQ must run every decoder block at least once over the calibration tokens (to collect each
linear's inputs and to make the next block's inputs), so a single forward of the model over them,
with no Hessian and no quantization, bounds the quantize time from below. Prints the measured
seconds for fp32 and bf16 forwards (the head is skipped, as the pipeline skips it). Nothing asserted.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtypes", default="bf16,fp32")
    args = ap.parse_args()

    import torch
    from torch import nn

    from bitsmith.calib import CalibrationConfig
    from bitsmith.models import build_model, open_source
    from bitsmith.nn.qlinear import set_submodule
    from bitsmith.pipeline.capture import output_head_name

    source = open_source(args.model)
    for name in args.dtypes.split(","):
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        net = build_model(source, dtype)
        head = output_head_name(net)
        if head:
            set_submodule(net, head, nn.Identity())
        tokens = CalibrationConfig(samples=args.samples, seq_len=args.seq_len).batches(source.tokenizer())
        with torch.no_grad():
            net(input_ids=tokens[: args.batch], use_cache=False)  # warm-up
            t0 = time.perf_counter()
            for i in range(0, tokens.shape[0], args.batch):
                net(input_ids=tokens[i : i + args.batch], use_cache=False)
            seconds = time.perf_counter() - t0
        print(f"{args.model}: one {name} forward over {tokens.shape[0]} x {tokens.shape[1]} tokens "
              f"(batches of {args.batch}, no head): {seconds:.1f} s", flush=True)
        del net


if __name__ == "__main__":
    main()
