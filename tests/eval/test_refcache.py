"""Reference-logits cache: exact round trip, KL equal to the exact KL at k = V, a small
underestimate at k < V, and refusal of a cache built for another tokenizer or text."""

from pathlib import Path

import pytest
import torch
from tests.tiny import make_tiny_model, sample_text

from bitsmith.eval import refcache
from bitsmith.eval.metrics import token_stats
from bitsmith.eval.suite import evaluate_variants, text_windows
from bitsmith.runtime.load import load_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("refcache")
    ref = load_model(make_tiny_model(root / "ref", seed=0))
    other = load_model(make_tiny_model(root / "other", seed=0))
    with torch.no_grad():  # a perturbed copy: a stand-in for a quantized model
        g = torch.Generator().manual_seed(1)
        for p in other.model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    text = sample_text(800)
    wins = text_windows(ref.tokenizer, text, ctx=64, max_windows=3)
    return ref, other, text, wins


def _meta(ref, text):
    return {"model": "tiny", "tokenizer": refcache.tokenizer_fingerprint(ref.tokenizer), "text": refcache.text_fingerprint(text)}


def test_round_trip_is_exact(models, tmp_path: Path) -> None:
    ref, _, text, wins = models
    cache = refcache.build_cache(ref.model, wins, _meta(ref, text), k=8)
    path = refcache.save_cache(cache, tmp_path / "c.safetensors")
    back = refcache.load_cache(path, expect=_meta(ref, text))
    for name in ("windows", "topk_logp", "topk_ids", "rest_logp", "target_logp", "argmax"):
        a, b = getattr(cache, name), getattr(back, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert back.meta == cache.meta and back.k == 8 and back.ctx == 64
    assert cache.topk_logp.dtype == torch.float16 and cache.topk_ids.dtype == torch.int32


def test_kl_exact_at_full_vocab_and_lower_bound_below(models) -> None:
    ref, other, text, wins = models
    exact = evaluate_variants(ref.model, {"m": other.model}, wins)["m"]
    vocab = len(ref.tokenizer)
    full = refcache.evaluate_against_cache(other.model, refcache.build_cache(ref.model, wins, _meta(ref, text), k=vocab))
    assert full.kld_mean == pytest.approx(exact.kld_mean, rel=2e-3)
    assert full.top1 == exact.top1 and full.ppl == pytest.approx(exact.ppl, rel=1e-6)
    assert full.ref_ppl == pytest.approx(exact.ref_ppl, rel=1e-6)
    assert full.dprob_mean == pytest.approx(exact.dprob_mean, abs=1e-7)
    previous = 0.0
    for k in (4, 16, 64, 100):  # more tokens kept: a tighter lower bound (V = 117)
        approx = refcache.evaluate_against_cache(other.model, refcache.build_cache(ref.model, wins, _meta(ref, text), k=k))
        assert previous <= approx.kld_mean <= exact.kld_mean * 1.002
        previous = approx.kld_mean
    # a random tiny model is nearly flat, the worst case: k = 100 of 117 still misses ~4 %
    assert previous == pytest.approx(exact.kld_mean, rel=0.1)


def test_cached_kl_matches_exact_per_position_on_random_logits() -> None:
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(50, 40, generator=g) * 3, torch.randn(50, 40, generator=g) * 3
    targets = torch.randint(0, 40, (50,), generator=g)
    exact = token_stats(p_logits, q_logits, targets).kld
    stats = refcache._window_stats(p_logits, targets, k=40)
    approx = refcache.cached_kl(q_logits, stats["topk_logp"], stats["topk_ids"], stats["rest_logp"])
    assert torch.allclose(approx, exact, rtol=2e-3, atol=2e-4)
    stats = refcache._window_stats(p_logits, targets, k=10)
    lower = refcache.cached_kl(q_logits, stats["topk_logp"], stats["topk_ids"], stats["rest_logp"])
    assert bool((lower <= exact + 2e-3).all())


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, 32, 500])
def test_score_window_equals_scoring_from_log_softmax(chunk: int, native: bool, monkeypatch) -> None:
    """The scorer (no materialised log-softmax; native kernel, or torch on ragged chunks) against the
    plain one on fresh random logits: ties in the argmax, a cache whose k is below and at the vocabulary."""
    if not native:
        from bitsmith.kernels import score

        monkeypatch.setattr(score, "row_lse_argmax", lambda x, threads=None: None)
    g = torch.Generator().manual_seed(chunk)
    t, v = 45, 300
    ref_logits, logits = torch.randn(t, v, generator=g) * 4, torch.randn(t, v, generator=g) * 4
    logits[3, 10] = logits[3, 20] = logits[3].max() + 1.0  # a tie: both take the first index
    targets = torch.randint(0, v, (t,), generator=g)
    for k in (17, v):
        stats = refcache._window_stats(ref_logits, targets, k=k)
        cache = refcache.RefCache(windows=torch.zeros(1, t + 1, dtype=torch.int32), meta={"vocab": str(v)},
                                  **stats)
        got = refcache.score_window(logits, targets, cache, slice(0, t), chunk=chunk)
        logq = torch.log_softmax(logits, dim=-1)
        want_kl = refcache.cached_kl(logits, stats["topk_logp"], stats["topk_ids"], stats["rest_logp"], logq)
        assert torch.allclose(got.nll, -logq.gather(-1, targets[:, None]).squeeze(-1).double(), atol=2e-5)
        assert torch.allclose(got.kld, want_kl, rtol=1e-4, atol=1e-6)
        assert torch.equal(got.top1, logq.max(-1).indices == stats["argmax"].long())
        assert torch.equal(got.ref_nll, -stats["target_logp"].double())
    with pytest.raises(ValueError, match="chunk"):
        refcache.score_window(logits, targets, cache, slice(0, t), chunk=0)


