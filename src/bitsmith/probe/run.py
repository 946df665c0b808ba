"""The ``bitsmith probe`` pipeline: the reference's windows, the endpoint's top k on the same positions,
the ladder, and the report (text and JSON).

Per domain, one window of ``positions + 1`` tokens of the domain's text (the reference tokenizer's ids,
sent to the endpoint as token ids so both see the same sequence) gives ``positions`` teacher-forced
predictions. Each is scored as top-k KL (a lower bound, :mod:`bitsmith.probe.divergence`) and top-1
agreement against the reference; the ladder's rungs are scored on the same positions with the same k; the
verdict places the pooled mean on the ladder, with a 90% interval from a paired bootstrap over positions
(endpoint and rungs resampled together).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from bitsmith.probe.divergence import MISSING, bootstrap_means, topk_kl
from bitsmith.probe.endpoint import Endpoint, TopK
from bitsmith.probe.ladder import (
    DEFAULT_LADDER_METHOD,
    DEFAULT_RUNGS,
    Ladder,
    check_ladder_method,
    compute_ladder,
    ladder_cache_file,
    load_or_compute,
)
from bitsmith.probe.verdict import place

__all__ = ["ProbeConfig", "ProbeReport", "TokenCheck", "align_rows", "probe", "summarize"]

log = logging.getLogger(__name__)

MODES = ("auto", "echo", "stepwise")
TOKENIZER_MISMATCH = 0.1  # more than this fraction of checked top-k tokens disagree: another tokenizer


@dataclass(frozen=True)
class ProbeConfig:
    url: str
    reference: str
    texts: tuple[str, ...] = ("prose", "code")
    positions: int = 256  # predictions per domain
    k: int = 20
    api_key: str | None = None
    model: str | None = None
    mode: str = "auto"
    rungs: tuple[str, ...] = DEFAULT_RUNGS
    resamples: int = 1000
    ladder_method: str = DEFAULT_LADDER_METHOD  # how the rungs are made (probe.ladder.LADDER_METHODS)


@dataclass
class TokenCheck:
    """Top-k token strings compared with the reference tokenizer's."""

    checked: int = 0  # entries whose string could be compared
    mismatched: int = 0  # an id whose string is not the reference's piece for that id, or an id out of range
    unnamed: int = 0  # entries without an id whose string names no reference token

    @property
    def differs(self) -> bool:
        bad = self.mismatched + self.unnamed
        return self.checked + self.unnamed >= 20 and bad > TOKENIZER_MISMATCH * (self.checked + self.unnamed)


