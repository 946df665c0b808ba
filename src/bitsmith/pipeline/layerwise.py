"""The calibrated, layer-wise streaming pipeline (GPTQ, AWQ, or any method given LayerStats).

The loop (IST-DASLab/gptq's "catch block-0 inputs, then walk the blocks"):

1. build the model with every decoder block left on the meta device; capture block 0's inputs and
   every block's call kwargs with recorders (:mod:`bitsmith.pipeline.capture`);
2. per block: load its weights from the source, optionally apply the AWQ transform, then quantize
   its linears true-sequentially, stage by stage (linears that read the same input form a stage:
   q,k,v; o; gate,up; down): collect the stage's input statistics on the partially quantized block,
   quantize, swap the dequantized weights in; then run the quantized block to make the next
   block's inputs; write the block, release its weights.

Peak memory is one block (fp32 master weights, each dropped once its stage is quantized, plus its
compute copy), one stage's Hessian with the method's working set (GPTQ: one more n x n matrix and
the weights in visit order), the replayed outputs (``replay_bytes``) and the calibration
activations of this block and the next, which spill to a memory-mapped file when larger than
``spill_bytes``. The checkpoint writer streams every tensor to disk as it comes.
Every finished block is committed to ``<out>.partial/`` so ``resume=True`` continues bit-identically.
"""

from __future__ import annotations

import ctypes
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from bitsmith.calib.data import tokens_digest
from bitsmith.calib.stats import StatsAccumulator
from bitsmith.io.checkpoint import CheckpointError, CheckpointWriter
from bitsmith.methods import LayerStats, Method, get_method
from bitsmith.pipeline.capture import ActivationStore, BlockCall, batch_slices, capture_block_calls
from bitsmith.pipeline.quantize import (
    QuantizeConfig, _layer_report, _storage, check_layers, finish_folder, quantizable_layers, summary,
)
from bitsmith.pipeline.replay import OutputReplay
from bitsmith.pipeline.workstate import WorkState, work_dir_for

log = logging.getLogger(__name__)

DEFAULT_SPILL_BYTES = 2 * 1024**3
DEFAULT_BATCH_SIZE = 8  # sequences per block forward
DEFAULT_REPLAY_BYTES = 1024**3  # finished sub-modules' outputs kept per block (OutputReplay)
AWQ_METHOD = "awq"


class _StopForward(Exception):
    """Raised from a hook once a stage's input is seen: the rest of the block is not needed."""


