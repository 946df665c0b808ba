"""The reference's own quantization ladder on the probe's positions: the reference with its decoder linears
RTN-quantized to w8, w4g128, w3g128 and w2g64 in turn (plain min-max RTN, ``bitsmith quantize --spec S``
without its clip search, which would cost ~7 s per million weights on two loaded cores; dequantized and
swapped into the float model: no checkpoint, the same logits up to float rounding), each
scored against the reference with the same top-k truncation as the endpoint (:func:`topk_kl` over the
rung's own top k).

A ladder depends only on the reference, the positions and k, so it is cached as JSON under
``~/.cache/bitsmith/probe`` (``$BITSMITH_CACHE/probe``) and a second probe of another endpoint costs only
the reference's forward.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bitsmith.probe.divergence import topk_kl, topk_of

__all__ = ["DEFAULT_RUNGS", "Ladder", "RungScores", "compute_ladder", "ladder_cache_file", "load_or_compute"]

log = logging.getLogger(__name__)

DEFAULT_RUNGS = ("w8", "w4g128", "w3g128", "w2g64")
LADDER_VERSION = "1"
RTN_OPTIONS = {"clip_search": False}  # see the module docstring


@dataclass(frozen=True)
class RungScores:
    """One rung on one domain: per-position top-k KL and top-1 agreement with the reference."""

    kl: Tensor  # [n] float64
    top1: Tensor  # [n] bool


@dataclass(frozen=True)
class Ladder:
    rungs: tuple[str, ...]
    k: int
    scores: dict[str, dict[str, RungScores]]  # rung -> domain -> scores

    def as_json(self) -> dict[str, Any]:
        return {"version": LADDER_VERSION, "rungs": list(self.rungs), "k": self.k,
                "scores": {r: {d: {"kl": s.kl.tolist(), "top1": s.top1.int().tolist()} for d, s in ds.items()}
                           for r, ds in self.scores.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ladder:
        scores = {r: {d: RungScores(torch.tensor(s["kl"], dtype=torch.float64), torch.tensor(s["top1"]).bool())
                      for d, s in ds.items()} for r, ds in data["scores"].items()}
        return cls(tuple(data["rungs"]), int(data["k"]), scores)


def ladder_cache_file(reference_id: str, windows: dict[str, Tensor], k: int, rungs: tuple[str, ...]) -> Path:
    """The cache file of this (reference, positions, k, rungs); the key hashes all four."""
    h = hashlib.sha256(json.dumps([reference_id, k, list(rungs), LADDER_VERSION]).encode())
    for name in sorted(windows):
        h.update(name.encode())
        h.update(windows[name].to(torch.int64).numpy().tobytes())
    env = os.environ.get("BITSMITH_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "bitsmith"
    return root / "probe" / f"ladder-{h.hexdigest()[:16]}.json"


def _logits(net: nn.Module, window: Tensor) -> Tensor:
    """Next-token logits [n - 1, V] of every position but the last."""
    return net(input_ids=window.long()[None], use_cache=False).logits[0, :-1]


def compute_ladder(net: nn.Module, weights: Callable[[str], Tensor], layers: list[str], ref_logp: dict[str, Tensor],
                   windows: dict[str, Tensor], k: int, rungs: tuple[str, ...] = DEFAULT_RUNGS,
                   progress: Callable[[str], None] | None = None) -> Ladder:
    """Score each rung of ``net`` (the float reference) on ``windows``; ``weights(name)`` gives a layer's
    original float weight (read again from the source, so nothing is held twice); ``ref_logp`` holds the
    reference's log-probs [n - 1, V] per domain. ``net`` is left with its original weights."""
    from bitsmith.methods import get_method
    from bitsmith.spec import QuantSpec

    rtn = get_method("rtn")
    scores: dict[str, dict[str, RungScores]] = {}
    try:
        with torch.inference_mode():
            for rung in rungs:
                spec = QuantSpec.parse(rung)
                for name in layers:
                    param = net.get_submodule(name).weight
                    param.data = rtn(weights(name).float(), spec, None, RTN_OPTIONS).dequantize().to(param.dtype)
                scores[rung] = {}
                for domain, window in windows.items():
                    ids, logq = topk_of(_logits(net, window), k)
                    ref = ref_logp[domain]
                    scores[rung][domain] = RungScores(topk_kl(ref, ids, logq), ids[:, 0] == ref.argmax(-1))
                if progress:
                    progress(rung)
    finally:
        with torch.no_grad():
            for name in layers:
                param = net.get_submodule(name).weight
                param.data = weights(name).to(param.dtype)
    return Ladder(tuple(rungs), k, scores)


def load_or_compute(path: Path, compute: Callable[[], Ladder]) -> tuple[Ladder, bool]:
    """(ladder, whether it came from the cache). A cache file that cannot be read is rebuilt."""
    if path.is_file():
        try:
            return Ladder.from_json(json.loads(path.read_text(encoding="utf-8"))), True
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ladder cache %s unreadable (%s); recomputing", path, exc)
    ladder = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(ladder.as_json()), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
    return ladder, False