class _Pieces:
    """The reference tokenizer's text for each id, decoded on demand (the reverse map only when needed)."""

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        self.tokenizer, self.vocab = tokenizer, vocab
        self._reverse: dict[str, int] | None = None

    def piece(self, ident: int) -> str:
        return self.tokenizer.decode([ident], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def lookup(self, text: str) -> int | None:
        if self._reverse is None:
            seen: dict[str, int] = {}
            for i in range(self.vocab):
                p = self.piece(i)
                seen[p] = -2 if p in seen else i  # -2: two ids share the text, so it names neither
            self._reverse = {p: i for p, i in seen.items() if i >= 0 and "\ufffd" not in p}
        return self._reverse.get(text)


def align_rows(rows: list[TopK], pieces: _Pieces, k: int, check: TokenCheck) -> tuple[Tensor, Tensor, Tensor]:
    """(ids [n, k] with MISSING, log-probs [n, k], the endpoint's top-1 id [n] or MISSING) in the reference's
    vocabulary; ``check`` counts what disagreed."""
    n = len(rows)
    ids = torch.full((n, k), MISSING, dtype=torch.long)
    logq = torch.zeros(n, k, dtype=torch.float64)
    top1 = torch.full((n,), MISSING, dtype=torch.long)
    for r, row in enumerate(rows):
        used: set[int] = set()
        for c, (text, lp, ident) in enumerate(zip(row.tokens[:k], row.logprobs[:k], row.ids[:k])):
            if ident is not None:
                ok = 0 <= ident < pieces.vocab
                if ok:
                    mine = pieces.piece(ident)
                    if text and "\ufffd" not in mine:  # llama.cpp sends "" for partial UTF-8 and special tokens
                        check.checked += 1
                        ok = mine == text
                if not ok:
                    check.mismatched += 1
                    continue
            else:
                ident = pieces.lookup(text)
                if ident is None:
                    check.unnamed += 1
                    continue
                check.checked += 1
            if ident in used:
                continue
            used.add(ident)
            ids[r, c], logq[r, c] = ident, lp
            if c == 0:
                top1[r] = ident
    return ids, logq, top1


def _endpoint_rows(endpoint: Endpoint, window: list[int], k: int, mode: str,
                   tick: Callable[[int], None]) -> tuple[list[TopK], str]:
    """The endpoint's top k after each prefix window[:t], t = 1 .. len - 1, and the mode that gave them."""
    if mode in ("auto", "echo"):
        rows = endpoint.echo_positions(window, k)
        if rows is not None and all(r is not None for r in rows[1:]):
            tick(len(window) - 1)
            return list(rows[1:]), "echo"  # type: ignore[arg-type]
        if mode == "echo":
            raise ValueError(f"{endpoint.base} does not return prompt log-probabilities (echo); use --mode stepwise")
    out = []
    for t in range(1, len(window)):
        out.append(endpoint.next_token(window[:t], k))
        tick(1)
    return out, "stepwise"


@dataclass
class ProbeReport:
    config: ProbeConfig
    model: str
    mode: str
    k: int
    summary: dict[str, Any]
    check: TokenCheck
    timing: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        c = self.config
        return {"url": c.url, "model": self.model, "reference": c.reference, "mode": self.mode, "k": self.k,
                "kl_note": f"top-{self.k} KL(reference || endpoint) is a lower bound of the full KL; the ladder's "
                           "rungs are truncated the same way", **self.summary,
                "tokenizer": {"checked": self.check.checked, "mismatched": self.check.mismatched,
                              "unnamed": self.check.unnamed, "differs": self.check.differs},
                "timing_s": self.timing}


def _interval(values: Tensor) -> list[float]:
    return [float(values.quantile(0.05)), float(values.quantile(0.95))]


def _group(kl: Tensor, top1: Tensor, rung_kl: dict[str, Tensor], rung_top1: dict[str, Tensor],
           resamples: int, rung_bits: dict[str, float]) -> dict[str, Any]:
    """Mean KL, top-1 and ladder placement of one set of positions, with bootstrap intervals. The interval
    resamples the endpoint's and the rungs' positions together, so the rungs' own noise is in it."""
    rungs = list(rung_kl)
    means = {r: float(rung_kl[r].mean()) for r in rungs}
    mean = float(kl.mean())
    where = place(mean, means, rung_bits)
    boot = bootstrap_means([kl, *(rung_kl[r] for r in rungs)], resamples)  # [B, 1 + R], paired positions
    bits = torch.tensor([place(float(b[0]), {r: float(b[1 + i]) for i, r in enumerate(rungs)}, rung_bits).bits
                         for b in boot])
    return {"positions": int(kl.numel()), "kl": mean, "kl_interval": _interval(boot[:, 0]),
            "top1": float(top1.double().mean()), "bits": where.bits, "bits_interval": _interval(bits),
            "placement": where.describe(), "nearest": where.nearest, "far": where.far,
            "ladder": {r: {"kl": means[r], "top1": float(rung_top1[r].double().mean()), "bits": rung_bits[r]}
                       for r in rungs}}


def summarize(endpoint: dict[str, tuple[Tensor, Tensor]], ladder: Ladder, check: TokenCheck,
              resamples: int = 1000) -> dict[str, Any]:
    """Per-domain and pooled figures and the verdict; ``endpoint``: domain -> (KL [n], top-1 agreement [n])."""
    domains = {}
    for d, (kl, top1) in endpoint.items():
        domains[d] = _group(kl, top1, {r: ladder.scores[r][d].kl for r in ladder.rungs},
                            {r: ladder.scores[r][d].top1 for r in ladder.rungs}, resamples, ladder.bits)
    cat = lambda parts: torch.cat(list(parts))  # noqa: E731
    overall = _group(cat(kl for kl, _ in endpoint.values()), cat(t for _, t in endpoint.values()),
                     {r: cat(ladder.scores[r][d].kl for d in endpoint) for r in ladder.rungs},
                     {r: cat(ladder.scores[r][d].top1 for d in endpoint) for r in ladder.rungs}, resamples, ladder.bits)
    different = overall["far"] or check.differs
    lo, hi = overall["bits_interval"]
    if check.differs:
        verdict = ("a different tokenizer behind the endpoint: its top-k token strings do not match the reference's "
                   f"({check.mismatched + check.unnamed} of {check.checked + check.unnamed}); not this reference quantized")
    elif overall["far"]:
        verdict = (f"a different model behind the endpoint: KL {overall['kl']:.3g} is more than 3x the lowest rung's "
                   f"({overall['ladder'][ladder.rungs[-1]]['kl']:.3g}); not this reference quantized")
    else:
        verdict = (f"behaves like ~{overall['bits']:.1f} bits per weight ({overall['placement']} of a "
                   f"{ladder.method} ladder; 90% interval {lo:.1f}-{hi:.1f}); nearest rung {overall['nearest']}")
    return {"domains": domains, "overall": overall, "verdict": verdict, "different_model": different,
            "ladder_method": ladder.method}


def _load_reference(reference: str) -> tuple[Any, Any, Any]:
    """(float32 model, tokenizer, source) of the unquantized reference."""
    from bitsmith.models import open_source
    from bitsmith.models.arch import build_model

    source = open_source(reference)
    if source.kind == "bitsmith":
        raise ValueError(f"{reference} is a quantized bitsmith checkpoint; --reference must be the unquantized model "
                         "(an alias, a Hugging Face folder or a GGUF file) so its ladder can be built from it")
    return build_model(source, torch.float32).eval(), source.tokenizer(), source


def _windows(tokenizer: Any, texts: tuple[str, ...], positions: int) -> dict[str, Tensor]:
    from bitsmith.eval.domains import resolve_domains
    from bitsmith.eval.suite import text_windows

    out = {}
    for domain in resolve_domains(list(texts)):
        wins = text_windows(tokenizer, domain.text, positions + 1, max_windows=1)  # [1, positions + 1]
        if wins.shape[0] == 0:
            raise ValueError(f"the text of domain {domain.name!r} has fewer than {positions + 1} tokens; "
                             "give a longer text or fewer --positions")
        out[domain.name] = wins[0]
    return out


def _query(endpoint: Endpoint, windows: dict[str, Tensor], config: ProbeConfig,
           progress: Callable[[str, int, int], None] | None) -> tuple[dict[str, list[TopK]], str]:
    """The endpoint's rows for every domain, and the mode that gave them."""
    rows, mode = {}, ""
    for d, w in windows.items():
        done = [0]

        def tick(n: int, d: str = d, done: list = done) -> None:
            done[0] += n
            if progress:
                progress(d, done[0], config.positions)

        rows[d], mode = _endpoint_rows(endpoint, w.tolist(), config.k, mode or config.mode, tick)  # echo refused once: not asked again
    return rows, mode


def probe(config: ProbeConfig, progress: Callable[[str, int, int], None] | None = None) -> ProbeReport:
    """Measure the endpoint against the reference and place it on the ladder (module docstring)."""
    from bitsmith.eval.refcache import model_fingerprint, tokenizer_fingerprint
    from bitsmith.pipeline.common import quantizable_layers

    if config.mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {config.mode!r}")
    if not 1 <= config.k <= 100 or config.positions < 8:
        raise ValueError("--topk must be 1 to 100 and --positions at least 8")
    check_ladder_method(config.ladder_method)
    endpoint = Endpoint(config.url, config.api_key, config.model,
                        detokenize=lambda ids: tokenizer.decode(ids, skip_special_tokens=True))  # the server adds its BOS
    try:
        model = endpoint.connect()  # before loading anything: a wrong URL fails in a second
        t0 = time.perf_counter()
        net, tokenizer, source = _load_reference(config.reference)  # (the detokenizer above runs only later)
        windows = _windows(tokenizer, config.texts, config.positions)
        with torch.inference_mode():
            ref_logp = {d: torch.log_softmax(net(input_ids=w.long()[None], use_cache=False).logits[0, :-1].float(), -1)
                        for d, w in windows.items()}  # each [positions, V]
        reference_s, t0 = time.perf_counter() - t0, time.perf_counter()
        rows, mode = _query(endpoint, windows, config, progress)
        endpoint_s = time.perf_counter() - t0
    finally:
        endpoint.close()
    k = min(config.k, min(len(r.tokens) for rs in rows.values() for r in rs))  # what the server really returns
    pieces, check, measured = _Pieces(tokenizer, next(iter(ref_logp.values())).shape[-1]), TokenCheck(), {}
    for d, rs in rows.items():
        ids, logq, top1 = align_rows(rs, pieces, k, check)
        measured[d] = (topk_kl(ref_logp[d], ids, logq), top1 == ref_logp[d].argmax(-1))
    t0 = time.perf_counter()
    ref_id = f"{model_fingerprint(source.path)}:{tokenizer_fingerprint(tokenizer)}"
    ladder, cached = load_or_compute(
        ladder_cache_file(ref_id, windows, k, config.rungs, config.ladder_method),
        lambda: compute_ladder(net, lambda name: source.load_tensor(f"{name}.weight"),
                               list(quantizable_layers(source.config)), ref_logp, windows, k, config.rungs,
                               (lambda r: progress(f"ladder {r}", 1, 1)) if progress else None, config.ladder_method))
    timing = {"endpoint_s": endpoint_s, "reference_s": reference_s, "ladder_s": time.perf_counter() - t0,
              "ladder_cached": float(cached), "requests": float(endpoint.requests)}
    mode += " (text prompts: the server refused token ids)" if endpoint.text_prompts else ""
    return ProbeReport(config, model, mode, k, summarize(measured, ladder, check, config.resamples), check, timing)