def quantize_calibrated(
    model: str | Path,
    out_dir: Path,
    config: QuantizeConfig,
    calib: torch.Tensor,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    spill_bytes: int = DEFAULT_SPILL_BYTES,
    compute_dtype: torch.dtype = torch.float32,
    batch_size: int = DEFAULT_BATCH_SIZE,
    replay_bytes: int = DEFAULT_REPLAY_BYTES,
    hessian_dtype: str = "fp32",
) -> Path:
    """Quantize ``model`` block by block with calibration tokens ``calib`` [samples, seq_len].

    ``compute_dtype`` is the dtype of the block forwards and stored activations (bf16 is about
    twice as fast on CPU); Hessians are summed in float32 and methods always see the float32
    weights. ``hessian_dtype="bf16"`` computes each batch's Hessian products in bf16 GEMMs
    (:class:`StatsAccumulator`; with bf16 forwards SmolLM2's GPTQ took 140.6 instead of 173.1 s
    and its KLD rose 2.1%, bench/results/calibrated-methods/gptq_speed.md). ``progress(name, done, total)``
    is called after each committed block.
    ``replay_bytes`` bounds the finished sub-module outputs kept per block (:class:`OutputReplay`);
    it changes the time, never the result.
    """
    from bitsmith.models import build_model, embedding_and_head_names, find_blocks, open_source
    from bitsmith.pipeline.quantize import meta_model

    start = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir} already exists; choose another --out or pass --overwrite")
    if calib.dim() != 2 or calib.shape[0] < 1:
        raise ValueError(f"calibration tokens must be [samples, seq_len], got shape {tuple(calib.shape)}")
    if config.method == AWQ_METHOD or config.options.get("awq"):
        # AWQ's clipping already looks at the block output; the quantizer after it keeps plain
        # min/max ranges unless clip_search is asked for (AutoAWQ's behaviour)
        config = replace(config, options={"clip_search": False, **config.options})
    source = open_source(model)
    check_layers(quantizable_layers(source.config, config.quantize_head), config)
    method = get_method(_quantizer_name(config))
    prefix, _ = find_blocks(meta_model(source.config))
    _, head_name = embedding_and_head_names(meta_model(source.config))
    if hessian_dtype not in ("fp32", "bf16"):
        raise ValueError(f"hessian_dtype must be 'fp32' or 'bf16', got {hessian_dtype!r}")
    key = {**_state_key(source, config, calib, compute_dtype, batch_size), "hessian_dtype": hessian_dtype}
    state = WorkState.open(work_dir_for(out_dir), key, resume)
    net = build_model(source, compute_dtype, skip=lambda n: n.startswith(prefix + ".") or n == head_name)
    _, blocks = find_blocks(net)
    n_blocks = len(blocks)
    calls, store = _block_inputs(net, blocks, source, calib, state, compute_dtype, spill_bytes, batch_size)
    shape = tuple(store.tensor.shape)
    options = {**config.options, "quantize_head": config.quantize_head, "quantize_embeddings": config.quantize_embeddings,
               "unquantized_dtype": config.unquantized_dtype,
               "calibration": {"samples": shape[0], "seq_len": shape[1], "hash": key["calib"]}}
    with CheckpointWriter(out_dir, config.method, options, overwrite=overwrite) as writer:  # streams: holds no tensor
        embed_module = _release_embedding(net)  # needed again only to quantize the head
        head_is_tied = _write_other_tensors(writer, source, net, prefix, config)
        for i in range(state.done):
            _emit_block(writer, state, i)
        for i in range(state.done, n_blocks):
            t0 = time.perf_counter()
            block_prefix = f"{prefix}.{i}"
            _load_block(net, source, block_prefix)
            tensors, specs, reports, store = _process_block(
                blocks[i], block_prefix, store, calls[i], method, config, state, spill_bytes, batch_size, replay_bytes,
                hessian_dtype)
            _unload_block(blocks[i])
            _trim_heap()
            state.commit_block(i, tensors, specs, reports)
            _emit_block(writer, state, i)
            log.info("block %d/%d quantized in %.1f s", i + 1, n_blocks, time.perf_counter() - t0)
            if progress:
                progress(f"block {i + 1}/{n_blocks}", i + 1, n_blocks)
        head_reports = []
        if config.quantize_head and not (config.quantize_embeddings and "lm_head.weight" not in source.tensor_names()):
            _load_block(net, source, embed_module)
            net.get_submodule(embed_module).to(compute_dtype)
            head_reports = _quantize_head(net, blocks, source, head_is_tied, store, calib, method, config, batch_size, writer)
        store.close()
        finish_folder(writer, source, head_is_tied)
        report = summary(source, config, [r for b in state.reports for r in b] + head_reports, start)
        path = writer.finish(report)
    state.remove()
    return path


def _block_inputs(
    net: nn.Module, blocks: nn.ModuleList, source: Any, calib: torch.Tensor, state: WorkState,
    compute_dtype: torch.dtype, spill_bytes: int, batch_size: int,
) -> tuple[list[list[BlockCall]], ActivationStore]:
    """Every block's call kwargs (always recaptured: cheap) and the first unfinished block's inputs:
    the captured embeddings on a fresh run, the committed activations on a resumed one."""
    resumed = state.done > 0 and state.has_inputs()
    shape = (calib.shape[0], calib.shape[1], _hidden_size(net, source.config))
    store = None if resumed else ActivationStore.create(shape, compute_dtype, state.inputs_file(0), spill_bytes)
    calls = capture_block_calls(net, blocks, calib, batch_size, store)
    if resumed:
        log.info("resuming at block %d of %d from %s", state.done + 1, len(blocks), state.path)
        return calls, ActivationStore.open(state.inputs_file(state.done), shape, compute_dtype, spill_bytes)
    state.done, state.reports = 0, []
    store.save(state.inputs_file(0))
    state.commit_inputs()
    return calls, store


def _quantizer_name(config: QuantizeConfig) -> str:
    """AWQ is a transform; the weights are then quantized by options["quantizer"] (default rtn)."""
    if config.method == AWQ_METHOD:
        return str(config.options.get("quantizer", "rtn"))
    return config.method


