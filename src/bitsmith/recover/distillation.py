"""Recovery by distillation: tune a quantized checkpoint's continuous parameters (scales, zeros, norm
weights; the integer codes frozen) so its next-token distribution matches the unquantized model's on
calibration text, end to end (KL(p_ref || p_quant) over every position, the docs/PROTOCOL.md
direction).

With ``block_steps`` > 0 a block-wise stage comes first (:mod:`bitsmith.recover.blockwise`: each decoder
block's parameters fitted to the reference block's output, EfficientQAT's Block-AP with the codes
frozen); its result is kept only if it lowers the end-to-end calibration KL.

The end-to-end loop (EfficientQAT's "end-to-end training of the quantization parameters", on a CPU budget):
Adam on one minibatch of calibration sequences per step (minibatches in a fixed cycle); every
``check_every`` steps the tuned scales/zeros are rounded to fp16 (what the checkpoint stores) and the
KL over the *whole* calibration set is measured. A check that improves on the best so far is
accepted; one that does not restores the best state and halves the learning rate (a fresh Adam). So
the reported calibration loss never increases across accepted checks, and the written checkpoint is
the best state, whose loss is the last accepted figure.

Resumable: after every check the whole state (parameters, best parameters, Adam's moments, step,
learning rate, the curve) is written atomically to ``<out>.distill-state/state.pt`` (tensors only,
read back with ``torch.load(weights_only=True)``); ``resume=True`` continues from it and ends where an
uninterrupted run ends (same minibatches, same arithmetic).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from bitsmith.io.checkpoint import CheckpointError
from bitsmith.recover.output import write_distilled
from bitsmith.recover.reference import ReferenceTargets, TargetStore
from bitsmith.recover.selfgen import GENERATED, sample_windows
from bitsmith.recover.tunable import TunableLinear, make_tunable, round_to_storage, trainable

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"


@dataclass(frozen=True)
class DistillConfig:
    """How to distill. ``steps`` end-to-end optimizer steps of ``batch`` sequences (0 with ``block_steps``:
    the block stage alone); ``samples`` x ``seq_len``
    calibration tokens (``calib_text``: None is the shipped calibration text, ``"generated"`` sequences the
    reference samples itself with ``seed``; ``random_offsets``: windows drawn across the whole text with
    ``seed`` instead of consecutive from its start); the loss is checked
    every ``check_every`` steps (None: once per pass over the calibration set)."""

    steps: int = 40
    lr: float = 1e-3  # relative: each tensor's step size is lr x its mean |value| (see _optimizer)
    samples: int = 16
    seq_len: int = 128
    batch: int = 4
    check_every: int | None = None
    calib_text: str | None = None
    seed: int = 0
    random_offsets: bool = False
    block_steps: int = 0  # Adam steps per decoder block in the block-wise stage first (0: end-to-end only)
    block_lr: float | None = None  # the block stage's relative rate (None: lr)
    # over a vocabulary wider than ref_topk_above keep only the reference's ref_topk largest log-probs
    # and its rest mass (a lower bound of the KL, recover/reference.py): Gemma-3's 262k tokens in full
    # would be 8.6 GB for 32 x 512 calibration tokens
    ref_topk: int = 256
    ref_topk_above: int = 65_536

    def validate(self) -> None:
        for name in ("samples", "seq_len", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"distill {name} must be at least 1, got {getattr(self, name)}")
        if self.steps < (0 if self.block_steps else 1):  # 0 end-to-end steps: the block stage alone
            raise ValueError(f"distill steps must be at least 1 (or 0 with block steps), got {self.steps}")
        if self.block_steps < 0:
            raise ValueError(f"distill block_steps must be 0 (no block stage) or more, got {self.block_steps}")
        if self.block_lr is not None and not (self.block_lr > 0 and math.isfinite(self.block_lr)):
            raise ValueError(f"distill block learning rate must be a positive number, got {self.block_lr}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"distill learning rate must be a positive number, got {self.lr}")
        if self.calib_text == GENERATED and self.random_offsets and not Path(GENERATED).exists():
            raise ValueError("random offsets draw windows across a text; generated calibration has no text to draw "
                             "from (each window is a fresh sample): drop one of the two")
        if self.check_every is not None and self.check_every < 1:
            raise ValueError(f"check_every must be at least 1, got {self.check_every}")
        if self.ref_topk < 1 or self.ref_topk_above < 0:
            raise ValueError(f"distill ref_topk must be at least 1 and ref_topk_above at least 0, got "
                             f"{self.ref_topk} and {self.ref_topk_above}")

    def topk_for(self, vocab: int) -> int | None:
        """How many reference log-probabilities a token keeps over ``vocab`` (None: all of them)."""
        return self.ref_topk if vocab > self.ref_topk_above else None


@dataclass
class DistillResult:
    path: Path
    initial_loss: float  # calibration KL before any step
    best_loss: float  # calibration KL of the written checkpoint
    curve: list[dict] = field(default_factory=list)  # {"step", "kld", "accepted", "lr"} per check
    seconds: float = 0.0


Progress = Callable[[int, int, dict], None]  # (steps done, total, the last check or {})


def reference_logprobs(reference: torch.nn.Module, tokens: torch.Tensor, batch: int) -> torch.Tensor:
    """The reference model's log-probabilities [samples, seq_len, V], computed once and stored in
    float16 (``recover.reference.REF_LOGP_DTYPE``), filled in place. Why: over a 49k vocabulary float32 costs 200 KB a
    token (6.4 GB for 64 x 512 calibration tokens), the most memory distillation holds; float16 halves
    it, and its rounding (a relative 2^-11 of each log-probability, so below 0.01 wherever p > 1e-8)
    moves the KL by a few parts in 10^4 (tests/recover/test_distill.py holds it to 1e-3)."""
    return reference_pass(reference, tokens, batch, blocks=False)[0].logp


def reference_pass(reference: torch.nn.Module, tokens: torch.Tensor, batch: int, blocks: bool,
                   topk: int | None = None) -> tuple[ReferenceTargets, list | None]:
    """The reference's log-probabilities (all, or its ``topk`` largest: :mod:`bitsmith.recover.reference`)
    and, with ``blocks``, every reference block's output (the block stage's targets,
    :func:`bitsmith.recover.blockwise.reference_block_outputs`) from the same forward of each batch:
    one reference pass over the calibration tokens instead of two."""
    store = TargetStore(tuple(tokens.shape), topk)

    def keep(start: int, output) -> None:
        store.add(start, output.logits)

    targets = None
    if blocks:
        from bitsmith.recover.blockwise import reference_block_outputs

        targets = reference_block_outputs(reference, tokens, batch, on_output=keep)
    else:
        with torch.no_grad():
            for start in range(0, tokens.shape[0], batch):
                keep(start, reference(input_ids=tokens[start:start + batch], use_cache=False))
    return store.targets, targets


class KLTotal:
    """The calibration KL summed batch by batch from the model's outputs (``add`` fits the block
    stage's ``on_output``, so a forward made for another purpose can measure it too)."""

    def __init__(self, ref: ReferenceTargets, batch: int) -> None:
        self.ref, self.batch, self.total, self.count = ref, batch, 0.0, 0

    def add(self, start: int, output) -> None:
        logits = output.logits
        positions = logits.shape[0] * logits.shape[1]
        self.total += float(self.ref[start:start + self.batch].kl(logits)) * positions
        self.count += positions

    def mean(self) -> float:
        return self.total / self.count


