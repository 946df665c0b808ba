"""One true-sequential stage of the calibrated pipeline: which linears form the stages, their input
statistics on the partially quantized block, and their quantization with per-layer reports.

A stage is a set of linears that read the same input (q,k,v; o; gate,up; down). Its statistics are
collected by running the block only up to the stage's first linear, so they see every earlier stage
already quantized (GPTQ's "true sequential" order).
"""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from bitsmith.calib.stats import StatsAccumulator
from bitsmith.methods import LayerStats, Method
from bitsmith.pipeline.batches import run_batches
from bitsmith.pipeline.capture import ActivationStore, BlockCall
from bitsmith.pipeline.common import layer_report, sqnr_db_by_rows
from bitsmith.pipeline.device import batch_workers
from bitsmith.pipeline.plan import QuantizePlan
from bitsmith.pipeline.replay import OutputReplay, SpilledTail
from bitsmith.primitives import sqnr_db


RTN_CHUNK_WEIGHTS = 1 << 16  # weights per chunk of the report's RTN comparison
# Tokens in the Hessian of a quantizer that needs none (RTN, HQQ, after AWQ or with --calib): it only
# feeds the report's relative output error, which 8 sequences of 512 estimate well
REPORT_HESSIAN_TOKENS = 4096
# weights per slice of rows reconstructed for a layer's report (16 MB of float32): a whole-tensor
# reconstruction of the 151,936 x 1,536 head, and RTN's beside it, were 0.93 GB each
REPORT_ROWS_WEIGHTS = 1 << 22


def report_hessian_tokens(method_name: str) -> int | None:
    """The Hessian token cap for quantizer ``method_name``: None (every token) when it needs a Hessian."""
    from bitsmith.methods import Needs, method_info

    return None if method_info(method_name).needs is Needs.HESSIAN else REPORT_HESSIAN_TOKENS


class _StopForward(Exception):
    """Raised from a hook once a stage's input is seen: the rest of the block is not needed."""


def find_stages(block: nn.Module, linears: dict[str, nn.Linear], hidden: torch.Tensor, call: BlockCall) -> list[list[str]]:
    """Group the block's linears into true-sequential stages, in execution order: linears called on
    the same input tensor (q,k,v; gate,up) are one stage. Found by running one batch with hooks, so
    no table per architecture is needed."""
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [lin.register_forward_pre_hook(lambda m, a, rel=rel: seen.append((rel, a[0]))) for rel, lin in linears.items()]
    try:
        block(hidden, *call[0], **call[1])
    finally:
        for h in hooks:
            h.remove()
    stages: list[list[str]] = []
    keys: list[tuple] = []
    for rel, x in seen:
        if any(rel in s for s in stages):
            continue  # called twice: the first call decides
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
        if key in keys:
            stages[keys.index(key)].append(rel)
        else:
            keys.append(key)
            stages.append([rel])
    unused = [rel for rel in linears if not any(rel in s for s in stages)]
    if unused:
        raise ValueError(f"the linear layer(s) {', '.join(unused)} are never called by the block's forward; "
                         "this architecture is not supported by the calibrated pipeline (use --method rtn)")
    return stages


def block_stages(block: nn.Module, linears: dict[str, nn.Linear], hidden: torch.Tensor, call: BlockCall,
                 known: dict) -> list[list[str]]:
    """:func:`find_stages`, run once per kind of block: blocks of one class with the same linear names run
    the same forward code, so their stages are the same and the later ones skip the discovery forward
    (a whole block forward over one batch: 1/16 of a SmolLM2 block's forwards at 128 x 512). ``known``
    maps (block class, linear names) to stages and is filled here; pass one dict per run."""
    key = (type(block), tuple(linears))
    if key not in known:
        known[key] = find_stages(block, linears, hidden, call)
    return [list(stage) for stage in known[key]]


