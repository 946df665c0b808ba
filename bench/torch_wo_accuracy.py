"""What torch's weight-only kernels cost in quality: teacher-forced decode KLD of the torch int4 / int8
path (kernels/torch_wo.py, the CPU variants of the ops a GPU runs) against the exact path.

Every quantized linear the torch kernels take is swapped for them on the CPU; the rest of the model
(embedding, norms, attention, layers they do not take) stays float32 and identical in every run. The
exact path is the generic device kernel on the CPU (float32 dequantize-then-matmul, bit for bit the
reference). Variants: the torch kernels computing in float32 (the CPU ops take it), and in bfloat16
(what CUDA's tinygemm does whatever the input dtype: bf16 activations, scales and offsets; CUDA's
int8pack widens to float32, so for w8 the float32 row is the GPU's arithmetic and the bf16 row that of
a bf16 model on the CPU op). Each token is one
forward through the Hugging Face KV cache, so every kernel call has one row, as in batch-1 decode.

    python bench/torch_wo_accuracy.py --checkpoint ~/.cache/bitsmith/bench/speed/smollm2-135m-w4g128 --threads 1

Prints one table; nothing is asserted (tests/kernels/test_torch_wo.py holds each kernel to its oracle).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import bitsmith
from bitsmith.eval.metrics import summarize, token_stats
from bitsmith.eval.perplexity import tokenize_text
from bitsmith.kernels.device import DeviceKernel
from bitsmith.kernels.torch_wo import TorchInt4Kernel, TorchInt8Kernel, int4_takes, int8_takes
from bitsmith.nn.qlinear import QuantLinear
from common import text_path

CPU = torch.device("cpu")


def swap_kernels(model: torch.nn.Module, variant: str) -> dict[str, int]:
    """Give every QuantLinear the variant's kernel ("exact", "torch", "torch-bf16"); counts by kernel name."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if not isinstance(module, QuantLinear):
            continue
        state = module.to_state("w")
        args = (state["w.qweight"], state["w.scale"], state.get("w.zero"), module.spec, module.in_features, CPU)
        shape = (module.out_features, module.in_features)
        kernel = DeviceKernel(*args, state.get("w.grid"), compile=False)
        if variant != "exact" and "w.grid" not in state:
            dtype = torch.bfloat16 if variant == "torch-bf16" else None
            if int4_takes(module.spec, None, *shape, CPU) is None:
                kernel = TorchInt4Kernel(*args, compute_dtype=dtype)
            elif int8_takes(module.spec, None, *shape, CPU) is None:
                kernel = TorchInt8Kernel(*args, compute_dtype=dtype)
        module._kernel = kernel
        counts[kernel.name] = counts.get(kernel.name, 0) + 1
    return counts


def decode_logits(model, window: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits [T - prompt, V] at positions prompt-1 .. T-2: the prompt in one forward, then one token per
    forward through the model's KV cache."""
    with torch.no_grad():
        out = model(input_ids=window[None, :prompt], use_cache=True)
        rows, cache = [out.logits[0, -1].float()], out.past_key_values
        for pos in range(prompt, window.numel() - 1):
            out = model(input_ids=window[None, pos : pos + 1], past_key_values=cache, use_cache=True)
            rows.append(out.logits[0, -1].float())
            cache = out.past_key_values
    return torch.stack(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="the unquantized model (for the quantization's own KLD)")
    ap.add_argument("--checkpoint", required=True, help="a bitsmith checkpoint of that model")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64, help="tokens prefilled before decoding")
    ap.add_argument("--decode", type=int, default=256, help="tokens decoded one by one per window")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref = bitsmith.load(args.model)
    quant = bitsmith.load(args.checkpoint)
    text = text_path().read_text(encoding="utf-8")
    ids = torch.tensor(tokenize_text(ref.tokenizer, text))
    span = args.prompt + args.decode + 1
    windows = [ids[w * span : (w + 1) * span] for w in range(args.windows) if (w + 1) * span <= ids.numel()]
    variants = ("exact", "torch", "torch-bf16")
    logits: dict[str, list[torch.Tensor]] = {name: [] for name in variants}
    t0 = time.perf_counter()
    for name in variants:
        counts = swap_kernels(quant.model, name)
        print(f"{name}: kernels {counts}", flush=True)
        for window in windows:
            logits[name].append(decode_logits(quant.model, window, args.prompt))
    float_stats, runs = [], {name: [] for name in variants if name != "exact"}
    for i, window in enumerate(windows):
        targets = window[args.prompt :]
        with torch.no_grad():
            want = ref.model(input_ids=window[None]).logits[0, args.prompt - 1 : -1].float()
        float_stats.append(token_stats(want, logits["exact"][i], targets))
        for name in runs:
            runs[name].append(token_stats(logits["exact"][i], logits[name][i], targets))
    tokens = sum(s.tokens for s in float_stats)
    print(f"{Path(args.checkpoint).name}: {tokens} decoded positions over {len(windows)} windows "
          f"({args.prompt}-token prompt each), {args.threads} thread(s); {time.perf_counter() - t0:.0f} s")
    print("| path | against | KLD mean | KLD p99 | top-1 | ppl |")
    print("|---|---|---:|---:|---:|---:|")
    r = summarize(float_stats)
    print(f"| exact (generic kernel, fp32) | {args.model} fp32 | {r.kld_mean:.6f} | {r.kld_p99:.5f} | {r.top1:.4f} | "
          f"{r.ppl:.3f} |")
    for name, stats in runs.items():
        r = summarize(stats)
        label = "torch kernels, fp32 compute" if name == "torch" else "torch kernels, bf16 compute (tinygemm on CUDA)"
        print(f"| {label} | exact path | {r.kld_mean:.2e} | {r.kld_p99:.2e} | {r.top1:.4f} | {r.ppl:.3f} |")


if __name__ == "__main__":
    main()