def _state_key(source: Any, config: QuantizeConfig, calib: torch.Tensor, dtype: torch.dtype, batch_size: int) -> dict:
    options = json.loads(json.dumps(config.options, sort_keys=True, default=str))
    layer_specs = {k: str(v) for k, v in sorted(config.layer_specs.items())}
    return {"model": str(source.path), "spec": str(config.spec), "layer_specs": layer_specs, "method": config.method, "options": options,
            "quantize_head": config.quantize_head, "quantize_embeddings": config.quantize_embeddings,
            "unquantized_dtype": config.unquantized_dtype, "calib": tokens_digest(calib), "calib_shape": list(calib.shape),
            "compute_dtype": str(dtype).removeprefix("torch."), "batch_size": batch_size}


def _hidden_size(net: nn.Module, config: Any) -> int:
    size = getattr(config, "hidden_size", None)
    return int(size) if size else int(net.get_input_embeddings().weight.shape[1])


def _load_block(net: nn.Module, source: Any, block_prefix: str) -> None:
    """Fill block ``block_prefix``'s parameters and persistent buffers from the source (fp32)."""
    from bitsmith.models.arch import _load_checked, _set_tensor

    block = net.get_submodule(block_prefix)
    for rel, tensor in block.state_dict(keep_vars=True).items():
        name = f"{block_prefix}.{rel}"
        _set_tensor(net, name, _load_checked(source, name, tensor.shape, torch.float32))


def _release_embedding(net: nn.Module) -> str:
    """Put the input embedding on the meta device (block 0's inputs are captured; on a 1.5B model
    with a 152k vocabulary that frees ~0.5 GB for the whole run). Returns its module name."""
    from bitsmith.models import embedding_and_head_names

    name = embedding_and_head_names(net)[0].removesuffix(".weight")
    net.get_submodule(name).to("meta")
    return name


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS. glibc keeps freed chunks below its mmap threshold,
    and that threshold grows (to 32 MB) as big tensors come and go, so a long run's resident set
    creeps up by the fragments; ``malloc_trim`` releases them. A no-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _unload_block(block: nn.Module) -> None:
    block.to("meta")  # releases the weights; the module keeps its structure


def _write_other_tensors(writer: CheckpointWriter, source: Any, net: nn.Module, prefix: str, config: QuantizeConfig) -> bool:
    """Every tensor outside the blocks, stored as the calibration-free path stores it (an embedding
    to quantize is a lookup table, not a linear: it gets RTN). Returns whether a tied lm_head is to
    be quantized, and so written last, untied from the embedding."""
    from bitsmith.methods.rtn import rtn
    from bitsmith.models import embedding_and_head_names

    names = source.tensor_names()
    embed_name, _ = embedding_and_head_names(net)
    for name in names:
        if name.startswith(prefix + ".") or (config.quantize_head and name == "lm_head.weight"):
            continue  # blocks go one by one; the head is quantized after them, with its real inputs
        tensor = source.load_tensor(name)
        if config.quantize_embeddings and name == embed_name:
            module = name.removesuffix(".weight")
            writer.add_quantized(module, rtn(tensor, config.spec_for(module), None, config.options))
        else:
            writer.add_tensor(name, _storage(tensor, config.unquantized_dtype))
        del tensor  # before the next load: two 152k-vocabulary matrices in fp32 are ~1.9 GB
    _trim_heap()
    return config.quantize_head and "lm_head.weight" not in names and not config.quantize_embeddings


def _emit_block(writer: CheckpointWriter, state: WorkState, index: int) -> None:
    tensors, quantized = state.load_block(index)
    for module, qt in quantized.items():
        writer.add_quantized(module, qt)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)


