"""The calibrated, layer-wise streaming pipeline (GPTQ, AWQ, or any method given LayerStats).

The loop (IST-DASLab/gptq's "catch block-0 inputs, then walk the blocks"):

1. build the model with every decoder block left on the meta device; capture block 0's inputs and
   every block's call kwargs with recorders (:mod:`bitsmith.pipeline.capture`);
2. per block: load its weights from the source, apply the plan's transforms (AWQ), then quantize
   its linears true-sequentially, stage by stage (linears that read the same input form a stage:
   q,k,v; o; gate,up; down): collect the stage's input statistics on the partially quantized block,
   quantize, swap the dequantized weights in; then run the quantized block to make the next
   block's inputs; write the block, release its weights.

Peak memory is one block (fp32 master weights, each dropped once its stage is quantized, plus its
compute copy), one stage's Hessian with the method's working set (GPTQ: one more n x n matrix and
the weights in visit order), the replayed outputs (``plan.replay_bytes``) and the calibration
activations of this block and the next, which spill to a memory-mapped file when larger than
``plan.spill_bytes``. The checkpoint writer streams every tensor to disk as it comes.
Every finished block is committed to ``<out>.partial/`` so ``resume=True`` continues bit-identically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from bitsmith.calib.data import tokens_digest
from bitsmith.calib.stats import StatsAccumulator
from bitsmith.io.checkpoint import CheckpointError, CheckpointWriter
from bitsmith.io.destination import Destination, Staging
from bitsmith.io.ledger import ledger_dir
from bitsmith.kernels.alloc import heap_reuse, trim_heap
from bitsmith.methods import LayerStats, Method
from bitsmith.models.family import HEAD_WEIGHT
from bitsmith.pipeline.attention import calibration_attention
from bitsmith.pipeline.batches import run_batches
from bitsmith.pipeline.capture import ActivationStore, BlockCall, batch_slices, capture_block_calls
from bitsmith.pipeline.embedding import release_embedding, rtn_by_rows
from bitsmith.pipeline.device import batch_workers, to_device
from bitsmith.pipeline.common import (
    STORAGE_DTYPES, check_layers, finish_folder, fits_fp16, kept_report, layer_report, quantizable_layers,
    sqnr_db_by_rows, storage, summary,
)
from bitsmith.pipeline.plan import QuantizePlan
from bitsmith.pipeline.replay import OutputReplay
from bitsmith.pipeline.stages import (
    block_stages, find_stages, quantize_linear, quantize_stage, report_hessian_tokens, stage_stats,
)
from bitsmith.pipeline.workstate import WorkState
from bitsmith.transforms import get_transform

log = logging.getLogger(__name__)

# a replay tail beyond the replay budget (Qwen2.5-1.5B's down_proj input, 1.17 GB per block at 128 x 512)
# is kept in this file of the work folder: the final pass reads it back instead of recomputing gate/up
TAIL_FILE = "tail-{}.bin"  # one per linear (a tail is read while the next is written)
SOLVE_TRIM_WIDTH = 4096  # stages with at least this many inputs are solved on a trimmed heap, always (_before_solve)
# The allocator for the whole run (kernels.alloc): allocations up to this size come from the heap and
# stay there when freed, so the ~100 forwards of every block reuse the same pages instead of mapping
# and page-faulting fresh ones (SmolLM2's GPTQ: 9.1 M minor faults, ~21 of ~170 CPU s in the kernel);
# larger ones (a 1.5B's Hessians and activation stores) are mapped and returned to the OS at free
RUN_HEAP_THRESHOLD = 64 << 20
# Freed heap pages go back to the OS (at the heap's top when freed, anywhere at the stages' and blocks'
# trims) only when more than the replay budget plus this many bytes are free: the next block reuses
# them (its replayed outputs, the largest reusable part, are of the same sizes). A trim after every
# stage and block made the next pass fault its working set in again, and so did glibc's own trim of
# the heap's top at 64 MiB (SmolLM2 at 128 x 512: 6.5 M faults with a fixed 512 MiB slack, 3.3 M with
# a 64 MiB top, against 9.1 M before)
HEAP_SLACK = 256 << 20
# ... but only for models below this size (fp32 bytes of all tensors). There the activations, not the
# weights, set the run's memory, and re-faulting them was ~12% of SmolLM2's GPTQ CPU time. On larger
# models the heap is trimmed at every stage and block and glibc keeps its own thresholds, as before:
# the kept heap raised a 2-block model at the 1.5B's widths from 2.41 to 3.00 GB peak (session 13),
# and the 1.5B's GPTQ must stay within 40% of its fp32 size (2.84 GB)
HEAP_KEEP_MAX_MODEL_BYTES = 1 << 30


@dataclass
class _Run:
    """One calibrated run's working set, handed between the steps of :func:`quantize_blocks`."""

    plan: QuantizePlan
    source: Any
    net: nn.Module
    blocks: nn.ModuleList
    prefix: str  # the blocks' module path, e.g. model.layers
    method: Method
    state: WorkState
    calib: torch.Tensor  # [samples, seq_len] token ids
    calls: list[list[BlockCall]]  # per block, per batch
    store: ActivationStore  # the inputs of the next block to quantize
    stages: dict = field(default_factory=dict)  # block_stages' findings, per kind of block
    heap_keep: int = 0  # free heap bytes kept between stages and blocks (heap_keep_bytes)


