"""Weight-space error of scalar and vector codes on SmolLM2-135M layers, in the rotated basis
(issue 19): ``||Q(W R^T) R - W|| / ||W||`` for RTN (clip search) and the vq codebook without error
feedback (no calibration), so the formats are compared before GPTQ's feedback is added to either.

    python bench/vq_weight_error.py [--model smollm2-135m]

Each cell: relative error (bits/weight of that layer, codebook and scales counted). Nothing asserted.
"""

from __future__ import annotations

import argparse

import torch

from bitsmith.hadamard import Rotation
from bitsmith.methods.rtn import rtn
from bitsmith.methods.vq import nearest_tensor
from bitsmith.models import open_source
from bitsmith.spec import QuantSpec

LAYERS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.15.mlp.down_proj.weight",
          "model.layers.29.mlp.gate_proj.weight"]
SPECS = ["w2g64", "w2g64vq", "w2vq", "w3g128", "w3g128vq"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    torch.set_num_threads(1)
    src = open_source(args.model)
    print("| layer | " + " | ".join(f"{s} ({'rtn' if 'vq' not in s else 'vq, no feedback'})" for s in SPECS) + " |")
    print("|---" * (len(SPECS) + 1) + "|")
    for name in LAYERS:
        w = src.load_tensor(name).float()
        rot = Rotation.seeded(w.shape[1], 0)
        wr = rot.rotate_weight(w)
        cells = []
        for text in SPECS:
            spec = QuantSpec.parse(text)
            qt = nearest_tensor(wr, spec) if spec.grid == "vq" else rtn(wr, spec, None, {})
            err = (rot.unrotate_weight(qt.dequantize()) - w).norm() / w.norm()
            cells.append(f"{err:.4f} ({spec.bits_per_weight(*w.shape):.2f})")
        short = name.removeprefix("model.").removesuffix(".weight")
        print(f"| {short} {tuple(w.shape)} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
