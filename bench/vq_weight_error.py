"""Weight-space error of scalar and vector codes on SmolLM2-135M layers, in the rotated basis
(issue 19): ``||Q(W R^T) R - W|| / ||W||`` for RTN (clip search) and the vq codebook without error
feedback (no calibration), so the formats are compared before GPTQ's feedback is added to either.

    python bench/vq_weight_error.py [--model smollm2-135m] [--output-error]
        [--specs w3g256s,w3g256vq] [--layers NAME,...] [--pairs gptq:w3g256s,vq:w3g256vq] [--calib prose+code]

Each cell: relative error (bits/weight of that layer, codebook and scales counted; CPU seconds of the
quantization, ``time.process_time``). Nothing asserted.
``--output-error`` instead compares GPTQ and vq *with* error feedback on block 0's q/k projections:
``tr(dW H dW^T) / tr(W H W^T)`` with H from 32 x 512 calibration tokens (State of the Union) through
the embedding and block 0's input RMSNorm (the only layers whose inputs need no forward pass), both
in the same randomized Hadamard basis; ``--pairs`` names the method:spec cells, and ``--calib
prose+code`` takes H from the mixed calibration text instead. ``--share`` quantizes block 0's q/k/v
(one input, that same H) with vq w2g64vq + rotation twice, one codebook per layer and one shared
codebook (``vq_many`` with ``share_codebook``), and prints each layer's output error and the CPU
seconds of each way (``time.process_time``, best of 2 alternating rounds, 1 thread).
"""

from __future__ import annotations

import argparse

import torch

from bitsmith.calib.data import PROSE, PROSE_CODE
from bitsmith.hadamard import Rotation
from bitsmith.methods.rtn import rtn
from bitsmith.methods.vq import nearest_tensor
from bitsmith.models import open_source
from bitsmith.spec import QuantSpec

LAYERS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.15.mlp.down_proj.weight",
          "model.layers.29.mlp.gate_proj.weight"]
SPECS = ["w2g64", "w2g64vq", "w2vq", "w3g128", "w3g128vq"]
PAIRS = ["gptq:w2g64", "vq:w2g64vq", "gptq:w3g128", "vq:w3g128vq"]


def block0_stats(src, calib: str = PROSE):
    """H of block 0's attention input from 32 x 512 calibration tokens (embedding, input RMSNorm with
    the model's own epsilon); ``calib``: prose (State of the Union) or prose+code (the mixed text)."""
    from bitsmith.calib.data import mixed_calibration_text, read_calibration_text
    from bitsmith.methods.base import LayerStats

    text = mixed_calibration_text() if calib == PROSE_CODE else read_calibration_text()
    ids = torch.tensor(src.tokenizer()(text[:200_000])["input_ids"][: 32 * 512])
    emb = src.load_tensor("model.embed_tokens.weight").float()[ids]
    gain = src.load_tensor("model.layers.0.input_layernorm.weight").float()
    eps = getattr(src.config, "rms_norm_eps", 1e-5)
    x = emb * torch.rsqrt(emb.pow(2).mean(-1, keepdim=True) + eps) * gain
    return LayerStats(hessian=x.T @ x, tokens=len(ids))


def shared_codebook(src) -> None:
    import time

    from bitsmith.methods.gptq import layer_error
    from bitsmith.methods.vq import vq
    from bitsmith.transforms.rotate import rotated

    stats, spec = block0_stats(src), QuantSpec.parse("w2g64vq")
    names = [f"model.layers.0.self_attn.{n}_proj.weight" for n in "qkv"]
    weights = [src.load_tensor(n).float() for n in names]
    method = rotated(vq, 0)
    ways = {"separate": lambda: [method(w, spec, stats, {}) for w in weights],
            "shared": lambda: method.many(weights, spec, stats, {"share_codebook": True})}
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    errors: dict[str, list[float]] = {}
    for _ in range(2):
        for way, run in ways.items():
            t0 = time.process_time()
            qts = run()
            seconds[way].append(time.process_time() - t0)
            errors[way] = [layer_error(w, qt.weight(), stats.hessian) for w, qt in zip(weights, qts)]
    print("| codebooks | q_proj | k_proj | v_proj | sum | CPU s (best of 2) |")
    print("|---|---|---|---|---|---|")
    for way in ways:
        cells = " | ".join(f"{e:.3e}" for e in errors[way])
        print(f"| {way} | {cells} | {sum(errors[way]):.3e} | {min(seconds[way]):.2f} |", flush=True)