def quantize_blocks(
    model: str | Path,
    out_dir: Path,
    plan: QuantizePlan,
    calib: torch.Tensor,
    *,
    progress: Callable[[str, int, int], None] | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> Path:
    """Quantize ``model`` block by block with calibration tokens ``calib`` [samples, seq_len].

    ``plan.compute_dtype`` is the dtype of the block forwards and stored activations (bf16 is about
    twice as fast on CPU); Hessians are summed in float32 and methods always see the float32
    weights. ``plan.hessian_dtype="bf16"`` computes each batch's Hessian products in bf16 GEMMs
    (:class:`StatsAccumulator`; with bf16 forwards SmolLM2's GPTQ took 140.6 instead of 173.1 s
    and its KLD rose 2.1%, bench/results/calibrated-methods/gptq_speed.md). ``progress(name, done, total)``
    is called after each committed block.
    ``plan.replay_bytes`` bounds the finished sub-module outputs kept per block (:class:`OutputReplay`);
    it changes the time, never the result.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    destination = Destination(out_dir, "checkpoint", overwrite, CheckpointError)
    destination.check()  # before any work: an existing --out, or a foreign folder even with --overwrite
    if calib.dim() != 2 or calib.shape[0] < 1:
        raise ValueError(f"calibration tokens must be [samples, seq_len], got shape {tuple(calib.shape)}")
    windows = plan.calibration_windows(*calib.shape)
    if windows is not None:
        log.info("%s reads %d of the %d calibration sequences and %s no statistics: only those run through "
                 "the blocks", "/".join(plan.transforms), len(windows), calib.shape[0], plan.quantizer)
        calib = calib[windows]
    from bitsmith.models import open_source

    source = open_source(model)  # once: the allocator decision and the run both read it
    keep = heap_keep_bytes(source, plan)
    # the destination's lock before the work folder is opened: two --resume runs to one --out would
    # otherwise both continue from <out>.partial and overwrite each other's blocks
    with destination.stage() as staging, (heap_reuse(RUN_HEAP_THRESHOLD, keep) if keep else contextlib.nullcontext()):
        return _run_blocks(source, out_dir, plan, calib, staging, progress, resume, overwrite, start, keep)


def heap_keep_bytes(source: Any, plan: QuantizePlan) -> int:
    """Free heap bytes a calibrated run of the opened ``source`` keeps for reuse instead of trimming (0:
    trim at every stage and block): ``plan.replay_bytes + HEAP_SLACK`` for models under
    ``HEAP_KEEP_MAX_MODEL_BYTES`` in fp32."""
    fp32_bytes = 4 * sum(math.prod(source.tensor_shape(n)) for n in source.tensor_names())
    return plan.replay_bytes + HEAP_SLACK if fp32_bytes < HEAP_KEEP_MAX_MODEL_BYTES else 0


def _run_blocks(source: Any, out_dir: Path, plan: QuantizePlan, calib: torch.Tensor, staging: Staging,
                progress: Callable[[str, int, int], None] | None, resume: bool, overwrite: bool, start: float,
                heap_keep: int = 0) -> Path:
    """:func:`quantize_blocks` once the destination is locked and staged."""
    run = _open_run(source, out_dir, plan, calib, resume)
    run.heap_keep = heap_keep
    shape = tuple(run.store.tensor.shape)
    options = {**plan.recorded_options(),
               "calibration": {"samples": shape[0], "seq_len": shape[1], "hash": run.state.key["calib"]}}
    with CheckpointWriter(out_dir, plan.method, options, overwrite=overwrite, staging=staging) as writer:  # streams: holds no tensor
        embed_module = release_embedding(run.net)  # needed again only to quantize the head
        _trim_heap()  # the capture's freed temporaries, before the 0.93 GB tensors of _write_other_tensors
        head_is_tied, outside = _write_other_tensors(writer, run.source, run.net, run.prefix, plan)
        _walk_blocks(run, writer, progress)
        head_reports = []
        if plan.quantizes_own_head(run.source.tensor_names()):
            _load_block(run.net, run.source, embed_module)
            run.net.get_submodule(embed_module).to(STORAGE_DTYPES[plan.compute_dtype])
            head_reports = _quantize_head(run, head_is_tied, writer, embed_module)
        run.store.close()
        finish_folder(writer, run.source, head_is_tied)
        report = summary(run.source, plan, outside + [r for b in run.state.reports for r in b] + head_reports, start)
        path = writer.finish(report)
    run.state.remove()
    return path


def _open_run(source: Any, out_dir: Path, plan: QuantizePlan, calib: torch.Tensor, resume: bool) -> _Run:
    """Open the work state of the opened ``source``, build the model without its blocks, capture the inputs."""
    from bitsmith.models import build_model, embedding_and_head_names, find_blocks
    from bitsmith.models.meta import meta_model

    check_layers(quantizable_layers(source.config, plan.quantize_head, plan.quantize_embeddings), plan)
    method = plan.quantizer_fn()  # the method, wrapped by a basis transform (rotate) if any
    prefix, _ = find_blocks(meta_model(source.config))
    _, head_name = embedding_and_head_names(meta_model(source.config))
    if plan.hessian_dtype not in ("fp32", "bf16"):
        raise ValueError(f"hessian_dtype must be 'fp32' or 'bf16', got {plan.hessian_dtype!r}")
    compute_dtype = STORAGE_DTYPES[plan.compute_dtype]
    key = {**_state_key(source, plan, calib, compute_dtype), "hessian_dtype": plan.hessian_dtype,
           "report_dtype": plan.report_dtype}  # a resumed run must not mix bf16 and fp32 report figures
    state = WorkState.open(ledger_dir(out_dir), key, resume)
    net = build_model(source, compute_dtype, skip=lambda n: n.startswith(prefix + ".") or n == head_name)
    _, blocks = find_blocks(net)
    calls, store = _block_inputs(net, blocks, source, calib, state, compute_dtype, plan)
    return _Run(plan, source, net, blocks, prefix, method, state, calib, calls, store)


def _walk_blocks(run: _Run, writer: CheckpointWriter, progress: Callable[[str, int, int], None] | None) -> None:
    """Write the committed blocks of a resumed run, then quantize, commit and write the rest."""
    n_blocks = len(run.blocks)
    for i in range(run.state.done):
        _emit_block(writer, run.state, i)
    with calibration_attention(run.net.config):  # the blocks' causal attention on the native kernel
        for i in range(run.state.done, n_blocks):
            t0 = time.perf_counter()
            block_prefix = f"{run.prefix}.{i}"
            _load_block(run.net, run.source, block_prefix)
            tensors, specs, reports, run.store = _process_block(
                run.blocks[i], block_prefix, run.store, run.calls[i], run.method, run.plan, run.state, run.stages,
                run.heap_keep)
            _unload_block(run.blocks[i])
            _trim_heap(run.heap_keep)
            run.state.commit_block(i, tensors, specs, reports)
            _emit_block(writer, run.state, i)
            log.info("block %d/%d quantized in %.1f s", i + 1, n_blocks, time.perf_counter() - t0)
            if progress:
                progress(f"block {i + 1}/{n_blocks}", i + 1, n_blocks)


def _block_inputs(
    net: nn.Module, blocks: nn.ModuleList, source: Any, calib: torch.Tensor, state: WorkState,
    compute_dtype: torch.dtype, plan: QuantizePlan,
) -> tuple[list[list[BlockCall]], ActivationStore]:
    """Every block's call kwargs (always recaptured: cheap) and the first unfinished block's inputs:
    the captured embeddings on a fresh run, the committed activations on a resumed one."""
    resumed = state.done > 0 and state.has_inputs()
    shape = (calib.shape[0], calib.shape[1], _hidden_size(net, source.config))
    store = None if resumed else ActivationStore.create(shape, compute_dtype, state.inputs_file(0), plan.spill_bytes)
    calls = capture_block_calls(net, blocks, calib, plan.batch_size, store)
    if resumed:
        log.info("resuming at block %d of %d from %s", state.done + 1, len(blocks), state.path)
        return calls, ActivationStore.open(state.inputs_file(state.done), shape, compute_dtype, plan.spill_bytes)
    state.done, state.reports = 0, []
    store.save(state.inputs_file(0))
    state.commit_inputs()
    return calls, store


def _state_key(source: Any, plan: QuantizePlan, calib: torch.Tensor, dtype: torch.dtype) -> dict:
    """Everything that must match for a resume to be bit-identical (as resumable runs have always recorded it)."""
    options = json.loads(json.dumps(plan.run_options, sort_keys=True, default=str))
    layer_specs = {k: str(v) for k, v in sorted(plan.layer_specs.items())}
    return {"model": str(source.path), "spec": str(plan.spec), "layer_specs": layer_specs, "method": plan.method, "options": options,
            "quantize_head": plan.quantize_head, "quantize_embeddings": plan.quantize_embeddings,
            "unquantized_dtype": plan.unquantized_dtype, "calib": tokens_digest(calib), "calib_shape": list(calib.shape),
            "compute_dtype": str(dtype).removeprefix("torch."), "batch_size": plan.batch_size,
            # another device sums in another order: no bit-identical resume across devices (a CPU key is as before)
            **({"device": plan.device} if plan.device != "cpu" else {})}


def _hidden_size(net: nn.Module, config: Any) -> int:
    size = getattr(config, "hidden_size", None)
    return int(size) if size else int(net.get_input_embeddings().weight.shape[1])


def _load_block(net: nn.Module, source: Any, block_prefix: str) -> None:
    """Fill block ``block_prefix``'s parameters and persistent buffers from the source (fp32)."""
    from bitsmith.models.arch import load_checked, set_tensor

    block = net.get_submodule(block_prefix)
    for rel, tensor in block.state_dict(keep_vars=True).items():
        name = f"{block_prefix}.{rel}"
        set_tensor(net, name, load_checked(source, name, tensor.shape, torch.float32))


def _trim_heap(keep_free: int = 0) -> None:
    """Hand freed heap memory back to the OS when more than ``keep_free`` bytes of it are free. glibc
    keeps freed chunks below its mmap threshold (``RUN_HEAP_THRESHOLD`` here), so a long run's resident
    set creeps up by the fragments; ``malloc_trim`` releases them. A no-op without glibc."""
    trim_heap(keep_free)


def _before_solve(stats: LayerStats, keep_free: int = 0) -> LayerStats:
    """Trim the heap before a stage is solved; returns ``stats``. Why: the statistics pass leaves its
    freed activations in glibc's heap, and the solve's largest allocations (Qwen2.5-1.5B's down_proj:
    8,960 x 8,960 float32, 321 MB each, the Hessian and GPTQ's working copy; gate/up: their stacked
    17,920 x 1,536 weights, reports' slices) are fresh mappings that cannot reuse it, so without a trim
    both are resident at once. A stage at least ``SOLVE_TRIM_WIDTH`` inputs wide is always solved on a
    trimmed heap; narrower ones when more than ``keep_free`` bytes are free (the run's kept-heap bound,
    ``heap_keep_bytes``: 0 on models of 1 GiB and more). On the 1.5B at one thread the gate/up pass
    left 0.7-1.0 GB of heap resident (it records the attention's outputs for replay, 16 batches of
    12.6 MB among its temporaries), and the gate/up solve on top of it was the peak of three of four
    blocks (2.02-2.27 GiB; the down_proj stage, trimmed, 1.98)."""
    wide = stats.hessian is not None and stats.hessian.shape[0] >= SOLVE_TRIM_WIDTH
    _trim_heap(0 if wide else keep_free)
    return stats


def _unload_block(block: nn.Module) -> None:
    block.to("meta")  # releases the weights; the module keeps its structure


def _write_other_tensors(writer: CheckpointWriter, source: Any, net: nn.Module, prefix: str,
                         plan: QuantizePlan) -> tuple[bool, list[dict]]:
    """Every tensor outside the blocks, stored as the calibration-free path stores it (an embedding
    to quantize is a lookup table, not a linear: it gets RTN). Returns whether a tied lm_head is to
    be quantized, and so written last, untied from the embedding, and the report entry of the
    embedding (quantized, or kept at fp32 by the overflow rule), as the calibration-free path gives it."""
    from bitsmith.models import embedding_and_head_names

    names = source.tensor_names()
    embed_name, _ = embedding_and_head_names(net)
    reports = []
    for name in names:
        if name.startswith(prefix + ".") or (plan.quantize_head and name == HEAD_WEIGHT):
            continue  # blocks go one by one; the head is quantized after them, with its real inputs
        tensor = source.load_tensor(name)
        if plan.quantize_embeddings and name == embed_name:
            module, t0 = name.removesuffix(".weight"), time.perf_counter()
            qt = rtn_by_rows(tensor, plan.spec_for(module), plan.method_options())
            if fits_fp16(qt):  # its report entry (the summary's totals count it) before the fp32 table goes
                sqnr = sqnr_db_by_rows(tensor, lambda rows: qt.rows(rows).weight())
                reports.append(layer_report(module, tensor, qt, time.perf_counter() - t0, sqnr))
                tensor = None  # not needed to pack the codes: the fp32 table goes first (0.93 GB at 152k x 1536)
                writer.add_quantized(module, qt)
            else:  # the overflow rule (pipeline.common)
                reports.append(kept_report(module, tensor))
                writer.add_tensor(name, tensor.float())
        else:
            writer.add_tensor(name, storage(tensor, plan.unquantized_dtype))
        del tensor  # before the next load: two 152k-vocabulary matrices in fp32 are ~1.9 GB
    _trim_heap()
    return plan.unties_head(names), reports


def _emit_block(writer: CheckpointWriter, state: WorkState, index: int) -> None:
    tensors, quantized = state.load_block(index)
    for module, qt in quantized.items():
        writer.add_quantized(module, qt)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)


