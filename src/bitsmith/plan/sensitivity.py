"""Layer sensitivity: how much each (layer, spec) adds to the model's output KL divergence, and the
one-call planner that turns a budget into per-layer specs.

Two estimators of cost(layer, spec) = mean over positions of KL(float model || model with only that
layer quantized at that spec):

- ``measured``: exactly that, one forward pass per (layer, spec, window). Exact but costs
  layers x candidates x windows forwards: an oracle for tiny models and tests.
- ``fisher`` (default): a second-order expansion. At the float weights the KL and its gradient are
  zero, so for a weight perturbation d, KL ~= 0.5 d^T F d with F the Fisher information of the
  model's output distribution (Amari 1998; as used for bit allocation by HAWQ-V2, Dong et al. 2020,
  and SqueezeLLM, Kim et al. 2023, eq. 4). With F's diagonal,

      cost(layer, spec) = 0.5 * sum_ij F_ij (W_ij - Q(W)_ij)^2

  where Q is the actual quantizer, so each cost uses the real quantization error at that spec.
  F_ij = E[g_ij^2] is estimated with one backward pass per calibration window of
  ``sum_t log p(y_t | x_<t)`` with labels y_t *sampled from the model itself* (the true Fisher, not
  the empirical one): the per-position score has zero mean given the text, so the square of the
  window's summed gradient is an unbiased estimate of the sum of the per-position Fishers; dividing
  by the number of positions gives the Fisher of the mean KL that ``measured`` reports.

Memory: only the linear weights require gradients; a post-accumulate-grad hook squares each
weight's gradient into a float32 accumulator and frees it, so at most the gradients being produced
by autograd at that moment are alive, never all of them. The accumulators themselves are as large as
the weights (5 GB for a 1.5B model), so :func:`estimate_sensitivity` can cap them
(``fisher_bytes``): the layers are split into consecutive chunks that each fit the cap, and each
chunk gets its own pass over the same windows with the same sampled labels (same seed, same
logits), so the result is identical to one pass. A chunk of late layers is also cheaper than a full
pass: nothing below it requires a gradient, so autograd neither records nor walks the early blocks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from bitsmith.plan.allocate import Allocation, Budget, allocate, check_budget, usable_candidates
from bitsmith.spec import QuantSpec

log = logging.getLogger(__name__)

ESTIMATORS = ("fisher", "measured")
FISHER_BYTES = 2 * 10**9  # default cap on the Fisher accumulators alive at once (quantize --budget)
HEADER_BYTES_PER_TENSOR = 256  # safetensors header allowance per tensor (name, dtype, offsets, spec metadata)

Quantizer = Callable[[torch.Tensor, QuantSpec], torch.Tensor]  # float weight [out, in] -> dequantized [out, in]
Progress = Callable[[str, int, int], None]  # (what was just done, done, total), as the quantize step reports


@dataclass(frozen=True)
class Sensitivity:
    """Predicted cost of each layer at each candidate spec (mean KL increase, nats per position)."""

    costs: dict[str, dict[QuantSpec, float]]
    shapes: dict[str, tuple[int, int]]
    estimator: str
    quantizer: str
    windows: int

    def total(self, spec: QuantSpec) -> float:
        """Summed cost of quantizing every layer at ``spec`` (additivity is the estimators' assumption)."""
        return sum(c[spec] for c in self.costs.values() if spec in c)


def vq_pricing(weight: torch.Tensor, spec: QuantSpec, stats=None, options: dict | None = None):
    """How a ``--method vq`` run's specs are priced without its Hessians: a vq spec by its codebook and
    nearest entries (vq without the error feedback), a scalar spec (which vq hands to GPTQ) by RTN."""
    from bitsmith.methods import get_method
    from bitsmith.methods.vq import nearest_tensor

    if spec.grid == "vq":
        return nearest_tensor(weight.float(), spec)
    return get_method("rtn")(weight, spec, None, {})


def make_quantizer(method: str, options: dict | None = None) -> tuple[str, Quantizer]:
    """The quantizer used to price each spec. Calibrated methods (gptq, awq) need per-layer input
    statistics that this pass does not collect, so their costs are priced with RTN (a pessimistic
    but consistently ranked stand-in); vq with :func:`vq_pricing` (RTN cannot write vector codes)."""
    from bitsmith.methods import METHODS, get_method, needs_calibration

    if method in METHODS and not needs_calibration(method):
        name, fn = method, get_method(method)
    elif method == "vq":
        name, fn = "vq-nearest", vq_pricing
    else:
        name, fn = "rtn", get_method("rtn")
    if name != method:
        log.info("pricing specs for %s with %s errors (a calibrated method's error needs its statistics)", method, name)
    opts = dict(options or {}) if name == "rtn" else {}
    if (options or {}).get("rotate"):  # priced as it will be stored: in the rotated basis
        from bitsmith.transforms.rotate import rotated, seed_of

        fn = rotated(fn, seed_of(options))
    return name, lambda weight, spec: fn(weight, spec, None, opts).weight()


def layer_weight(model: nn.Module, layer: str) -> nn.Parameter:
    return model.get_submodule(layer).weight


def fisher_diagonal(model: nn.Module, layers: Sequence[str], tokens: torch.Tensor, seed: int = 0,
                    on_window: Callable[[], None] | None = None) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the mean per-position output distribution, per layer weight, float32.

    ``model`` should be float32; bfloat16 halves its memory (gradients then carry 8 mantissa bits; they
    are squared and summed in float32). ``tokens`` is [windows, seq_len]. Only the named layers' weights get
    gradients, squared and accumulated by hooks as soon as each is ready (then freed)."""
    params = {name: layer_weight(model, name) for name in layers}
    if any(p.dtype not in (torch.float32, torch.bfloat16) for p in params.values()):
        raise ValueError("the Fisher estimate needs the model in float32 (or bfloat16 to halve its memory)")
    acc = {name: torch.zeros(p.shape, dtype=torch.float32) for name, p in params.items()}  # [out, in] each
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    hooks = []
    for name, p in params.items():
        p.requires_grad_(True)

        def square_and_free(param: torch.Tensor, name: str = name) -> None:
            acc[name].add_(param.grad.float().square())
            param.grad = None  # free it now: only the grads in flight are alive

        hooks.append(p.register_post_accumulate_grad_hook(square_and_free))
    generator = torch.Generator().manual_seed(seed)
    positions = 0
    try:
        with torch.enable_grad():
            for window in tokens:
                logits = model(input_ids=window[None], use_cache=False).logits[0, :-1].float()  # [T-1, V]
                logp = torch.log_softmax(logits, dim=-1)  # [T-1, V]
                with torch.no_grad():  # labels drawn from the model: the true Fisher
                    labels = torch.multinomial(logp.exp(), 1, generator=generator)  # [T-1, 1]
                (-logp.gather(1, labels).sum()).backward()
                positions += logits.shape[0]
                del logits, logp
                if on_window is not None:
                    on_window()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    return {name: a.div_(max(positions, 1)) for name, a in acc.items()}


def fisher_costs(
    weights: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor], candidates: dict[str, Sequence[QuantSpec]],
    quantize: Quantizer,
) -> dict[str, dict[QuantSpec, float]]:
    """cost = 0.5 * sum F (W - Q(W))^2 per layer and candidate spec."""
    costs: dict[str, dict[QuantSpec, float]] = {}
    for name, specs in candidates.items():
        w = weights[name].detach().float()  # [out, in]
        costs[name] = {spec: 0.5 * float((fisher[name] * (w - quantize(w, spec)).square()).sum()) for spec in specs}
    return costs


def summed_kl(ref_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Summed KL(ref || q) over positions: ref_logp and logits [T, V] (callers divide by the
    number of positions for the mean)."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    return (ref_logp.exp() * (ref_logp - logq)).sum()


def measured_costs(
    model: nn.Module, candidates: dict[str, Sequence[QuantSpec]], tokens: torch.Tensor, quantize: Quantizer,
    progress: Progress | None = None,
) -> dict[str, dict[QuantSpec, float]]:
    """Mean KL vs the float model with only one layer quantized, for every layer and spec."""
    with torch.inference_mode():
        refs = [torch.log_softmax(model(input_ids=w[None], use_cache=False).logits[0, :-1].float(), -1) for w in tokens]
        positions = sum(r.shape[0] for r in refs)
        costs: dict[str, dict[QuantSpec, float]] = {}
        for name, specs in candidates.items():
            param = layer_weight(model, name)
            original = param.data
            costs[name] = {}
            try:
                for spec in specs:
                    param.data = quantize(original.float(), spec).to(original.dtype)
                    kl = sum(float(summed_kl(r, model(input_ids=w[None], use_cache=False).logits[0, :-1])) for r, w in zip(refs, tokens))
                    costs[name][spec] = kl / positions
            finally:
                param.data = original
            if progress is not None:
                progress(name, len(costs), len(candidates))
    return costs


def estimate_sensitivity(
    model: nn.Module, layers: dict[str, tuple[int, int]], candidates: Sequence[QuantSpec], tokens: torch.Tensor,
    *, estimator: str = "fisher", method: str = "rtn", options: dict | None = None, seed: int = 0,
    fisher_bytes: int | None = None, progress: Progress | None = None,
) -> Sensitivity:
    """Cost of each layer of ``layers`` (name -> (out, in)) at each usable candidate spec.

    A candidate whose group is wider than a layer's row is skipped for that layer. ``fisher_bytes``
    caps the float32 Fisher accumulators alive at once (None: all layers in one pass).
    ``progress(what, done, total)`` is called after each window of each Fisher pass (fisher) or
    after each layer (measured)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown sensitivity estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")
    per_layer = {name: usable_candidates(name, shape, candidates) for name, shape in layers.items()}
    qname, quantize = make_quantizer(method, options)
    if estimator == "measured":
        costs = measured_costs(model, per_layer, tokens, quantize, progress)
    else:
        costs = {}
        chunks = fisher_chunks(layers, fisher_bytes)
        total, done = len(chunks) * int(tokens.shape[0]), [0]

        def window_done() -> None:
            done[0] += 1
            if progress is not None:
                progress(f"window {done[0]}/{total}", done[0], total)

        for i, chunk in enumerate(chunks):
            log.info("fisher pass %d/%d over %d layers", i + 1, len(chunks), len(chunk))
            fisher = fisher_diagonal(model, chunk, tokens, seed, window_done)
            costs.update(fisher_costs({n: layer_weight(model, n) for n in chunk}, fisher,
                                      {n: per_layer[n] for n in chunk}, quantize))
            del fisher
    return Sensitivity(costs, dict(layers), estimator, qname, int(tokens.shape[0]))


def fisher_chunks(layers: dict[str, tuple[int, int]], max_bytes: int | None) -> list[list[str]]:
    """Consecutive groups of layers whose float32 accumulators fit ``max_bytes`` (one layer at least
    per group); the last layers come first, so the first passes only backpropagate through the top."""
    names = list(layers)
    if max_bytes is None:
        return [names]
    chunks: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name in reversed(names):
        size = 4 * layers[name][0] * layers[name][1]
        if current and used + size > max_bytes:
            chunks.append(current[::-1])
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        chunks.append(current[::-1])
    return chunks


def float_model(source, layers: dict[str, tuple[int, int]], dtype: torch.dtype = torch.float32) -> nn.Module:
    """The source model in float32 (or ``dtype``); a tied output head that is to be quantized gets its
    own copy of the weights (quantizing it unties it, and its Fisher must not mix in the embedding's gradient)."""
    from bitsmith.models.arch import build_model

    net = build_model(source, dtype)
    head, embed = net.get_output_embeddings(), net.get_input_embeddings()
    if head is not None and head.weight is embed.weight and any(layer_weight(net, n) is head.weight for n in layers):
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    return net


def fixed_bits(source, layers: dict[str, tuple[int, int]], unquantized_dtype: str = "fp16") -> int:
    """Bits of a checkpoint outside its quantized layers: every other stored tensor at its storage
    dtype (2-D at ``unquantized_dtype``, 1-D at fp32, as the pipeline writes them) plus an allowance
    for the safetensors header. Config and tokenizer files are not counted. Read from the source's
    tensor headers alone (shapes in torch layout), so no model is built: the budget check before
    the sensitivity pass and the allocation after it count the same bits."""
    total, count = 0, 0
    for name in source.tensor_names():
        count += 1
        if name.removesuffix(".weight") in layers:
            count += 2  # qweight, scale, zero instead of weight
            continue
        shape = source.tensor_shape(name)
        width = 32 if len(shape) < 2 or unquantized_dtype == "fp32" else 16
        total += math.prod(shape) * width
    return total + 8 * HEADER_BYTES_PER_TENSOR * count


def budget_layers(source, config) -> tuple[dict[str, tuple[int, int]], dict[str, QuantSpec], int]:
    """Split the plan's quantizable layers for a budget: (layers the allocator chooses specs for ->
    (out, in); layers whose spec the plan already pins -> that spec; fixed bits). Pinned layers (the
    embedding and head that ``--output-spec`` sets) are quantized at their own spec and stay outside a
    bits-per-weight budget, which counts the allocated weights only, as bits/weight of the decoder
    blocks is counted everywhere else; a size budget counts their stored bits among the fixed bits,
    beside everything that stays unquantized (:func:`fixed_bits`)."""
    from bitsmith.pipeline.common import quantizable_layers

    layers = quantizable_layers(source.config, config.quantize_head, config.quantize_embeddings)
    pinned = {n: s for n, s in config.layer_specs.items() if n in layers}
    free = {n: shape for n, shape in layers.items() if n not in pinned}
    fixed = fixed_bits(source, layers, config.unquantized_dtype) + sum(s.stored_bits(*layers[n]) for n, s in pinned.items())
    return free, pinned, fixed


def check_plan_budget(model, config, budget: Budget, candidates: Sequence[QuantSpec]) -> None:
    """Refuse a budget no allocation of ``candidates`` can meet, from the model's config and tensor
    headers only: in well under a second, before any sensitivity pass (which takes minutes). The
    message names the reachable range (:func:`bitsmith.plan.allocate.check_budget`)."""
    from bitsmith.methods.vq import check_method
    from bitsmith.models import open_source

    check_method(config.quantizer, config.spec, list(candidates))  # vq candidates need the vq method
    free, _, fixed = budget_layers(open_source(model), config)
    check_budget(budget, free, candidates, fixed, rotation_sign_bits(free, config.options))


def rotation_sign_bits(layers: dict[str, tuple[int, int]], options: dict | None) -> int:
    """Bits of the rotation signs a ``rotate`` plan stores beside the codes: one per input channel of
    every layer that gets a rotation, whatever its spec (the checkpoint report counts them)."""
    if not (options or {}).get("rotate"):
        return 0
    from bitsmith.transforms.rotate import rotation_for, seed_of

    return sum(i for _, i in layers.values() if rotation_for(i, seed_of(options)) is not None)


def plan_allocation(
    model, config, budget: Budget, candidates: Sequence[QuantSpec], tokens: torch.Tensor,
    *, estimator: str = "fisher", seed: int = 0, fisher_bytes: int | None = FISHER_BYTES,
    progress: Progress | None = None,
) -> tuple["object", Allocation]:
    """Sensitivity -> allocation for ``model`` (path or alias) under ``budget``: returns ``config``
    (a :class:`~bitsmith.pipeline.plan.QuantizePlan`) with ``layer_specs`` set, and the
    :class:`Allocation` to record in the checkpoint's report. An unreachable budget is refused
    before the model is built (:func:`check_plan_budget`); ``progress`` follows the sensitivity pass."""
    from bitsmith.models import open_source

    check_plan_budget(model, config, budget, candidates)
    source = open_source(model)
    layers, pinned, fixed = budget_layers(source, config)
    net = float_model(source, layers)
    sens = estimate_sensitivity(net, layers, candidates, tokens, estimator=estimator, method=config.method,
                                options=config.options, seed=seed, fisher_bytes=fisher_bytes, progress=progress)
    weights = sum(o * i for o, i in layers.values())
    fixed = 0 if budget.bits_per_weight is not None else fixed
    del net
    signs = rotation_sign_bits(layers, config.options)  # stored whatever the specs: off the top of the budget
    alloc = allocate(sens.costs, layers, budget.layer_bits(weights, fixed) - signs)
    extra = {"budget": str(budget), "estimator": estimator, "cost_quantizer": sens.quantizer, "windows": sens.windows,
             "candidates": [str(s) for s in candidates],
             "uniform_predicted_kl": {str(s): sens.total(s) for s in candidates}, "rotation_sign_bits": signs,
             **({"pinned": {n: str(s) for n, s in pinned.items()}} if pinned else {})}
    alloc = dataclasses.replace(alloc, total_bits=alloc.total_bits + signs, budget_bits=alloc.budget_bits + signs,
                                fixed_bits=fixed, extra=extra)
    # the plan's main spec: the commonest allocated one of the requested spec's grid, else the requested
    # one (every layer has its own spec then; a vq plan needs a vq main spec, its scalar layers go to GPTQ)
    counts = Counter(alloc.specs.values()).most_common()
    common = next((s for s, _ in counts if s.grid == config.spec.grid), config.spec)
    log.info("allocated %s: %.3f bits/weight, predicted KL %.4g, %s", budget, alloc.bits_per_weight,
             alloc.predicted_cost, alloc.counts())
    return dataclasses.replace(config, spec=common, layer_specs={**pinned, **alloc.specs}), alloc


def record_allocation(checkpoint, allocation: Allocation) -> None:
    """Add the allocation to the checkpoint's report (bitsmith.json), written atomically."""
    import json
    import os
    from pathlib import Path

    from bitsmith.io.checkpoint import REPORT_FILE

    path = Path(checkpoint) / REPORT_FILE
    data = json.loads(path.read_text())
    data.setdefault("report", {})["allocation"] = allocation.to_report()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