def _process_block(
    block: nn.Module, block_prefix: str, store: ActivationStore, calls: list[BlockCall], method: Method,
    config: QuantizeConfig, state: WorkState, spill_bytes: int, batch_size: int,
    replay_bytes: int = DEFAULT_REPLAY_BYTES, hessian_dtype: str = "fp32",
) -> tuple[dict[str, torch.Tensor], dict[str, dict], list[dict], ActivationStore]:
    """Quantize one loaded block; returns its plain tensors, its quantized tensors' specs, its layer
    reports (all keyed by full name) and the store holding the next block's inputs."""
    from bitsmith.models import block_linears

    slices = batch_slices(store.tensor.shape[0], batch_size)
    compute_dtype = store.tensor.dtype
    with torch.no_grad():
        if config.method == AWQ_METHOD or config.options.get("awq"):
            _apply_awq(block, store, calls, config, batch_size)
        linears = block_linears(block)
        # fp32 [out, in] masters: the loaded tensors themselves (block.to() below and the dequantized
        # weights swapped in later replace the modules' references, never these); each is dropped
        # once its stage is quantized
        masters = {rel: lin.weight.detach().float() for rel, lin in linears.items()}
        tensors = {f"{block_prefix}.{rel}": _storage(t.detach(), config.unquantized_dtype)
                   for rel, t in block.state_dict().items() if rel.removesuffix(".weight") not in linears}
        block.to(compute_dtype)
        stages = find_stages(block, linears, store.tensor[slices[0]], calls[0])
        replay = OutputReplay(block, linears, len(slices), replay_bytes)
        specs, reports = {}, []
        for stage in stages:
            stats = _stage_stats(block, linears[stage[0]], store, slices, calls, replay,
                                 stage[0] if len(stage) == 1 else None, hessian_dtype)
            names = [f"{block_prefix}.{rel}" for rel in stage]
            results = _quantize_stage(names, [masters.pop(rel) for rel in stage], stats, method, config)
            del stats
            _trim_heap()
            for rel, name, (qt, report) in zip(stage, names, results):
                linears[rel].weight = nn.Parameter(qt.dequantize().to(compute_dtype), requires_grad=False)
                tensors.update(qt.to_state(name))
                specs[name] = {"spec": str(qt.spec), "shape": list(qt.shape)}
                reports.append(report)
            replay.mark_done(stage)
        index = int(block_prefix.rsplit(".", 1)[1])
        out = ActivationStore.create(tuple(store.tensor.shape), compute_dtype, state.inputs_file(index + 1), spill_bytes)
        with replay.active(record=False):
            for b, (sl, (args, kwargs)) in enumerate(zip(slices, calls)):
                replay.batch = b
                result = block(store.tensor[sl], *args, **kwargs)
                out.tensor[sl] = result[0] if isinstance(result, tuple) else result
        replay.clear()
    out.save(state.inputs_file(index + 1))
    store.close()
    return tensors, specs, reports, out


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


def _stage_stats(
    block: nn.Module, first: nn.Linear, store: ActivationStore, slices: list[slice], calls: list[BlockCall],
    replay: "OutputReplay | None" = None, tail_of: str | None = None, hessian_dtype: str = "fp32",
) -> LayerStats:
    """Input statistics of a stage over all calibration batches: the block runs only up to the
    stage's first linear (the hook stops it there), replaying final sub-modules. ``tail_of``, the
    name of a stage's only linear, also hands its input per batch to ``replay`` as a tail (see
    :class:`OutputReplay`), as far as the replay budget allows."""
    from contextlib import nullcontext

    acc = StatsAccumulator(first.in_features, hessian_dtype)
    keep = [replay.tail_recorder(tail_of) if replay is not None and tail_of else None]
    tail_of = tail_of if keep[0] is not None else None

    def catch(module: nn.Module, args: tuple) -> None:
        acc.add(args[0])
        if keep[0] is not None:
            x = args[0]
            if replay.used() + x.numel() * x.element_size() * len(slices) > replay.budget:
                keep[0] = None  # would not fit: the parent is recomputed instead
            else:
                keep[0].append(x)
        raise _StopForward

    hook = first.register_forward_pre_hook(catch)
    try:
        with replay.active(tail_of=tail_of) if replay is not None else nullcontext():
            for b, (sl, (args, kwargs)) in enumerate(zip(slices, calls)):
                if replay is not None:
                    replay.batch = b
                try:
                    block(store.tensor[sl], *args, **kwargs)
                except _StopForward:
                    pass
    finally:
        hook.remove()
    if keep[0] is not None:
        replay.keep_tail(tail_of, keep[0])
    return acc.stats()