def stage_stats(
    block: nn.Module, first: nn.Linear, store: ActivationStore, slices: list[slice], calls: list[BlockCall],
    replay: "OutputReplay | None" = None, tail_of: str | None = None, hessian_dtype: str = "fp32",
    hessian_tokens: int | None = None, spill: Path | None = None, device: "torch.device | str" = "cpu",
) -> LayerStats:
    """Input statistics of a stage over all calibration batches: the block runs only up to the
    stage's first linear (the hook stops it there), replaying final sub-modules. ``tail_of``, the
    name of a stage's only linear, also hands its input per batch to ``replay`` as a tail (see
    :class:`OutputReplay`), as far as the replay budget allows. ``hessian_tokens`` caps the tokens
    in the Hessian (:class:`StatsAccumulator`; the importance covers all). A tail beyond the replay
    budget goes to the file ``spill`` (:class:`SpilledTail`) when given, else is not kept. ``device``: where
    the block is; each batch is copied there from ``store`` (on the CPU), and the statistics sum there."""
    acc = StatsAccumulator(first.in_features, hessian_dtype, hessian_tokens, device)
    keep = replay.tail_recorder(tail_of) if replay is not None and tail_of else None
    tail_of = tail_of if keep is not None else None
    caught = threading.local()  # each thread's stage input (batches run in parallel threads)

    def catch(module: nn.Module, args: tuple) -> None:
        caught.x = args[0]
        raise _StopForward

    def run(b: int) -> torch.Tensor | None:
        if replay is not None:
            replay.batch = b
        caught.x = None
        args, kwargs = calls[b]
        try:
            block(store.tensor[slices[b]].to(device), *args, **kwargs)
        except _StopForward:
            pass
        x, caught.x = caught.x, None  # the thread-local must not keep it: see the loop below
        return x

    hook = first.register_forward_pre_hook(catch)
    try:
        with replay.active(tail_of=tail_of) if replay is not None else nullcontext():
            for _, x in run_batches(run, len(slices), batch_workers(device)):  # in batch order: the sums do not depend on threads
                if x is None:
                    continue
                acc.add(x)
                if keep is not None:
                    if not isinstance(keep, SpilledTail) and (
                            replay.used() + x.numel() * x.element_size() * len(slices) > replay.budget):
                        # would not fit: to a file, or the parent is recomputed instead
                        keep = None if spill is None else _spilled(keep, spill)
                    if keep is not None:
                        keep.append(x)
                del x  # summed (and spilled): not held while the next wave of batches runs
    except BaseException:
        if isinstance(keep, SpilledTail):
            keep.close()
        raise
    finally:
        hook.remove()
    if keep is not None:
        replay.keep_tail(tail_of, keep)
    return acc.stats()


def _spilled(kept: list, path: Path) -> SpilledTail:
    """A :class:`SpilledTail` at ``path`` holding the batches ``kept`` so far."""
    tail = SpilledTail(path)
    for x in kept:
        tail.append(x)
    return tail


def quantize_stage(names: list[str], weights: list[torch.Tensor], stats: LayerStats, method: Method,
                    plan: QuantizePlan) -> list[tuple]:
    """Quantize a stage's layers (they share ``stats``): in one call when the method can take them
    together (``method.many``, e.g. GPTQ's one walk over the stacked rows) and they share a spec,
    else one by one. Returns (QuantizedTensor, report) per layer. The method and the reports run on
    ``plan.device`` (weights and statistics are copied there); the tensors come back on the CPU."""
    specs = [plan.spec_for(n) for n in names]
    many = getattr(method, "many", None)
    if many is None or len(names) < 2 or any(s != specs[0] for s in specs):
        return [quantize_linear(n, w, stats, method, plan) for n, w in zip(names, weights)]
    weights, stats = [w.to(plan.device) for w in weights], stats_on(stats, plan.device)
    t0 = time.perf_counter()
    qts = many(weights, specs[0], stats, plan.method_options())
    elapsed = (time.perf_counter() - t0) / len(names)
    return [(to_cpu(qt), _linear_report(n, w, qt, stats, method, elapsed, plan.report_dtype))
            for n, w, qt in zip(names, weights, qts)]


def quantize_linear(name: str, weight: torch.Tensor, stats: LayerStats, method: Method, plan: QuantizePlan):
    """Quantize one layer; its report adds ``output_error``, the relative squared output error
    ||X W^T - X Wq^T||^2 / ||X W^T||^2 on the calibration inputs, and plain RTN's for comparison.
    Computed on ``plan.device``; the QuantizedTensor comes back on the CPU."""
    weight, stats = weight.to(plan.device), stats_on(stats, plan.device)
    t0 = time.perf_counter()
    qt = method(weight, plan.spec_for(name), stats, plan.method_options())
    return to_cpu(qt), _linear_report(name, weight, qt, stats, method, time.perf_counter() - t0, plan.report_dtype)