def output_errors(src, pairs: list[str], calib: str) -> None:
    from bitsmith.methods import get_method
    from bitsmith.methods.gptq import layer_error
    from bitsmith.transforms.rotate import quantize_rotated

    stats = block0_stats(src, calib)
    pairs = [tuple(p.split(":", 1)) for p in pairs]  # (method, spec)
    print("| layer | " + " | ".join(f"{m} {s}" for m, s in pairs) + " |")
    print("|---" * (len(pairs) + 1) + "|")
    for name in ("self_attn.q_proj", "self_attn.k_proj"):
        w = src.load_tensor(f"model.layers.0.{name}.weight").float()
        cells = []
        for method_name, text in pairs:
            method, spec = get_method(method_name), QuantSpec.parse(text)
            qt = quantize_rotated(method, w, spec, stats, {}, 0)
            cells.append(f"{layer_error(w, qt.weight(), stats.hessian):.3e} ({spec.bits_per_weight(*w.shape):.2f})")
        print(f"| layers.0.{name} {tuple(w.shape)} | " + " | ".join(cells) + " |", flush=True)


def weight_errors(src, specs: list[str], layers: list[str]) -> None:
    """The weight-error table; each cell also gives the CPU seconds of that quantization (the vq cells'
    nearest-entry fit is what ``--budget --method vq`` prices each layer with, RTN the scalar ones)."""
    import time

    print("| layer | " + " | ".join(f"{s} ({'rtn' if 'vq' not in s else 'vq, no feedback'})" for s in specs) + " |")
    print("|---" * (len(specs) + 1) + "|")
    for name in layers:
        w = src.load_tensor(name).float()
        rot = Rotation.seeded(w.shape[1], 0)
        wr = rot.rotate_weight(w)
        cells = []
        for text in specs:
            spec = QuantSpec.parse(text)
            t0 = time.process_time()
            qt = nearest_tensor(wr, spec) if spec.grid == "vq" else rtn(wr, spec, None, {})
            seconds = time.process_time() - t0
            err = (rot.unrotate_weight(qt.dequantize()) - w).norm() / w.norm()
            cells.append(f"{err:.4f} ({spec.bits_per_weight(*w.shape):.2f}; {seconds:.1f} CPU s)")
        short = name.removeprefix("model.").removesuffix(".weight")
        print(f"| {short} {tuple(w.shape)} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--output-error", action="store_true")
    ap.add_argument("--share", action="store_true", help="block 0's q/k/v: one codebook per layer vs one shared")
    ap.add_argument("--specs", default=",".join(SPECS), help="weight-error table: specs, comma-separated")
    ap.add_argument("--layers", default=",".join(LAYERS), help="weight-error table: tensor names, comma-separated")
    ap.add_argument("--pairs", default=",".join(PAIRS), help="--output-error: method:spec cells, comma-separated")
    ap.add_argument("--calib", default=PROSE, choices=[PROSE, PROSE_CODE], help="--output-error's Hessian text")
    args = ap.parse_args()
    torch.set_num_threads(1)
    src = open_source(args.model)
    if args.share:
        return shared_codebook(src)
    if args.output_error:
        return output_errors(src, args.pairs.split(","), args.calib)
    weight_errors(src, args.specs.split(","), args.layers.split(","))

if __name__ == "__main__":
    main()