def _process_block(
    block: nn.Module, block_prefix: str, store: ActivationStore, calls: list[BlockCall], method: Method,
    plan: QuantizePlan, state: WorkState, known_stages: dict | None = None, heap_keep: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, dict], list[dict], ActivationStore]:
    """Quantize one loaded block; returns its plain tensors, its quantized tensors' specs, its layer
    reports (all keyed by full name) and the store holding the next block's inputs."""
    from bitsmith.models import block_linears

    slices = batch_slices(store.tensor.shape[0], plan.batch_size)
    compute_dtype, device = store.tensor.dtype, torch.device(plan.device)
    calls = to_device(calls, device)  # masks and rotary tables, once per block (the same objects on the CPU)
    clock = {"transform": 0.0, "statistics": 0.0, "solve": 0.0, "forward": 0.0}  # seconds, for the log
    with torch.no_grad():
        t0 = time.perf_counter()
        _apply_transforms(block, store, calls, plan)
        clock["transform"] = time.perf_counter() - t0
        linears = block_linears(block)
        # fp32 [out, in] masters: the loaded tensors themselves (block.to() below and the dequantized
        # weights swapped in later replace the modules' references, never these); each is dropped
        # once its stage is quantized
        masters = {rel: lin.weight.detach().float() for rel, lin in linears.items()}
        tensors = {f"{block_prefix}.{rel}": storage(t.detach(), plan.unquantized_dtype)
                   for rel, t in block.state_dict().items() if rel.removesuffix(".weight") not in linears}
        block.to(device=device, dtype=compute_dtype)  # the masters above stay fp32 on the CPU
        stages = block_stages(block, linears, store.tensor[slices[0]].to(device), calls[0],
                              {} if known_stages is None else known_stages)
        hessian_cap = report_hessian_tokens(plan.quantizer)
        replay = OutputReplay(block, linears, len(slices), plan.replay_bytes)
        specs, reports = {}, []
        for stage in stages:
            t0 = time.perf_counter()
            stats = stage_stats(block, linears[stage[0]], store, slices, calls, replay,
                                stage[0] if len(stage) == 1 else None, plan.hessian_dtype, hessian_cap,
                                spill=state.path / TAIL_FILE.format(stage[0]), device=device)
            names, weights = [f"{block_prefix}.{rel}" for rel in stage], [masters.pop(rel) for rel in stage]
            t1 = time.perf_counter()
            results = quantize_stage(names, weights, _before_solve(stats, heap_keep), method, plan)
            del stats
            clock["statistics"] += t1 - t0
            clock["solve"] += time.perf_counter() - t1
            _swap_in(stage, names, weights, results, linears, (tensors, specs, reports), (device, compute_dtype))
            replay.mark_done(stage)
            _trim_heap(heap_keep)  # the solve's and the swap's freed heap, before the next pass starts
        index = int(block_prefix.rsplit(".", 1)[1])
        out = ActivationStore.create(tuple(store.tensor.shape), compute_dtype, state.inputs_file(index + 1), plan.spill_bytes)
        t0 = time.perf_counter()
        _next_inputs(block, store, calls, slices, replay, out, device)
        clock["forward"] = time.perf_counter() - t0
    log.info("block %d: %s", index + 1, ", ".join(f"{k} {v:.1f} s" for k, v in clock.items() if k != "transform" or v >= 0.05))
    out.save(state.inputs_file(index + 1))
    store.close()
    return tensors, specs, reports, out