def _quantize_stage(names: list[str], weights: list[torch.Tensor], stats: LayerStats, method: Method,
                    config: QuantizeConfig) -> list[tuple]:
    """Quantize a stage's layers (they share ``stats``): in one call when the method can take them
    together (``method.many``, e.g. GPTQ's one walk over the stacked rows) and they share a spec,
    else one by one. Returns (QuantizedTensor, report) per layer."""
    specs = [config.spec_for(n) for n in names]
    many = getattr(method, "many", None)
    if many is None or len(names) < 2 or any(s != specs[0] for s in specs):
        return [_quantize_linear(n, w, stats, method, config) for n, w in zip(names, weights)]
    t0 = time.perf_counter()
    qts = many(weights, specs[0], stats, config.options)
    elapsed = (time.perf_counter() - t0) / len(names)
    return [(qt, _linear_report(n, w, qt, stats, method, elapsed)) for n, w, qt in zip(names, weights, qts)]


def _quantize_linear(name: str, weight: torch.Tensor, stats: LayerStats, method: Method, config: QuantizeConfig):
    """Quantize one layer; its report adds ``output_error``, the relative squared output error
    ||X W^T - X Wq^T||^2 / ||X W^T||^2 on the calibration inputs, and plain RTN's for comparison."""
    t0 = time.perf_counter()
    qt = method(weight, config.spec_for(name), stats, config.options)
    return qt, _linear_report(name, weight, qt, stats, method, time.perf_counter() - t0)


def _linear_report(name: str, weight: torch.Tensor, qt, stats: LayerStats, method: Method, seconds: float) -> dict:
    from bitsmith.methods.gptq import layer_error
    from bitsmith.methods.rtn import rtn

    report = _layer_report(name, weight, qt, seconds)
    report["output_error"] = layer_error(weight, qt.dequantize(), stats.hessian)
    if method is not rtn:
        report["rtn_output_error"] = layer_error(weight, rtn(weight, qt.spec, None, {}).dequantize(), stats.hessian)
    report["tokens"] = stats.tokens
    return report


def _apply_awq(block: nn.Module, store: ActivationStore, calls: list[BlockCall], config: QuantizeConfig, batch_size: int) -> None:
    """AWQ's scale and clip search on the fp32 block, simulating RTN (the final quantizer may be GPTQ,
    which needs statistics the search does not have)."""
    from bitsmith.methods.rtn import rtn

    try:
        from bitsmith.transforms.awq import awq_transform
    except ImportError as err:
        raise ValueError(f"AWQ needs bitsmith.transforms.awq, which cannot be imported ({err}); use --method gptq or rtn") from err
    hidden = store.tensor if store.tensor.dtype == torch.float32 else store.tensor.float()  # the block is fp32 here
    # the searches simulate plain min/max RTN (as the reference implementation does): ~20x cheaper
    # per candidate than RTN's range search, and the search's own clipping does that job
    options = {**config.options, "clip_search": False}
    report = awq_transform(block, hidden, calls[0][1], config.spec, rtn, options, batch_size=batch_size)
    log.info("AWQ: %s", report)


def _quantize_head(
    net: nn.Module, blocks: nn.ModuleList, source: Any, tied: bool, store: ActivationStore, calib: torch.Tensor,
    method: Method, config: QuantizeConfig, batch_size: int, writer: CheckpointWriter,
) -> list[dict]:
    """Quantize the output head with the statistics of its real inputs: the last block's outputs
    replayed through the model's tail (final norm), caught at the head."""
    from bitsmith.models import embedding_and_head_names
    from bitsmith.nn.qlinear import set_submodule
    from bitsmith.pipeline.capture import Replay, output_head_name

    embed_name, _ = embedding_and_head_names(net)
    head_name = output_head_name(net)
    weight = source.load_tensor(embed_name if tied else f"{head_name}.weight")  # fp32 [vocab, hidden]
    acc = StatsAccumulator(weight.shape[1])
    originals, head = list(blocks), net.get_submodule(head_name)
    stubs = [Replay(b) for b in originals]
    catcher = nn.Identity()
    catcher.register_forward_pre_hook(lambda m, a: acc.add(a[0]))
    try:
        for i, stub in enumerate(stubs):
            blocks[i] = stub
        set_submodule(net, head_name, catcher)
        with torch.no_grad():
            for sl in batch_slices(calib.shape[0], batch_size):
                stubs[0].value = store.tensor[sl]
                net(input_ids=calib[sl], use_cache=False)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
        set_submodule(net, head_name, head)
    qt, report = _quantize_linear(head_name, weight, acc.stats(), method, config)
    writer.add_quantized(head_name, qt)
    return [report]