def stats_on(stats: LayerStats, device: "torch.device | str") -> LayerStats:
    """``stats`` with its tensors on ``device`` (itself when they are there already, or None)."""
    if stats is None or all(t is None or t.device == torch.device(device) for t in (stats.hessian, stats.importance)):
        return stats
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return LayerStats(hessian=move(stats.hessian), importance=move(stats.importance), tokens=stats.tokens)


def to_cpu(qt):
    """A QuantizedTensor on the CPU, where the checkpoint is written (itself when it is there)."""
    return qt if qt.codes.device.type == "cpu" else qt.to("cpu")


def _linear_report(name: str, weight: torch.Tensor, qt, stats: LayerStats, method: Method, seconds: float,
                   products: str = "fp32") -> dict:
    from bitsmith.methods.gptq import layer_errors_by_rows
    from bitsmith.methods.rtn import rtn

    with_rtn = method is not rtn
    if by_rows(qt):
        sqnr = sqnr_db_by_rows(weight, lambda rows: qt.rows(rows).weight())

        def approx(rows: slice) -> list[torch.Tensor]:  # RTN's ranges are per group: rows give the same values
            return [qt.rows(rows).weight()] + ([rtn_dequantized(weight[rows].float(), qt.spec)] if with_rtn else [])
    else:  # a per-tensor grid or codebook (fit, vq) or a rotation: whole reconstructions
        # qt.weight(): the dequantized weight in the layer's own basis (a rotated layer un-rotates it)
        whole = [qt.weight()] + ([rtn_dequantized(weight.float(), qt.spec)] if with_rtn else [])
        sqnr = sqnr_db(weight, whole[0])
        approx = lambda rows: [d[rows] for d in whole]  # noqa: E731
    report = layer_report(name, weight, qt, seconds, sqnr)
    step = max(1, REPORT_ROWS_WEIGHTS // max(1, weight.shape[1]))
    errors = layer_errors_by_rows(weight, approx, 1 + with_rtn, stats.hessian, chunk_rows=step, products=products)
    report["output_error"] = errors[0]
    if with_rtn:
        report["rtn_output_error"] = errors[1]
    report["tokens"] = stats.tokens
    return report


def by_rows(qt) -> bool:
    """Whether a layer's reconstruction (and RTN's) can be made a slice of rows at a time with the same
    values: uniform codes without a rotation (a fitted grid or codebook is fitted on the whole tensor)."""
    return qt.spec.grid not in ("fit", "vq") and getattr(qt, "rotation", None) is None


def rtn_dequantized(weight: torch.Tensor, spec) -> torch.Tensor:
    """``rtn(weight, spec).dequantize()`` (the report's comparison), computed on cache-sized chunks
    of rows spread over the cores (:mod:`bitsmith.methods.parallel`). Rows are independent in RTN's
    range search, so the result is the same; a fitted grid (``fit``) is per tensor and goes whole."""
    from bitsmith.methods import native
    from bitsmith.methods.parallel import map_chunks, row_chunks
    from bitsmith.methods.rtn import DEFAULT_CLIP_GRID, quantize_with_params, rtn
    from bitsmith.primitives import group_mask, to_groups

    if spec.grid == "fit":
        return rtn(weight, spec, None, {}).dequantize()
    if spec.grid == "vq":  # vector codes: the same codebook fit, nearest vectors, no feedback
        from bitsmith.methods.vq import nearest_tensor

        return nearest_tensor(weight, spec).dequantize()
    # uniform specs: rtn's default clip search in one native call (methods.native), then its codes
    fast = native.range_search(to_groups(weight.float(), spec), spec, group_mask(spec, weight.shape[1]), None,
                               DEFAULT_CLIP_GRID, weight.shape[1])
    if fast is not None:
        return quantize_with_params(weight.float(), fast[0], fast[1], spec).dequantize()
    chunks = row_chunks(weight.shape[0], weight.shape[1], RTN_CHUNK_WEIGHTS if weight.device.type == "cpu" else weight.numel())
    return torch.cat(map_chunks(lambda rows: rtn(weight[rows], spec, None, {}).dequantize(), chunks))