def calibration_loss(net: torch.nn.Module, tokens: torch.Tensor, ref: ReferenceTargets | torch.Tensor,
                     batch: int) -> float:
    """KL over the whole calibration set (mean over positions), no gradients; ``ref`` the targets or
    the full log-probabilities [S, T, V]."""
    total = KLTotal(ref if isinstance(ref, ReferenceTargets) else ReferenceTargets(ref), batch)
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch):
            total.add(start, net(input_ids=tokens[start:start + batch], use_cache=False))
    return total.mean()


def _optimizer(params: dict[str, torch.nn.Parameter], lr: float, scale_of: dict[str, float]) -> torch.optim.Adam:
    """Adam with one group per tensor, its step size ``lr`` x the tensor's initial mean |value|:
    scales (~1e-2), zeros (code units) and norm weights (~1) then move by the same relative amount."""
    groups = [{"params": [p], "lr": lr * scale_of[name], "name": name} for name, p in params.items()]
    return torch.optim.Adam(groups, lr=lr)


@dataclass
class _State:
    """Everything a resumed run needs; saved after every check."""

    step: int
    lr: float
    best: float
    curve: list[dict]
    best_params: dict[str, torch.Tensor]
    blocks: list[dict] = field(default_factory=list)  # the block stage's record of each block tuned so far
    blocks_done: bool = False  # the block stage finished (and its end-to-end check was made)

    def save(self, folder: Path, key: dict, params: dict, optimizer: torch.optim.Optimizer) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"step": self.step, "lr": self.lr, "best": self.best, "curve": self.curve, "blocks": self.blocks,
                "blocks_done": self.blocks_done}
        payload = {"key": json.dumps(key, sort_keys=True), "meta": json.dumps(meta),
                   "params": {n: p.detach().clone() for n, p in params.items()}, "best_params": self.best_params,
                   "optimizer": optimizer.state_dict()}
        tmp = folder / (STATE_FILE + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(folder / STATE_FILE)


def _load_state(folder: Path, key: dict) -> dict | None:
    path = folder / STATE_FILE
    if not path.exists():
        return None
    payload = torch.load(path, weights_only=True)  # tensors, dicts and strings only: never a pickle
    if payload.get("key") != json.dumps(key, sort_keys=True):
        raise CheckpointError(f"{path} belongs to a distillation with other inputs or settings; run without --resume "
                              f"(and delete {folder}) to start again")
    return payload


def state_dir_for(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".distill-state")


def distill(checkpoint: str | Path, reference: str | Path, out: str | Path, config: DistillConfig = DistillConfig(), *,
            resume: bool = False, overwrite: bool = False, progress: Progress | None = None) -> DistillResult:
    """Distill ``checkpoint`` (a bitsmith checkpoint) towards ``reference`` (its unquantized model)
    into a new checkpoint at ``out``; see the module docstring."""
    from bitsmith.io.destination import Destination

    start = time.perf_counter()
    config.validate()
    out = Path(out)
    Destination(out, "checkpoint", overwrite, CheckpointError).check()  # before any work
    run = _open(checkpoint, reference, config)
    folder = state_dir_for(out)
    key = {"checkpoint": str(Path(checkpoint).resolve()), "reference": str(reference), "config": asdict(config),
           "tokens": int(run.tokens.sum())}
    params = trainable(run.net)
    scale_of = {n: float(p.detach().abs().mean().clamp_min(1e-8)) for n, p in params.items()}
    state, optimizer = _start(run, params, folder, key, resume, config, scale_of)
    if config.block_steps and not state.blocks_done:
        _block_stage(run, params, state, optimizer, folder, key, config, scale_of, progress)
    _train(run, params, state, optimizer, folder, key, config, scale_of, progress)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state.best_params[name])
    path = write_distilled(Path(checkpoint), out, run.net, run.tunable, {
        "steps": config.steps, "lr": config.lr, "samples": config.samples, "seq_len": config.seq_len,
        "block_steps": config.block_steps, "reference": str(reference), "blocks": state.blocks,
        "initial_kld": state.curve[0]["kld"], "kld": state.best, "curve": state.curve,
        "seconds": round(time.perf_counter() - start, 1)}, overwrite)
    if folder.exists():
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return DistillResult(path, state.curve[0]["kld"], state.best, state.curve, time.perf_counter() - start)


