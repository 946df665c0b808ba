"""CPU seconds of one Fisher window of ``--budget``'s sensitivity pass, before a whole pass is started.

The pass (``plan/sensitivity.py``) runs every calibration window once per chunk of layers whose float32
accumulators fit ``FISHER_BYTES``; this times one 512-token window (the prose+code calibration text) for
the first chunk (the top layers: the shortest backward) and the last (the bottom layers: a backward
through every block), and prints the peak RSS. A whole pass costs about windows x chunks x these.

    OMP_NUM_THREADS=1 python bench/fisher_cost.py --model qwen2.5-coder-1.5b

Nothing asserted; one thread.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from bitsmith.calib.data import calibration_batches, mixed_calibration_text
from bitsmith.models import open_source
from bitsmith.pipeline.common import quantizable_layers
from bitsmith.plan.sensitivity import FISHER_BYTES, fisher_chunks, fisher_diagonal, float_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=512, help="window length (default 512, as --calib-len)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    src = open_source(args.model)
    layers = quantizable_layers(src.config, False, False)
    t0 = time.process_time()
    net = float_model(src, layers)
    print(f"float32 model built: {time.process_time() - t0:.1f} CPU s", flush=True)
    chunks = fisher_chunks(layers, FISHER_BYTES)
    print(f"{len(layers)} layers in {len(chunks)} chunks of {[len(c) for c in chunks]}", flush=True)
    ids = calibration_batches(src.tokenizer(), mixed_calibration_text(), 1, args.tokens)  # [1, tokens]
    for label, chunk in (("first chunk (top layers)", chunks[0]), ("last chunk (bottom layers)", chunks[-1])):
        t0 = time.process_time()
        fisher_diagonal(net, chunk, ids, 0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(f"{label}: {len(chunk)} layers, one window of {ids.shape[1]}: {time.process_time() - t0:.1f} CPU s, "
              f"peak RSS {peak:.2f} GB", flush=True)


if __name__ == "__main__":
    main()
