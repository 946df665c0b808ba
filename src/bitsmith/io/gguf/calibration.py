"""Calibration statistics for GGUF export: llama.cpp's imatrix and GPTQ Hessians from one forward pass.

One forward pass of the whole model over the shipped calibration text (State of the Union), with a
pre-hook on every linear layer: per input channel the mean squared activation (the imatrix, in
float64 sums) and, for the decoder blocks, the mean Gram matrix ``X^T X / tokens`` (float32).
Layers that read the same tensor (q/k/v, gate/up) share one entry.

This is not :class:`bitsmith.calib.stats.StatsAccumulator`: that one sums in float32 (the imatrix
would differ in its last bits) and splits wide Gram matrices into panels (a different summation
order), and both would change the bytes of the files this exporter writes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def activation_importance(model: str | Path, tokens: int = 4096, seq_len: int = 512) -> dict[str, np.ndarray]:
    """llama.cpp's imatrix: per linear layer (HF weight name), the mean squared input activation of
    each input channel over ``tokens`` tokens of the shipped calibration text (State of the Union)."""
    return calibration_statistics(model, tokens, seq_len)[0]


class _InputStats:
    """Sums of x^2 (and of x x^T) per first reader of each input; see the module docstring."""

    def __init__(self, hessians: bool) -> None:
        self.hessians = hessians
        self.sums: dict[str, torch.Tensor] = {}
        self.grams: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.same_input: dict[str, str] = {}  # q/k/v (gate/up) read one tensor: one Gram matrix serves them all
        # this window's inputs -> (first module that read it, the input kept alive so that no later tensor reuses its address)
        self.seen: dict[tuple[int, tuple[int, ...]], tuple[str, torch.Tensor]] = {}

    def hook(self, name: str) -> Callable[..., None]:
        def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            key = (args[0].data_ptr(), tuple(args[0].shape))
            first = self.same_input.setdefault(name, self.seen.setdefault(key, (name, args[0]))[0])
            if first != name:
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1])  # [tokens, in]
            self.sums[name] = self.sums.get(name, 0) + (x.double() ** 2).sum(0)
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]
            if self.hessians and ".layers." in name:
                xf = x.float()
                self.grams[name] = self.grams.get(name, 0) + xf.T @ xf
        return record

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
        imat = {n: (self.sums[f] / self.counts[f]).float().numpy() for n, f in self.same_input.items()}
        mean = {f: g / self.counts[f] for f, g in self.grams.items()}
        return imat, {n: mean[f] for n, f in self.same_input.items() if f in mean}


def calibration_statistics(model: str | Path, tokens: int = 4096, seq_len: int = 512, hessians: bool = False,
                           ) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """One forward pass over ``tokens`` tokens of the shipped calibration text (State of the Union):
    (imatrix: HF weight name -> mean squared input activation per input channel,
     hessians: HF weight name -> X^T X / tokens (float32 [in, in]) of the decoder blocks' linears,
     empty unless ``hessians``). The imatrix is the Hessian's diagonal."""
    from importlib.resources import files

    from bitsmith.runtime.load import load_model

    loaded = load_model(model)
    text = files("bitsmith.data").joinpath("sotu_calibration.txt").read_text(encoding="utf-8")
    ids = torch.tensor(loaded.tokenizer(text).input_ids[:tokens])  # [T]
    stats = _InputStats(hessians)
    handles = [m.register_forward_pre_hook(stats.hook(f"{n}.weight")) for n, m in loaded.model.named_modules()
               if isinstance(m, torch.nn.Linear) or type(m).__name__ == "QuantLinear"]
    try:
        with torch.inference_mode():
            for start in range(0, max(len(ids) - 1, 1), seq_len):
                stats.seen.clear()
                loaded.model(ids[start:start + seq_len].unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return stats.result()