@dataclass
class _Run:
    net: torch.nn.Module
    tunable: dict[str, TunableLinear]
    tokens: torch.Tensor  # [samples, seq_len]
    ref_logp: ReferenceTargets  # [samples, seq_len, V or top k]
    targets: list | None = None  # [block][batch]: the reference blocks' outputs (the block stage's targets)
    data: Any = None  # the block stage's BlockData, when the first loss measurement captured it


def _open(checkpoint: str | Path, reference: str | Path, config: DistillConfig) -> _Run:
    """Load both models (exact arithmetic), check they match, cut the calibration tokens and compute
    the reference's log-probabilities once."""
    from bitsmith.runtime.load import load_model
    from bitsmith.runtime.options import RuntimeOptions

    exact = RuntimeOptions.for_measurement()
    loaded = load_model(checkpoint, options=exact)
    if loaded.info is None or loaded.source.kind != "bitsmith":
        raise CheckpointError(f"{checkpoint} is not a bitsmith checkpoint; distill tunes one made by `bitsmith quantize`")
    ref = load_model(reference, options=exact)
    if ref.info is not None:
        raise ValueError(f"--reference {reference} is itself quantized; give the unquantized model the checkpoint came from")
    vq, vr = loaded.model.get_output_embeddings().out_features, ref.model.get_output_embeddings().weight.shape[0]
    if vq != vr:
        raise ValueError(f"the checkpoint has a vocabulary of {vq} and --reference {reference} one of {vr}: "
                         "give the model the checkpoint was quantized from")
    ref.model.float().eval()  # loaded in float32 already; the block targets are float32
    tokens = _calibration_tokens(ref.model, loaded.tokenizer, config)
    ref_logp, targets = reference_pass(ref.model, tokens, config.batch, bool(config.block_steps), config.topk_for(vr))
    del ref
    net = loaded.model.float().eval()
    tunable = make_tunable(net, sorted(loaded.info.specs))
    if not tunable:
        raise ValueError(f"{checkpoint} has no quantized linear layer to tune")
    return _Run(net, tunable, tokens, ref_logp, targets)


