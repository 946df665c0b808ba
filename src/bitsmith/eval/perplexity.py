"""Perplexity, KL divergence and top-1 agreement of a causal LM on fixed token windows.

The measurement protocol is ``docs/PROTOCOL.md``: tokenize with the model's own tokenizer, split
into non-overlapping windows of ``ctx`` tokens (remainder dropped), and score every predicted
position of every window: positions ``0..ctx-2`` predict tokens ``1..ctx-1``.

Models are Hugging Face causal LMs (possibly with quantized linear layers). A window's logits come from
:func:`window_logits`: the lean runner's whole-window forward (:mod:`bitsmith.infer.lean`, float32 KV
cache, the causal attention kernel, q/k/v and gate/up as one kernel call each) where the model fits it,
else ``model(input_ids=..., use_cache=False).logits``. The two agree to float32 summation order (the
lean runner's tests hold it to the Hugging Face forward at 2e-4). Only one window's logits per model
are alive at a time, so a 152k vocabulary at ctx 512 costs ~300 MB per model, not per text.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from bitsmith.eval.metrics import EvalResult, TokenStats, summarize, token_stats
from bitsmith.kernels.alloc import heap_reuse
from bitsmith.runtime.options import RuntimeOptions

__all__ = ["windows", "evaluate", "tokenize_text", "window_logits"]

log = logging.getLogger(__name__)


def windows(token_ids: Sequence[int] | Tensor, ctx: int = 512, bos: int | None = None) -> Tensor:
    """Split a token sequence into non-overlapping windows of ``ctx`` tokens.

    Returns a long tensor [n, ctx]; the trailing remainder is dropped. With ``bos``, every window
    starts with that token followed by ``ctx - 1`` text tokens: models trained to always see BOS
    first (Gemma) are scored as they run, as llama.cpp's perplexity tool does.
    """
    if bos is not None:
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        body = windows(ids, ctx - 1)  # [n, ctx-1]
        return torch.cat([torch.full((body.shape[0], 1), int(bos), dtype=torch.long), body], dim=1)
    if ctx < 2:
        raise ValueError(f"--ctx must be at least 2 tokens to predict anything, got {ctx}")
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()  # [N]
    n = ids.numel() // ctx
    if n == 0:
        raise ValueError(
            f"the text has {ids.numel()} tokens, fewer than one window of --ctx {ctx}; "
            "use a longer text or a smaller --ctx"
        )
    return ids[: n * ctx].reshape(n, ctx).clone()  # [n, ctx]


def _device(model: Any) -> torch.device:
    """Where the model wants its inputs: its ``device`` attribute or its first tensor."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@contextlib.contextmanager
def eval_mode(*models: Any) -> Iterator[None]:
    """Put models in eval mode (no dropout) for the duration; restore their modes after.

    Every scoring loop (here, ``refcache``, ``suite``) runs inside it, so it also serves the loop's
    activations and logits from reused heap pages (:func:`bitsmith.kernels.alloc.heap_reuse`) rather
    than a fresh, page-faulted mapping per tensor; the pages go back to the OS when the loop ends."""
    modes = [(m, m.training) for m in models if m is not None]
    try:
        for model, _ in modes:
            model.eval()
        with heap_reuse():
            yield
    finally:
        for model, was_training in modes:
            model.train(was_training)


# How scoring runs the lean forward: a float32 KV cache (the Hugging Face forward keeps K/V in the model's
# dtype; generation's fp16 cache would round them) and no fused decode step (whole windows only). The
# matmuls compute as the model's kernels were prepared at load time (exact for `eval`, see
# RuntimeOptions.for_measurement).
SCORING_OPTIONS = RuntimeOptions(kv_cache="fp32", fused_decode=False)


def window_logits(model: Any, window: Tensor, lean: bool = True) -> Tensor:
    """Logits [ctx, V] of one window [ctx] (token ids), every position.

    With ``lean`` (the default) through the lean runner where the model fits it; its plan is read once
    per model and cached, a cache of ``ctx`` positions is allocated per window. On a 512-token window
    of Qwen2.5-Coder-1.5B the Hugging Face forward computes attention over the whole 512 x 512 square
    (torch's CPU kernels skip no masked block at this size) and calls q/k/v and gate/up separately.
    ``lean=False``, or a model the runner declines (logged once), runs the Hugging Face forward."""
    from bitsmith.infer.lean import lean_runner

    window = window.reshape(-1)
    runner = lean_runner(model, window.numel(), SCORING_OPTIONS) if lean else None
    if runner is not None:
        return runner.forward(window, all_logits=True)  # [ctx, V]
    input_ids = window.to(_device(model)).unsqueeze(0)  # [1, ctx]
    return model(input_ids=input_ids, use_cache=False).logits[0]  # [ctx, V]


def evaluate(
    model: Any,
    windows: Tensor,
    reference: Any | None = None,
    progress: Callable[[int, int], None] | None = None,
    lean: bool = True,
) -> EvalResult:
    """Score ``model`` on every predicted position of ``windows`` [n, ctx].

    With a ``reference`` model (the unquantized one, same tokenizer) the result also holds
    KL(reference || model), top-1 agreement and the reference's own perplexity.
    ``progress(done_tokens, total_tokens)`` is called after each window. ``lean``: see :func:`window_logits`.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(
            f"windows must be [n, ctx] with ctx >= 2, got shape {tuple(windows.shape)}; "
            "build them with bitsmith.eval.perplexity.windows(token_ids, ctx)"
        )
    n, ctx = windows.shape
    total = n * ctx
    stats: list[TokenStats] = []
    with torch.inference_mode(), eval_mode(model, reference):
        for i, window in enumerate(windows):
            targets = window[1:]  # [ctx-1]
            ref_logits = None
            if reference is not None:
                ref_logits = window_logits(reference, window, lean)[:-1]  # [ctx-1, V]
            logits = window_logits(model, window, lean)[:-1]  # [ctx-1, V]
            if ref_logits is not None:
                ref_logits = ref_logits.to(logits.device)
            stats.append(token_stats(ref_logits, logits, targets))
            del logits, ref_logits  # keep only one window's logits alive
            if progress is not None:
                progress((i + 1) * ctx, total)
    result = summarize(stats)
    log.info("evaluated %d windows x %d tokens: %s", n, ctx, result.as_dict())
    return result


def convention_adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer's own default encoding starts with its BOS token."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > 0 and with_special[0] == bos and (not plain or plain[0] != bos)


def tokenize_text(tokenizer: Any, text: str, add_bos: bool | None = None) -> list[int]:
    """Token ids of ``text`` with no special tokens except, optionally, one leading BOS.

    ``add_bos``: ``True`` prepends the tokenizer's BOS, ``False`` never does, and ``None``
    (the default) follows the tokenizer's own convention: BOS is prepended exactly when
    ``tokenizer(text)`` with its default special tokens would start with BOS (Llama-style
    tokenizers do, Qwen/GPT-2-style ones do not). Nothing else (EOS, padding) is added.
    """
    # verbose=False: a long evaluation text exceeding model_max_length is expected here;
    # it is cut into windows afterwards, so the tokenizer's length warning is noise.
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    if add_bos is None:
        add_bos = convention_adds_bos(tokenizer)
    if add_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise ValueError(
                "add_bos=True but this tokenizer defines no BOS token; "
                "pass add_bos=False (or None to follow the tokenizer)"
            )
        ids.insert(0, int(bos))
    log.debug("tokenized %d characters into %d tokens (bos=%s)", len(text), len(ids), add_bos)
    return ids