def test_other_tokenizer_or_text_is_refused(models, tmp_path: Path) -> None:
    ref, _, text, wins = models
    path = refcache.save_cache(refcache.build_cache(ref.model, wins, _meta(ref, text), k=4), tmp_path / "c.safetensors")
    with pytest.raises(refcache.RefCacheError, match="another tokenizer"):
        refcache.load_cache(path, expect={**_meta(ref, text), "tokenizer": "0123"})
    with pytest.raises(refcache.RefCacheError, match="another text"):
        refcache.load_cache(path, expect=_meta(ref, text + " more"))


def test_reference_cache_builds_once_then_reads(models, tmp_path: Path, monkeypatch) -> None:
    ref, other, text, wins = models
    monkeypatch.setenv("BITSMITH_CACHE", str(tmp_path))
    calls = []

    def load():
        calls.append(1)
        return ref.model

    first = refcache.reference_cache(ref.name, ref.tokenizer, text, wins, load, k=8)
    again = refcache.reference_cache(ref.name, ref.tokenizer, text, wins[:2], load, k=8)
    assert len(calls) == 1 and again.windows.shape[0] == 2
    assert torch.equal(again.topk_ids, first.topk_ids[: 2 * 63])
    assert list((tmp_path / "refcache").glob("ref-*.safetensors"))


