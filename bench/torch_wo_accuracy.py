"""What torch's weight-only kernels cost in quality: teacher-forced decode KLD of the torch int4 / int8
path (kernels/torch_wo.py, the CPU variants of the ops a GPU runs) against the exact path.

Every quantized linear the torch kernels take is swapped for them on the CPU; the rest of the model
(embedding, norms, attention, layers they do not take) stays float32 and identical in every run. The
exact path is bitsmith's native CPU kernel with exact float arithmetic (``int8_decode=False``, exact
prefill: the dequantize-then-matmul oracle up to the float32 summation order, tests/kernels/test_kernels.py),
which also serves the layers the torch kernels do not take. Variants (``--variants``): ``torch``, the
torch kernels computing in float32 (the CPU ops take it); ``gpu``, CUDA's arithmetic (tinygemm is
bf16-only: bf16 activations, scales and offsets whatever the input dtype; CUDA's int8pack widens to
float32); ``bf16``, both kernels given bf16 activations. Each token is one
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
from bitsmith.kernels.torch_wo import TorchInt4Kernel, TorchInt8Kernel, int4_takes, int8_takes
from bitsmith.nn.qlinear import QuantLinear
from bitsmith.runtime.options import RuntimeOptions
from common import text_path

CPU = torch.device("cpu")
EXACT = RuntimeOptions(int8_decode=False, prefill="exact", fused_decode=False)


# variant -> the dtype each torch kernel computes in (None: the input's, float32 here)
VARIANTS = {
    "torch": {"torch-int4": None, "torch-int8": None},
    "gpu": {"torch-int4": torch.bfloat16, "torch-int8": None},  # CUDA: tinygemm is bf16-only, int8pack widens to fp32
    "bf16": {"torch-int4": torch.bfloat16, "torch-int8": torch.bfloat16},
}
LABELS = {"torch": "torch kernels, fp32 compute", "gpu": "torch kernels, CUDA's arithmetic (int4 bf16, int8 fp32)",
          "bf16": "torch kernels, bf16 compute"}


def swap_kernels(model: torch.nn.Module, variant: str) -> dict[str, int]:
    """Give every QuantLinear the variant's kernel ("exact" or a VARIANTS key); counts by kernel name."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if not isinstance(module, QuantLinear):
            continue
        if not hasattr(module, "exact_kernel"):
            module.exact_kernel = module._kernel
        state = module.to_state("w")
        args = (state["w.qweight"], state["w.scale"], state.get("w.zero"), module.spec, module.in_features, CPU)
        shape = (module.out_features, module.in_features)
        kernel = module.exact_kernel  # kept by the first call
        if variant != "exact" and "w.grid" not in state:
            dtypes = VARIANTS[variant]
            if int4_takes(module.spec, None, *shape, CPU) is None:
                kernel = TorchInt4Kernel(*args, compute_dtype=dtypes["torch-int4"])
            elif int8_takes(module.spec, None, *shape, CPU) is None:
                kernel = TorchInt8Kernel(*args, compute_dtype=dtypes["torch-int8"])
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
    ap.add_argument("--variants", default="torch,gpu,bf16", help=f"some of {', '.join(VARIANTS)}")
    args = ap.parse_args()
    chosen = args.variants.split(",")
    if not set(chosen) <= set(VARIANTS):
        raise SystemExit(f"--variants {args.variants!r}: choose among {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    ref = bitsmith.load(args.model)
    quant = bitsmith.load(args.checkpoint, options=EXACT)
    text = text_path().read_text(encoding="utf-8")
    ids = torch.tensor(tokenize_text(ref.tokenizer, text))
    span = args.prompt + args.decode + 1
    windows = [ids[w * span : (w + 1) * span] for w in range(args.windows) if (w + 1) * span <= ids.numel()]
    variants = ("exact", *chosen)
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
    print(f"| exact (native kernel, fp32) | {args.model} fp32 | {r.kld_mean:.6f} | {r.kld_p99:.5f} | {r.top1:.4f} | "
          f"{r.ppl:.3f} |")
    for name, stats in runs.items():
        r = summarize(stats)
        print(f"| {LABELS[name]} | exact path | {r.kld_mean:.2e} | {r.kld_p99:.2e} | {r.top1:.4f} | {r.ppl:.3f} |")


if __name__ == "__main__":
    main()