def _swap_in(stage: list[str], names: list[str], weights: list, results: list[tuple], linears: dict[str, nn.Module],
             out: tuple[dict, dict, list], where: tuple[torch.device, torch.dtype]) -> None:
    """A quantized stage's dequantized weights into its linears (``where``: device and compute dtype), its
    tensors, specs and reports into ``out``; each fp32 master in ``weights`` dropped once done (the peak
    stays in quantize_stage)."""
    tensors, specs, reports = out
    for j, (rel, name, (qt, report)) in enumerate(zip(stage, names, results)):
        weight, weights[j] = weights[j], None
        if fits_fp16(qt):
            linears[rel].weight = nn.Parameter(qt.weight().to(*where), requires_grad=False)
            tensors.update(qt.to_state(name))
            specs[name] = qt.entry()
            reports.append(report)
        else:  # the overflow rule (pipeline.common): the layer stays fp32
            linears[rel].weight = nn.Parameter(weight.to(*where), requires_grad=False)
            tensors[f"{name}.weight"] = weight.float()
            reports.append(kept_report(name, weight))
        del weight


def _next_inputs(block: nn.Module, store: ActivationStore, calls: list[BlockCall], slices: list[slice],
                 replay: OutputReplay, out: ActivationStore, device: torch.device) -> None:
    """The quantized block's outputs (the next block's inputs) into ``out``: each batch copied to ``device``
    for the forward and its output back to ``out`` on the CPU; then the replay is cleared."""
    def forward(b: int) -> None:  # batches in parallel threads (pipeline.batches), disjoint rows of out
        replay.batch = b
        result = block(store.tensor[slices[b]].to(device), *calls[b][0], **calls[b][1])
        out.tensor[slices[b]] = (result[0] if isinstance(result, tuple) else result).to(out.tensor.device)

    with replay.active(record=False):
        for _ in run_batches(forward, len(slices), batch_workers(device)):
            pass
    replay.clear()


