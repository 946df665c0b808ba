"""Reference-logits cache: run the unquantized model once over an evaluation text, keep what
KL(reference || model) needs, and score any number of quantized variants later without the
reference in memory.

What is stored per predicted position (N = windows x (ctx - 1) positions, vocabulary V):

- ``topk_logp`` [N, k] fp16 and ``topk_ids`` [N, k] int32: the reference's k largest
  log-probabilities and their token ids;
- ``rest_logp`` [N] fp32: ``log(1 - sum_k p_i)``, the log of the mass outside the top k
  (``-inf`` when k == V);
- ``target_logp`` [N] fp32: the reference's log-probability of the true next token (its ppl);
- ``argmax`` [N] int32: the reference's most likely token (top-1 agreement);

plus the windows themselves [n, ctx] int32, so scoring needs only the model and the cache.
At k = 256 that is ~1.5 KB per position: ~23 MB for 15k tokens, whatever V is.

KL from the cache treats the k tokens as singletons and everything else as one bucket:

    KL~ = sum_{i in topk} p_i (log p_i - log q_i) + r_p (log r_p - log r_q),
    r_p = 1 - sum_{topk} p_i,   r_q = 1 - sum_{topk} q_i (the *same* k ids).

By the log-sum inequality (the data-processing inequality for KL under the coarse-graining
"merge all other tokens"), KL~ <= KL(p || q): the cache gives a lower bound, exact when k = V.
The stored fp16 log-probs are renormalised (together with the fp32 rest mass) to sum to one
before use, so the rounding error enters only to second order and through ``delta * log(p/q)``.

Measured approximation error (relative error of the mean KLD, cached minus exact, same windows,
ctx 512; the cache's own arithmetic is exact to ~1e-5 relative at k = V, so all of it is the
coarse-graining):

- tiny random test model (V = 117, nearly flat distributions, w3g32, 8 x 64 tokens):
  k=16: -65 %, k=64: -22 %, k=100: -4.3 %, k=117 (= V): +0.0004 %;
- SmolLM2-135M (V = 49152; reference: the dequantized Q4_1 GGUF; 4 windows per domain),
  w8 (exact KLD 0.0023 prose / 0.0020 code): prose k=16: -31 %, k=64: -17 %, k=256: -7.6 %;
  code k=16: -19 %, k=64: -9.6 %, k=256: -4.2 %;
  w3g128 (exact KLD 1.91 prose / 1.68 code): prose k=16: -20 %, k=64: -10 %, k=256: -4.7 %;
  code k=16: -9.1 %, k=64: -4.5 %, k=256: -1.9 %.

The error is always an underestimate and is largest, relatively, for the best quantizations: their
small divergence is spread over the long tail of unlikely tokens that the top k leaves out. Hence
the default k = 256 (~1.5 KB per position, 23 MB for 15k tokens): use exact evaluation
(:func:`bitsmith.eval.suite.evaluate_variants`) when the reference fits in memory and the numbers
are to be compared with other projects; use the cache to rank many variants quickly.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bitsmith.eval.metrics import EvalResult, TokenStats, summarize
from bitsmith.eval.perplexity import eval_mode, window_logits
from bitsmith.kernels.score import lse_argmax

__all__ = [
    "RefCache", "RefCacheError", "build_cache", "save_cache", "load_cache", "cached_kl",
    "evaluate_against_cache", "tokenizer_fingerprint", "text_fingerprint", "cache_path",
    "model_fingerprint", "default_cache_dir", "reference_cache", "DEFAULT_TOPK",
    "domain_cache_file", "open_or_build", "reference_result",
]

log = logging.getLogger(__name__)

DEFAULT_TOPK = 256  # see the measured error in the module docstring
CACHE_VERSION = "1"
_PROBE = "Tokenizer check: The quick brown fox, 12345 + 678 = ?\n    def f(x): return x**2  # é ü 日本"
_ARRAYS = ("windows", "topk_logp", "topk_ids", "rest_logp", "target_logp", "argmax")


class RefCacheError(ValueError):
    """A cache does not fit the request (other tokenizer, text, ctx) or is unreadable."""


@dataclass(frozen=True)
class RefCache:
    """Compact reference statistics of ``windows`` [n, ctx]; see the module docstring."""

    windows: Tensor  # [n, ctx] int32 token ids
    topk_logp: Tensor  # [N, k] fp16, N = n * (ctx - 1)
    topk_ids: Tensor  # [N, k] int32
    rest_logp: Tensor  # [N] fp32, log of the mass outside the top k (-inf if none)
    target_logp: Tensor  # [N] fp32, log p(true next token)
    argmax: Tensor  # [N] int32, the reference's most likely token
    meta: dict[str, str]  # model, tokenizer, text (hashes), ctx, k, vocab, version

    @property
    def ctx(self) -> int:
        return int(self.windows.shape[1])

    @property
    def k(self) -> int:
        return int(self.topk_logp.shape[1])

    def head(self, n_windows: int) -> RefCache:
        """The first ``n_windows`` windows (the windows of a text never depend on how many)."""
        rows = n_windows * (self.ctx - 1)
        return replace(
            self, windows=self.windows[:n_windows], topk_logp=self.topk_logp[:rows],
            topk_ids=self.topk_ids[:rows], rest_logp=self.rest_logp[:rows],
            target_logp=self.target_logp[:rows], argmax=self.argmax[:rows],
        )


def default_cache_dir() -> Path:
    """``$BITSMITH_CACHE/refcache``, else ``~/.cache/bitsmith/refcache``."""
    env = os.environ.get("BITSMITH_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "bitsmith"
    return root / "refcache"


def _sha(data: str | bytes) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the vocabulary (token -> id) and of the encoding of a fixed probe string."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    probe = list(tokenizer(_PROBE, add_special_tokens=True)["input_ids"])
    return _sha(json.dumps([len(tokenizer), vocab, probe], ensure_ascii=False))


def text_fingerprint(text: str) -> str:
    return _sha(text)


def model_fingerprint(path: str | Path) -> str:
    """Identity of a model on disk: its resolved path plus the sizes and mtimes of its files."""
    p = Path(path).expanduser().resolve()
    files = [p] if p.is_file() else sorted(f for f in p.glob("*") if f.is_file())
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return _sha(json.dumps([str(p), stamp]))


def cache_path(model_id: str, text_hash: str, ctx: int, k: int, folder: Path | None = None) -> Path:
    """Where the cache of (model, text, ctx, k) lives; the key is a hash of the four."""
    key = _sha(json.dumps([model_id, text_hash, ctx, k, CACHE_VERSION]))
    return (folder or default_cache_dir()) / f"ref-{key}.safetensors"


def topk_and_rest(logp: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` largest of each row of log-probabilities ``logp`` [..., V] (fp16), their ids (int32)
    and the log of the mass outside them, ``log(1 - sum_k p_i)`` [...] (fp32; ``-inf`` when k >= V):
    what KL~ (module docstring, :func:`kl_from_top`) needs of the reference."""
    vocab = logp.shape[-1]
    values, ids = logp.topk(min(k, vocab), dim=-1)  # [..., k], [..., k]
    if k >= vocab:
        rest = torch.full(logp.shape[:-1], -math.inf)  # no mass outside the top k
    else:
        covered = torch.logsumexp(values.double(), dim=-1)  # log sum_k p_i <= 0
        rest = torch.log(-torch.expm1(covered.clamp(max=0.0))).float()  # log(1 - sum_k p_i)
    return values.half(), ids.int(), rest