def test_cli_reference_cache_builds_once_reuses_and_refuses_mismatch(tmp_path: Path, monkeypatch, capsys) -> None:
    """`eval/compare --reference-cache DIR`: the first run builds one file per domain from
    --reference; later runs reuse it without loading the reference and give the same numbers as
    exact evaluation at k = V; another text or reference under the same domain name is refused."""
    import json

    import bitsmith.runtime.load as load_mod
    from bitsmith.cli import main
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize
    from bitsmith.spec import QuantSpec

    tiny = make_tiny_model(tmp_path / "tiny", seed=0)
    quantize(tiny, tmp_path / "w3", QuantizePlan(QuantSpec.parse("w3g32"), options={"clip_search": False}))
    quantize(tiny, tmp_path / "w8", QuantizePlan(QuantSpec.parse("w8"), options={"clip_search": False}))
    words = tmp_path / "words.txt"
    words.write_text(sample_text(900))
    cache, out = tmp_path / "cache", tmp_path / "out.json"
    common = ["--text", f"words={words}", "--ctx", "32", "--max-windows", "3", "--cache-topk", "117"]  # k = V: exact

    assert main(["eval", str(tmp_path / "w3"), "--reference", str(tiny), "--json", str(out), *common]) == 0
    exact = json.loads(out.read_text())
    assert main(["eval", str(tmp_path / "w3"), "--reference", str(tiny), "--reference-cache", str(cache), "--json", str(out), *common]) == 0
    built = json.loads(out.read_text())
    assert [p.name for p in cache.iterdir()] == ["words.refcache.safetensors"]
    assert "cache for words: built" in capsys.readouterr().out
    for key in ("ppl", "ref_ppl", "top1", "tokens"):
        assert built[key] == pytest.approx(exact[key], rel=1e-6), key
    assert built["kld_mean"] == pytest.approx(exact["kld_mean"], rel=2e-3) and built["kld_mean"] > 0

    loads = []
    real_load = load_mod.load_model
    monkeypatch.setattr(load_mod, "load_model", lambda m, *a, **k: loads.append(str(m)) or real_load(m, *a, **k))
    stamp = (cache / "words.refcache.safetensors").stat().st_mtime_ns
    # reuse without --reference: only the scored model is loaded, the cache file is untouched
    assert main(["eval", str(tmp_path / "w3"), "--reference-cache", str(cache), "--json", str(out), *common]) == 0
    assert json.loads(out.read_text())["kld_mean"] == built["kld_mean"] and loads == [str(tmp_path / "w3")]
    assert "cache for words: reused" in capsys.readouterr().out
    assert (cache / "words.refcache.safetensors").stat().st_mtime_ns == stamp

    # compare against the same cache (reference named by the checkpoints): no reference load either
    loads.clear()
    assert main(["compare", str(tmp_path / "w8"), str(tmp_path / "w3"), "--reference-cache", str(cache), "--json", str(out), *common]) == 0
    data = json.loads(out.read_text())
    assert sorted(loads) == sorted([str(tmp_path / "w8"), str(tmp_path / "w3")])
    assert data["domains"]["words"]["B"]["kld_mean"] == built["kld_mean"]
    assert 0 < data["domains"]["words"]["A"]["kld_mean"] < built["kld_mean"] and data["verdict"].startswith("B is")

    # a model as its own reference (e.g. a w8 stand-in for a reference too big to load twice): one load
    loads.clear()
    assert main(["eval", str(tmp_path / "w8"), "--reference", str(tmp_path / "w8"), "--reference-cache", str(tmp_path / "self"),
                 "--json", str(out), *common]) == 0
    own = json.loads(out.read_text())
    assert loads == [str(tmp_path / "w8")] and own["top1"] == 1.0 and abs(own["kld_mean"]) < 1e-6

    # the same domain name over another text, or another reference: a clear one-line error
    words.write_text(sample_text(900) + " changed")
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tmp_path / "w3"), "--reference-cache", str(cache), *common])
    assert exc.value.code == 1 and "another text" in capsys.readouterr().err
    words.write_text(sample_text(900))
    other = make_tiny_model(tmp_path / "other", seed=1)
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tmp_path / "w3"), "--reference", str(other), "--reference-cache", str(cache), *common])
    assert exc.value.code == 1 and "another model" in capsys.readouterr().err
    # more windows than the cache holds, and a missing cache without --reference
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tmp_path / "w3"), "--reference-cache", str(cache), *common[:-4], "--max-windows", "50", *common[-2:]])
    assert exc.value.code == 1 and "holds 3 windows" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tmp_path / "w3"), "--reference-cache", str(tmp_path / "none"), *common])
    assert exc.value.code == 1 and "pass --reference" in capsys.readouterr().err