def _apply_transforms(block: nn.Module, store: ActivationStore, calls: list[BlockCall], plan: QuantizePlan) -> None:
    """The plan's transforms, in order, on the float32 block and its inputs, before any quantization."""
    if not any(get_transform(name).changes_block for name in plan.transforms):
        return
    # the store as it is (bf16 with bf16 forwards): a transform converts only the rows it runs (AWQ: ~4096
    # tokens), where a float32 copy of all of them was 0.4 GB more peak on Qwen2.5-1.5B at 128 x 512
    hidden = store.tensor
    for name in plan.transforms:
        if not get_transform(name).changes_block:
            continue  # a basis transform (rotate) acts in the quantizer, not on the block
        report = get_transform(name).apply(block, hidden, calls[0][1], plan.spec, plan.run_options, plan.batch_size)
        log.info("%s: %s", name.upper(), report)


def _quantize_head(run: _Run, tied: bool, writer: CheckpointWriter, embed_module: str) -> list[dict]:
    """Quantize the output head with the statistics of its real inputs: the last block's outputs
    replayed through the model's tail (final norm), caught at the head. The statistics come first,
    then the embedding and the last activations are released and only then is the head read: on
    Qwen2.5-1.5B the head is 0.93 GB of float32 (GPTQ gets it in bf16: :func:`_head_in_half`) and GPTQ's
    working set on it as much again."""
    from bitsmith.models import embedding_and_head_names

    embed_name, _ = embedding_and_head_names(run.net)
    head_name, stats = _head_stats(run)
    run.net.get_submodule(embed_module).to("meta")  # needed only for the replay above
    run.store.close()
    _trim_heap()
    weight = run.source.load_tensor(embed_name if tied else f"{head_name}.weight", keep_half=_head_in_half(run.plan))
    qt, report = quantize_linear(head_name, weight, stats, run.method, run.plan)  # [vocab, hidden]
    if not fits_fp16(qt):  # the overflow rule (pipeline.common)
        writer.add_tensor(f"{head_name}.weight", weight.float())
        return [kept_report(head_name, weight)]
    del weight  # before the codes' packed copy is made (0.93 GB of float32 on Qwen2.5-1.5B)
    _trim_heap()
    writer.add_quantized(head_name, qt)
    return [report]


