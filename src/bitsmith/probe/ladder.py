"""The reference's own quantization ladder on the probe's positions: the reference with its decoder linears
quantized to w8, w4g128, w3g128 and w2g64 in turn (dequantized and swapped into the float model: no
checkpoint, the same logits up to float rounding), each scored against the reference with the same top-k
truncation as the endpoint (:func:`topk_kl` over the rung's own top k).

How the rungs are made (``LADDER_METHODS``, ``bitsmith probe --ladder-method``):

- ``hqq`` (default): the best calibration-free method measured on SmolLM2 at 3-4 bits
  (bench/results/calibrated-methods: w3g128 KLD 1.43 vs 1.48 min/max RTN and 1.91 clip-searched RTN).
  A ladder of weak rungs reads every good quantizer as "more bits than it has", so the rungs should be
  as good as a calibration-free quantizer of that width gets. ~15x slower than plain RTN (about a
  second per million weights and rung on one core), paid once per reference (the cache).
- ``rtn``: plain min-max RTN (``bitsmith quantize --method rtn --no-clip-search``): fastest.
- ``rtn-clip``: RTN with its MSE clip search (``bitsmith quantize --method rtn``).

Each rung carries its effective bits per weight over the quantized layers (codes plus fp16 scales and
zeros: w4g128 is 4.25, w2g64 2.5), and the verdict interpolates on those, so "behaves like ~4.2 bits"
is comparable with a GGUF's bits per weight (Q4_0 4.5, Q2_K 2.625) rather than with rung names.

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

__all__ = ["DEFAULT_LADDER_METHOD", "DEFAULT_RUNGS", "LADDER_METHODS", "Ladder", "RungScores", "check_ladder_method",
           "compute_ladder", "ladder_cache_file", "load_or_compute", "rung_bits"]

log = logging.getLogger(__name__)

DEFAULT_RUNGS = ("w8", "w4g128", "w3g128", "w2g64")
LADDER_VERSION = "2"  # 2: rung bits per weight, the method in the key
RTN_OPTIONS = {"clip_search": False}  # plain min-max RTN: the "rtn" ladder
# ladder method -> (bitsmith method, its options); see the module docstring
LADDER_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "hqq": ("hqq", {}), "rtn": ("rtn", RTN_OPTIONS), "rtn-clip": ("rtn", {})}
DEFAULT_LADDER_METHOD = "hqq"


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
    bits: dict[str, float]  # rung -> effective bits per weight over the quantized layers
    method: str = DEFAULT_LADDER_METHOD

    def as_json(self) -> dict[str, Any]:
        return {"version": LADDER_VERSION, "rungs": list(self.rungs), "k": self.k, "method": self.method,
                "bits": self.bits,
                "scores": {r: {d: {"kl": s.kl.tolist(), "top1": s.top1.int().tolist()} for d, s in ds.items()}
                           for r, ds in self.scores.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ladder:
        if data.get("version") != LADDER_VERSION:
            raise ValueError(f"ladder cache version {data.get('version')!r}, not {LADDER_VERSION}")
        scores = {r: {d: RungScores(torch.tensor(s["kl"], dtype=torch.float64), torch.tensor(s["top1"]).bool())
                      for d, s in ds.items()} for r, ds in data["scores"].items()}
        return cls(tuple(data["rungs"]), int(data["k"]), scores, {r: float(b) for r, b in data["bits"].items()},
                   str(data["method"]))


def check_ladder_method(method: str) -> None:
    """Refuse an unknown ladder method before anything is loaded."""
    if method not in LADDER_METHODS:
        raise ValueError(f"unknown ladder method {method!r}; use one of {', '.join(LADDER_METHODS)}")


def rung_bits(rung: str, shapes: list[tuple[int, int]]) -> float:
    """Effective bits per weight of ``rung`` over layers of these (out, in) shapes: codes, scales, zeros."""
    from bitsmith.spec import QuantSpec

    spec = QuantSpec.parse(rung)
    return sum(spec.stored_bits(o, i) for o, i in shapes) / sum(o * i for o, i in shapes)


def ladder_cache_file(reference_id: str, windows: dict[str, Tensor], k: int, rungs: tuple[str, ...],
                      method: str = DEFAULT_LADDER_METHOD) -> Path:
    """The cache file of this (reference, positions, k, rungs, method); the key hashes all five."""
    h = hashlib.sha256(json.dumps([reference_id, k, list(rungs), LADDER_VERSION, method]).encode())
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
                   progress: Callable[[str], None] | None = None, method: str = DEFAULT_LADDER_METHOD) -> Ladder:
    """Score each rung of ``net`` (the float reference) on ``windows``; ``weights(name)`` gives a layer's
    original float weight (read again from the source, so nothing is held twice); ``ref_logp`` holds the
    reference's log-probs [n - 1, V] per domain; ``method`` names how rungs are made (``LADDER_METHODS``).
    ``net`` is left with its original weights."""
    from bitsmith.methods import get_method
    from bitsmith.spec import QuantSpec

    check_ladder_method(method)
    name_of, options = LADDER_METHODS[method]
    quantize = get_method(name_of)
    shapes = [tuple(net.get_submodule(name).weight.shape) for name in layers]
    scores: dict[str, dict[str, RungScores]] = {}
    try:
        with torch.inference_mode():
            for rung in rungs:
                spec = QuantSpec.parse(rung)
                for name in layers:
                    param = net.get_submodule(name).weight
                    param.data = quantize(weights(name).float(), spec, None, dict(options)).dequantize().to(param.dtype)
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
    return Ladder(tuple(rungs), k, scores, {r: rung_bits(r, shapes) for r in rungs}, method)


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