def _calibration_tokens(reference: torch.nn.Module, tokenizer: Any, config: DistillConfig) -> torch.Tensor:
    """[samples, seq_len] calibration token ids: windows of ``config.calib_text``, or, for
    ``"generated"``, sequences the reference samples itself (:mod:`bitsmith.recover.selfgen`)."""
    from bitsmith.calib.data import CalibrationConfig

    if config.calib_text == GENERATED and not Path(GENERATED).exists():  # a file of that name is read
        from bitsmith.infer.generate import eos_ids

        return sample_windows(reference, tokenizer, config.samples, config.seq_len, config.seed,
                              banned=eos_ids(reference, tokenizer))
    calib = CalibrationConfig(text=config.calib_text, samples=config.samples, seq_len=config.seq_len, seed=config.seed,
                              random_offsets=config.random_offsets)
    return calib.batches(tokenizer)


def _start(run: _Run, params: dict, folder: Path, key: dict, resume: bool, config: DistillConfig,
           scale_of: dict[str, float]) -> tuple[_State, torch.optim.Adam]:
    """A fresh state (the initial loss measured) or the saved one (``resume``)."""
    saved = _load_state(folder, key) if resume else None
    if saved is None:
        round_to_storage(run.tunable)
        loss = _first_loss(run, config)
        state = _State(0, config.lr, loss, [{"step": 0, "kld": loss, "accepted": True, "lr": config.lr}],
                       {n: p.detach().clone() for n, p in params.items()})
        optimizer = _optimizer(params, config.lr, scale_of)
        state.save(folder, key, params, optimizer)
        return state, optimizer
    meta = json.loads(saved["meta"])
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved["params"][name])
    state = _State(meta["step"], meta["lr"], meta["best"], meta["curve"], saved["best_params"], meta["blocks"],
                   meta["blocks_done"])
    optimizer = _optimizer(params, state.lr, scale_of)
    optimizer.load_state_dict(saved["optimizer"])
    log.info("resuming distillation at step %d of %d from %s", state.step, config.steps, folder)
    return state, optimizer


def _first_loss(run: _Run, config: DistillConfig) -> float:
    """The calibration KL before any step. With a block stage to run, the same forward also captures
    every block's call arguments and the block-0 inputs (``run.data``), which the stage would
    otherwise take with a forward of its own."""
    if not config.block_steps:
        return calibration_loss(run.net, run.tokens, run.ref_logp, config.batch)
    from bitsmith.recover.blockwise import block_data

    total = KLTotal(run.ref_logp, config.batch)
    run.data = block_data(run.net, run.tokens, config.batch, run.targets, on_output=total.add)
    return total.mean()