def _head_in_half(plan: QuantizePlan) -> bool:
    """Whether the head goes to the quantizer in its source dtype (bf16/fp16): when the method reads such a
    weight a slice at a time (``half_weights``, GPTQ) and no transform wraps it. Qwen2.5-1.5B's head is then
    0.47 GB while it is quantized instead of 0.93 GB of float32, the same codes."""
    from bitsmith.methods import METHODS

    return METHODS[plan.quantizer].half_weights and not plan.transforms


def _head_stats(run: _Run):
    """(head module name, LayerStats of the head's inputs over the calibration tokens)."""
    from bitsmith.nn.qlinear import set_submodule
    from bitsmith.pipeline.capture import Replay, output_head_name

    net, blocks, calib = run.net, run.blocks, run.calib
    head_name = output_head_name(net)
    head = net.get_submodule(head_name)
    acc = StatsAccumulator(_hidden_size(net, run.source.config))  # the head reads the final hidden states
    originals = list(blocks)
    stubs = [Replay(b) for b in originals]
    catcher = nn.Identity()
    catcher.register_forward_pre_hook(lambda m, a: acc.add(a[0]))
    try:
        for i, stub in enumerate(stubs):
            blocks[i] = stub
        set_submodule(net, head_name, catcher)
        with torch.no_grad():
            for sl in batch_slices(calib.shape[0], run.plan.batch_size):
                stubs[0].value = run.store.tensor[sl]
                net(input_ids=calib[sl], use_cache=False)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
        set_submodule(net, head_name, head)
    return head_name, acc.stats()
