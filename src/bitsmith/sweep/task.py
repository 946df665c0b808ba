"""One variant's work, as a task any executor can run: quantize, score every domain against the
reference cache, return the result (a plain dict the driver stores).

A task carries everything it needs (the reference caches travel with it, a few MB per domain), so
a Ray worker on another node needs only the model and bitsmith, not the driver's files. Its
checkpoint goes to ``job.checkpoint``: a complete checkpoint found there (a run killed after
quantizing but before its result was stored) is scored without quantizing again, and a calibrated
run continues from its last finished block (the pipeline's ``<out>.partial`` state)."""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitsmith.sweep.config import Variant

__all__ = ["VariantJob", "run_variant", "checkpoint_size", "tensor_bytes"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VariantJob:
    model: str
    variant: Variant
    caches: dict[str, Any]  # domain -> eval.refcache.RefCache
    checkpoint: str  # folder of this variant's checkpoint
    keep_checkpoint: bool = False
    calib_samples: int = 128
    calib_len: int = 512
    threads: int = 1
    options: tuple[tuple[str, object], ...] = ()  # the method's options, as the CLI's --no-clip-search


def checkpoint_size(path: Path) -> int:
    """Bytes of every file in a checkpoint folder (the file size of docs/PROTOCOL.md section 4)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def tensor_bytes(path: Path) -> int:
    """Bytes of the tensors alone (no headers, config or report): equal for equal specs whatever the
    method, so the frontier never separates two variants by the length of their metadata."""
    from bitsmith.io.safetensors import read_header, shard_files

    return sum(t.nbytes for f in shard_files(Path(path)) for t in read_header(f).tensors.values())


def _quantize(job: VariantJob, path: Path) -> bool:
    """Quantize into ``path`` unless a complete checkpoint is already there; True when it was reused."""
    from bitsmith.calib.data import CalibrationConfig
    from bitsmith.io.checkpoint import read_info
    from bitsmith.pipeline.plan import QuantizePlan, resolve_compute_dtype
    from bitsmith.pipeline.quantize import quantize
    from bitsmith.spec import QuantSpec

    if path.is_dir() and read_info(path) is not None:  # published atomically: present means complete
        return True
    plan = QuantizePlan(QuantSpec.parse(job.variant.spec), job.variant.method, dict(job.options),
                        compute_dtype=resolve_compute_dtype("auto"))
    if plan.needs_calibration:
        from dataclasses import replace

        plan = replace(plan, calib=CalibrationConfig(samples=job.calib_samples, seq_len=job.calib_len))
    path.parent.mkdir(parents=True, exist_ok=True)
    quantize(job.model, path, plan, resume=plan.needs_calibration)
    return False


def _node() -> str:
    """Where the task ran: the Ray node id when it runs on Ray, else the host name."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return f"ray:{ray.get_runtime_context().get_node_id()[:8]}"
    return socket.gethostname()


def run_variant(job: VariantJob) -> dict[str, Any]:
    """Quantize and score one variant; the result dict of :mod:`bitsmith.sweep.frontier`."""
    import torch

    from bitsmith.eval.domains import domain_metrics
    from bitsmith.eval.refcache import evaluate_against_cache
    from bitsmith.io.checkpoint import read_info
    from bitsmith.runtime.load import load_model
    from bitsmith.runtime.options import RuntimeOptions

    torch.set_num_threads(max(1, job.threads))
    path = Path(job.checkpoint)
    t0 = time.perf_counter()
    reused = _quantize(job, path)
    t1 = time.perf_counter()
    report = read_info(path).report
    loaded = load_model(path, options=RuntimeOptions.for_measurement())
    domains = {}
    for name, cache in job.caches.items():
        metrics = domain_metrics(evaluate_against_cache(loaded.model, cache))
        bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise ValueError(f"{job.variant.name} gave NaN/inf {', '.join(bad)} on {name}; run bitsmith inspect {path}")
        domains[name] = metrics
    size, weights = checkpoint_size(path), tensor_bytes(path)
    del loaded
    if not job.keep_checkpoint:
        shutil.rmtree(path, ignore_errors=True)
    return {"name": job.variant.name, "method": job.variant.method, "spec": job.variant.spec,
            "size_bytes": size, "tensor_bytes": weights, "bits_per_weight": report.get("bits_per_weight"),
            "quantize_seconds": round(t1 - t0, 2), "eval_seconds": round(time.perf_counter() - t1, 2),
            "reused_checkpoint": reused, "node": _node(), "pid": os.getpid(), "threads": job.threads,
            "domains": domains}