def _window_stats(logits: Tensor, targets: Tensor, k: int) -> dict[str, Tensor]:
    """Top-k, rest mass, target log-prob and argmax of one window's logits [T, V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
    values, ids, rest = topk_and_rest(logp, k)
    return {
        "topk_logp": values, "topk_ids": ids, "rest_logp": rest,
        "target_logp": logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1),
        "argmax": logp.argmax(-1).int(),
    }


def build_cache(
    model: Any,
    wins: Tensor,
    meta: dict[str, str],
    k: int = DEFAULT_TOPK,
    progress: Callable[[int, int], None] | None = None,
) -> RefCache:
    """Run the reference ``model`` over ``wins`` [n, ctx] and keep its top-``k`` statistics.

    ``meta`` should name the model, tokenizer and text (see :func:`tokenizer_fingerprint`,
    :func:`text_fingerprint`); ctx, k, vocabulary size and the format version are added here.
    """
    if k < 1:
        raise ValueError(f"top-k must be at least 1, got {k}")
    if wins.dim() != 2 or wins.shape[1] < 2:
        raise ValueError(f"windows must be [n, ctx] with ctx >= 2, got shape {tuple(wins.shape)}")
    n, ctx = wins.shape
    parts: dict[str, list[Tensor]] = {name: [] for name in _ARRAYS[1:]}
    vocab = 0
    with torch.inference_mode(), eval_mode(model):
        for i, window in enumerate(wins):
            logits = window_logits(model, window.long())[:-1]
            vocab = int(logits.shape[-1])
            for name, value in _window_stats(logits, window[1:], k).items():
                parts[name].append(value.cpu())
            if progress:
                progress((i + 1) * ctx, n * ctx)
    arrays = {name: torch.cat(values) for name, values in parts.items()}
    full_meta = {**meta, "ctx": str(ctx), "k": str(min(k, vocab)), "vocab": str(vocab),
                 "version": CACHE_VERSION}
    log.info("reference cache: %d windows x %d, top-%d of %d", n, ctx, min(k, vocab), vocab)
    return RefCache(windows=wins.int().clone(), meta=full_meta, **arrays)


def save_cache(cache: RefCache, path: Path) -> Path:
    """Write ``cache`` as one safetensors file (its metadata in the header), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tensors = {name: getattr(cache, name).contiguous() for name in _ARRAYS}
    save_file(tensors, str(tmp), metadata=cache.meta)
    os.replace(tmp, path)
    return path