def _train(run: _Run, params: dict, state: _State, optimizer: torch.optim.Adam, folder: Path, key: dict,
           config: DistillConfig, scale_of: dict[str, float], progress: Progress | None) -> None:
    """Steps from ``state.step`` to ``config.steps``, checking (and saving) every ``check_every``."""
    n = run.tokens.shape[0]
    starts = list(range(0, n, config.batch))
    check_every = config.check_every or len(starts)
    run.net.train(False)  # no dropout; gradients still flow
    while state.step < config.steps:
        sl = slice(starts[state.step % len(starts)], starts[state.step % len(starts)] + config.batch)
        optimizer.zero_grad(set_to_none=True)
        logits = run.net(input_ids=run.tokens[sl], use_cache=False).logits
        run.ref_logp[sl].kl(logits).backward()
        optimizer.step()
        state.step += 1
        if state.step % check_every == 0 or state.step == config.steps:
            optimizer = _check(run, params, state, optimizer, config, scale_of)
            state.save(folder, key, params, optimizer)
        if progress:
            progress(state.step, config.steps, state.curve[-1])


def _check(run: _Run, params: dict, state: _State, optimizer: torch.optim.Adam, config: DistillConfig,
           scale_of: dict[str, float]) -> torch.optim.Adam:
    """Measure the whole calibration loss; accept the state or restore the best with half the rate."""
    round_to_storage(run.tunable)
    loss = calibration_loss(run.net, run.tokens, run.ref_logp, config.batch)
    accepted = loss < state.best
    state.curve.append({"step": state.step, "kld": loss, "accepted": accepted, "lr": state.lr})
    if accepted:
        state.best = loss
        state.best_params = {n: p.detach().clone() for n, p in params.items()}
        return optimizer
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state.best_params[name])
    state.lr /= 2
    return _optimizer(params, state.lr, scale_of)


def _block_stage(run: _Run, params: dict, state: _State, optimizer: torch.optim.Adam, folder: Path, key: dict,
                 config: DistillConfig, scale_of: dict[str, float], progress: Progress | None) -> None:
    """Tune each decoder block towards the reference block's output (:mod:`bitsmith.recover.blockwise`),
    saving after every block, then measure the end-to-end calibration KL: kept when it improves on the
    best so far, else every parameter goes back to the best state (so the reported loss never rises)."""
    from bitsmith.models.arch import find_blocks
    from bitsmith.recover.blockwise import block_data, next_inputs, tune_block

    prefix, blocks = find_blocks(run.net)
    data = run.data if run.data is not None else block_data(run.net, run.tokens, config.batch, run.targets)
    xs, lr = data.inputs, config.block_lr or config.lr
    for i, block in enumerate(blocks):
        if i < len(state.blocks):  # already tuned (a resumed run): only its outputs are needed
            xs = next_inputs(block, xs, data.calls[i])
            continue
        mine = {n: p for n, p in params.items() if n.startswith(f"{prefix}.{i}.")}
        layers = {n: t for n, t in run.tunable.items() if n.startswith(f"{prefix}.{i}.")}
        record, xs = tune_block(block, mine, layers, xs, data.calls[i], data.targets[i], config.block_steps,
                                lambda ps: _optimizer(ps, lr, scale_of))
        data.targets[i] = []  # block i's targets are spent: free them as the stage goes
        state.blocks.append({"block": i, **record})
        state.save(folder, key, params, optimizer)
        if progress:
            progress(state.step, config.steps, {"stage": "block", **state.blocks[-1]})
    run.targets = run.data = data = None  # the end-to-end stage does not need them
    round_to_storage(run.tunable)
    loss = calibration_loss(run.net, run.tokens, run.ref_logp, config.batch)
    accepted = loss < state.best
    state.curve.append({"step": state.step, "stage": "blocks", "kld": loss, "accepted": accepted, "lr": lr})
    if accepted:
        state.best, state.best_params = loss, {n: p.detach().clone() for n, p in params.items()}
    else:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state.best_params[name])
    state.blocks_done = True
    state.save(folder, key, params, optimizer)
    if progress:
        progress(state.step, config.steps, state.curve[-1])
