"""Text generation with a KV cache: one prefill pass over the prompt, then one token per step.

Sampling is greedy at ``temperature == 0``; otherwise the logits are divided by the
temperature and sampled from the nucleus: the smallest set of most-likely tokens whose
probability mass reaches ``top_p`` (Holtzman et al. 2020, "The Curious Case of Neural Text
Degeneration", Sec. 3.1). Randomness comes from a local ``torch.Generator`` only, so a
``seed`` makes a run reproducible and the global RNG is never touched.

Models are Hugging Face causal LMs used only through
``model(input_ids=..., cache=..., use_cache=True) -> .logits, .cache``; the cache argument is
spelled ``past_key_values`` in older transformers and is picked from the forward signature.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bitsmith.models.context import check_generation_fits
from bitsmith.runtime.options import RuntimeOptions

__all__ = ["GenerationResult", "TextStream", "check_sampling", "eos_ids", "eval_mode", "generate", "generation_result",
           "prompt_token_ids", "sample_next", "sampling_probs", "seeded_generator"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationResult:
    """The generated continuation and how fast it came.

    ``prefill_s`` is the prompt's forward pass (and the choice of the first new token);
    ``decode_s`` the remaining one-token steps. ``decode_tok_s`` counts the tokens those
    steps produced, i.e. ``new_tokens - 1`` (the first one comes from the prefill logits).
    """

    text: str
    new_tokens: int
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    prefill_tok_s: float
    decode_tok_s: float
    token_ids: tuple[int, ...]

    def as_json(self) -> dict[str, Any]:
        """The JSON contract of ``bitsmith generate --json``."""
        return {
            "new_tokens": self.new_tokens,
            "prefill_tok_s": self.prefill_tok_s,
            "decode_tok_s": self.decode_tok_s,
            "text": self.text,
        }


def check_sampling(temperature: float, top_p: float) -> None:
    if not temperature >= 0:  # also rejects nan
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}; use 1.0 to disable nucleus")


def sample_next(
    logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """Choose the next token id from ``logits`` [V].

    ``temperature == 0`` is greedy (argmax, first index on ties). Otherwise tokens are
    sampled from ``softmax(logits / temperature)`` restricted to the top-``top_p`` nucleus,
    which always keeps at least the most likely token.
    """
    if logits.dim() != 1:
        raise ValueError(f"logits must be one row [vocab], got shape {tuple(logits.shape)}")
    check_sampling(temperature, top_p)
    if temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(sampling_probs(logits, temperature, top_p), 1, generator=generator))


def sampling_probs(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """The distribution :func:`sample_next` draws from at ``temperature > 0``: ``softmax(logits / T)``
    restricted to the top-``top_p`` nucleus (not renormalised: ``torch.multinomial`` takes weights), as
    float32 [V] on the CPU. Speculative decoding compares the target's and the draft's through it."""
    # Sampling runs on the CPU in float32 so a CPU generator drives it on any device.
    probs = torch.softmax(logits.detach().float().cpu() / temperature, dim=-1)  # [V]
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True, stable=True)  # [V], [V]
        # keep token k while the mass *before* it is still short of top_p; k = 0 always kept
        before = sorted_p.cumsum(0) - sorted_p  # [V]
        keep = before < top_p  # [V] bool
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])  # [V]
    return probs


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every end-of-sequence id the generation config, model config or tokenizer names."""
    ids: set[int] = set()
    sources = (
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(getattr(model, "config", None), "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    )
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def prompt_token_ids(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    """Prompt token ids: the chat template applied, or the tokenizer's default encoding."""
    if not chat:
        # Default special tokens follow the model's convention (a BOS for Llama, none for Qwen).
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "chat=True but this tokenizer has no chat template (no chat_template in "
            "tokenizer_config.json); run without --chat, or use an instruct model that ships one"
        )
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


class TextStream:
    """Incremental detokenizer: decode all new tokens, emit the not-yet-emitted suffix.

    A piece is held back while the text ends in U+FFFD (a multi-byte character split across
    tokens) or while a later token rewrote already emitted text (a merge), so the emitted
    pieces concatenate to the final decode.
    """

    def __init__(self, tokenizer: Any, on_token: Callable[[str], None] | None) -> None:
        self.tokenizer = tokenizer
        self.on_token = on_token
        self.ids: list[int] = []
        self.emitted = ""
        self.callback_s = 0.0  # time spent in on_token, kept out of the decode timing

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _emit(self, text: str) -> None:
        piece = text[len(self.emitted) :]
        self.emitted = text
        if piece and self.on_token is not None:
            start = time.perf_counter()
            self.on_token(piece)
            self.callback_s += time.perf_counter() - start

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        if self.on_token is None:
            return  # nobody listens: decode once at the end
        text = self._decode()
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return
        self._emit(text)

    def finish(self) -> str:
        text = self._decode()
        if text.startswith(self.emitted):
            self._emit(text)
        else:
            log.warning("streamed text %r is not a prefix of the final text %r", self.emitted, text)
        return text


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """No dropout while generating; the model's training flag is restored afterwards."""
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    tensor = next(model.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@dataclass(frozen=True)
class _CallStyle:
    """How this model's forward spells its KV-cache argument and last-logits option."""

    cache_kw: str  # "cache" (recent transformers 5) or "past_key_values" (older)
    last_logits_kw: str | None  # "logits_to_keep" when supported: prefill keeps 1 row, not P

    @classmethod
    def of(cls, model: Any) -> _CallStyle:
        params = inspect.signature(model.forward).parameters
        cache_kw = "cache" if "cache" in params else "past_key_values"
        return cls(cache_kw, "logits_to_keep" if "logits_to_keep" in params else None)

    def call(self, model: Any, input_ids: Tensor, cache: Any) -> tuple[Tensor, Any]:
        """Run one step; return (last-position logits [V], the updated cache)."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": True}
        if cache is not None:
            kwargs[self.cache_kw] = cache
        if self.last_logits_kw is not None:
            kwargs[self.last_logits_kw] = 1
        out = model(**kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        if new_cache is None:
            raise RuntimeError(
                f"{type(model).__name__} returned no KV cache for use_cache=True; generation "
                "needs a causal LM whose forward returns one (a transformers *ForCausalLM)"
            )
        return out.logits[0, -1], new_cache


def seeded_generator(seed: int | None) -> torch.Generator:
    """A local CPU generator: seeded for reproducible runs, fresh entropy otherwise."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 and tokens > 0 else 0.0


class _Stepper:
    """One forward step of generation: the lean runner when there is one, else the Hugging Face forward
    with its dynamic cache (carried here between steps)."""

    def __init__(self, model: Any, runner: Any) -> None:
        self.model, self.runner, self.cache = model, runner, None
        self.style = _CallStyle.of(model) if runner is None else None

    def __call__(self, input_ids: Tensor) -> Tensor:
        """input_ids [1, T] at the next positions -> the last position's logits [V]."""
        if self.runner is not None:
            return self.runner(input_ids[0])
        logits, self.cache = self.style.call(self.model, input_ids, self.cache)
        return logits


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat: bool = False,
    on_token: Callable[[str], None] | None = None,
    stop_at_eos: bool = True,
    lean: bool = True,
    options: RuntimeOptions | None = None,
) -> GenerationResult:
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens with a KV cache.

    ``chat=True`` wraps the prompt as one user message in the tokenizer's chat template.
    ``on_token`` receives each newly decoded piece of text as it is produced. Generation
    stops early at any EOS id of the model or tokenizer unless ``stop_at_eos`` is False.
    ``lean`` (default) runs the model through :mod:`bitsmith.infer.lean` (its own submodules and a
    preallocated KV cache) when the architecture is one it reproduces; ``lean=False``, or a model
    outside it (the reason is logged), uses the Hugging Face forward with its dynamic cache.
    ``options`` (KV cache dtype, fused decode step) default to :meth:`RuntimeOptions.from_env`: this is an
    entry point, so the user's ``BITSMITH_*`` overrides apply as they do for ``load_model``.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_sampling(temperature, top_p)
    prompt_ids = prompt_token_ids(tokenizer, prompt, chat)
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens (and the tokenizer adds no BOS); "
                         "give a non-empty prompt")
    check_generation_fits(getattr(model, "config", None), len(prompt_ids), max_new_tokens)  # before any work
    eos = eos_ids(model, tokenizer) if stop_at_eos else frozenset()
    generator = seeded_generator(seed)
    stream = TextStream(tokenizer, on_token)
    device = _device(model)
    with torch.inference_mode(), eval_mode(model):
        runner = None
        if lean:
            from bitsmith.infer.lean import lean_runner

            options = RuntimeOptions.from_env() if options is None else options
            runner = lean_runner(model, len(prompt_ids) + max(max_new_tokens, 1), options)
        step = _Stepper(model, runner)
        start = time.perf_counter()
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # [1, P]
        next_id = sample_next(step(input_ids), temperature, top_p, generator)  # logits [V] after P positions
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(max_new_tokens):
            stream.push(next_id)
            if next_id in eos or i + 1 == max_new_tokens:
                break
            step_ids = torch.tensor([[next_id]], dtype=torch.long, device=device)  # [1, 1]
            next_id = sample_next(step(step_ids), temperature, top_p, generator)
        decode_s = max(time.perf_counter() - start - stream.callback_s, 0.0)
    return generation_result(stream, len(prompt_ids), prefill_s, decode_s)


def generation_result(stream: TextStream, prompt_tokens: int, prefill_s: float, decode_s: float) -> GenerationResult:
    text = stream.finish()
    new = len(stream.ids)
    log.info("generated %d tokens after a %d-token prompt", new, prompt_tokens)
    return GenerationResult(
        text=text,
        new_tokens=new,
        prompt_tokens=prompt_tokens,
        prefill_s=prefill_s,
        decode_s=decode_s,
        prefill_tok_s=_rate(prompt_tokens, prefill_s),
        decode_tok_s=_rate(new - 1, decode_s),
        token_ids=tuple(stream.ids),
    )