def load_cache(path: Path, expect: dict[str, str] | None = None) -> RefCache:
    """Read a cache; every key of ``expect`` (e.g. tokenizer, text, ctx) must match its metadata.

    A mismatch raises :class:`RefCacheError` naming the field, so a cache is never used with
    another tokenizer or text.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference cache {path} does not exist; build it with build_cache")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        missing = [name for name in _ARRAYS if name not in f.keys()]
        if missing or meta.get("version") != CACHE_VERSION:
            raise RefCacheError(f"{path} is not a bitsmith reference cache (version {CACHE_VERSION}); delete it and run again")
        arrays = {name: f.get_tensor(name) for name in _ARRAYS}
    for key, want in (expect or {}).items():
        have = meta.get(key)
        if have != want:
            raise RefCacheError(
                f"reference cache {path} was built for another {key} ({have!r}, expected {want!r}); "
                "a cache only scores the same tokenizer and text it was built from: build a new one"
            )
    return RefCache(meta=meta, **arrays)


def cached_kl(logits: Tensor, topk_logp: Tensor, topk_ids: Tensor, rest_logp: Tensor,
              logq: Tensor | None = None) -> Tensor:
    """KL~(reference || model) per position [T] (float64) from model ``logits`` [T, V].

    The reference's stored top-k and rest mass are renormalised to sum to one (undoing the fp16
    rounding to first order), then compared with the model's mass on the same k ids and the rest.
    ``logq``: the model's log-softmax of ``logits`` when the caller has it already (it is the costly
    part over a large vocabulary).
    """
    if logq is None:
        logq = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
    logq_top = logq.gather(-1, topk_ids.long().to(logq.device)).double()  # [T, k]
    return kl_from_top(logq_top, topk_logp, rest_logp)


def kl_from_top(logq_top: Tensor, topk_logp: Tensor, rest_logp: Tensor) -> Tensor:
    """:func:`cached_kl` from the model's log-probabilities on the cache's k ids [T, k] (float64)."""
    logp_all = torch.cat([topk_logp.double(), rest_logp.double().unsqueeze(-1)], dim=-1)  # [T, k+1]
    logp_all = logp_all.to(logq_top.device) - torch.logsumexp(logp_all, dim=-1, keepdim=True)
    covered_q = torch.logsumexp(logq_top, dim=-1)  # [T] log sum_k q_i
    # log(1 - sum_k q_i), floored: q's float32 mass on k = V ids can round to just above one.
    rest_q = torch.log((-torch.expm1(covered_q.clamp(max=0.0))).clamp(min=1e-30))  # [T]
    logq_all = torch.cat([logq_top, rest_q.unsqueeze(-1)], dim=-1)  # [T, k+1]
    terms = logp_all.exp() * (logp_all - logq_all)  # [T, k+1]
    terms = terms.masked_fill(torch.isneginf(logp_all), 0.0)  # 0 log 0 = 0 (empty rest bucket)
    return terms.sum(-1)


# Rows scored at once where the native kernel does not apply: a chunk's float64 copy stays in the CPU's
# caches (32 x 49,152 doubles is 12 MB) instead of a window's full log-softmax (100 MB written and read back)
SCORE_CHUNK = 32


def score_window(logits: Tensor, targets: Tensor, cache: RefCache, rows: slice,
                 chunk: int = SCORE_CHUNK) -> TokenStats:
    """One window's :class:`TokenStats` against the cache's ``rows`` from the model's ``logits`` [T, V].

    The log-softmax is never materialised: ``lse = logsumexp(logits)`` and the argmax per row
    (:func:`bitsmith.kernels.score.lse_argmax`: the native kernel where it applies, else torch on
    ``chunk`` rows at a time) and the model's log-probabilities are ``logits - lse`` at the gathered
    ids only (targets and the cache's top-k); top-1 is ``logits``' own argmax (log-softmax does not
    move it). Equal, to float rounding, to scoring from ``log_softmax(logits)`` (tested)."""
    dev = logits.device
    top_logp, top_ids = cache.topk_logp[rows].to(dev), cache.topk_ids[rows].to(dev).long()
    rest, argmax = cache.rest_logp[rows].to(dev), cache.argmax[rows].to(dev).long()
    targets = targets.to(dev).long()
    lse, best = lse_argmax(logits, chunk)
    nll = lse - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()
    logq_top = logits.gather(-1, top_ids).double() - lse.unsqueeze(-1)  # [T, k]
    return TokenStats(nll=nll.cpu(), kld=kl_from_top(logq_top, top_logp, rest).cpu(), top1=(best == argmax).cpu(),
                      ref_nll=-cache.target_logp[rows].double())


def evaluate_against_cache(
    model: Any, cache: RefCache, progress: Callable[[int, int], None] | None = None
) -> EvalResult:
    """Score ``model`` on the cache's windows: the same fields as ``evaluate_variants`` gives a
    variant (ppl, KLD mean/median/p99, top-1, ref ppl, dprob), with the top-k KL of the cache."""
    n, ctx = cache.windows.shape
    stats: list[TokenStats] = []
    with torch.inference_mode(), eval_mode(model):
        for i, window in enumerate(cache.windows):
            rows = slice(i * (ctx - 1), (i + 1) * (ctx - 1))
            logits = window_logits(model, window.long())[:-1]
            if logits.shape[-1] != int(cache.meta.get("vocab", logits.shape[-1])):
                raise RefCacheError(f"the model has {logits.shape[-1]} logits per position but the cache was built with a vocabulary of {cache.meta['vocab']}; use a cache of this model's reference")
            stats.append(score_window(logits, window[1:], cache, rows))
            del logits
            if progress:
                progress((i + 1) * ctx, n * ctx)
    return summarize(stats)


def reference_cache(
    model_path: str | Path,
    tokenizer: Any,
    text: str,
    wins: Tensor,
    load_reference: Callable[[], Any],
    k: int = DEFAULT_TOPK,
    folder: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RefCache:
    """The cache of the reference at ``model_path`` on ``wins`` [n, ctx] of ``text``: read from
    the cache folder when a fitting one exists (it may hold more windows), else built by running
    ``load_reference()`` (called only then) and saved."""
    meta = {"model": model_fingerprint(model_path), "tokenizer": tokenizer_fingerprint(tokenizer),
            "text": text_fingerprint(text)}
    n, ctx = wins.shape
    path = cache_path(meta["model"], meta["text"], ctx, k, folder)
    if path.is_file():
        cache = load_cache(path, expect={**meta, "ctx": str(ctx)})
        if cache.windows.shape[0] >= n and torch.equal(cache.windows[:n].long(), wins.long()):
            log.info("reference cache hit: %s", path)
            return cache.head(n)
    cache = build_cache(load_reference(), wins, {**meta, "model_path": str(model_path)}, k, progress)
    save_cache(cache, path)
    return cache


def domain_cache_file(folder: str | Path, domain: str) -> Path:
    """The cache file of one evaluation domain inside a ``--reference-cache`` folder."""
    return Path(folder).expanduser() / f"{domain}.refcache.safetensors"


def open_or_build(
    path: str | Path,
    tokenizer: Any,
    text: str,
    wins: Tensor,
    model_path: str | Path | None,
    load_reference: Callable[[], Any] | None,
    k: int = DEFAULT_TOPK,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[RefCache, bool]:
    """The cache at ``path`` for ``wins`` [n, ctx] of ``text``: (cache, built).

    An existing file is reused when its tokenizer, text, ctx and (when ``model_path`` is given)
    reference model match and it holds at least these windows; any mismatch raises
    :class:`RefCacheError` naming what differs. A missing file is built by running
    ``load_reference()`` (so the reference is loaded only then) and written atomically.
    """
    path = Path(path)
    n, ctx = wins.shape
    expect = {"tokenizer": tokenizer_fingerprint(tokenizer), "text": text_fingerprint(text), "ctx": str(ctx)}
    if model_path is not None:
        expect["model"] = model_fingerprint(model_path)
    if path.is_file():
        cache = load_cache(path, expect=expect)
        if cache.windows.shape[0] < n or not torch.equal(cache.windows[:n].long(), wins.long()):
            raise RefCacheError(
                f"reference cache {path} holds {cache.windows.shape[0]} windows, this run needs {n}; "
                "pass --max-windows <= that, or delete the cache to build it again"
            )
        return cache.head(n), False
    if load_reference is None or model_path is None:
        raise RefCacheError(f"reference cache {path} does not exist yet; pass --reference MODEL to build it")
    meta = {key: expect[key] for key in ("model", "tokenizer", "text")}
    cache = build_cache(load_reference(), wins, {**meta, "model_path": str(model_path)}, k, progress)
    save_cache(cache, path)
    return cache, True


def reference_result(cache: RefCache) -> EvalResult:
    """The reference's own numbers on the cache's windows (ppl; KLD 0, top-1 1 against itself)."""
    ref_nll = -cache.target_logp.double()
    zeros = torch.zeros_like(ref_nll)
    return summarize([TokenStats(nll=ref_nll, kld=zeros, top1=torch.ones_like(ref_nll, dtype=torch.bool), ref_nll=ref_nll)])
