"""bitsmith probe against fake OpenAI-compatible endpoints started in-process (tests/probe/fake_endpoint.py):
the reference itself, copies quantized exactly as the ladder's rungs (each must land on its own rung, with
the rung's KL), another model, another tokenizer; both dialects (echo with legacy logprobs; llama.cpp's
stepwise requests with ids); the divergence maths against exact oracles; the CLI and its errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.probe.fake_endpoint import serve
from tests.tiny import make_tiny_model, sample_text

from bitsmith.probe.divergence import MISSING, bootstrap_means, topk_kl, topk_of
from bitsmith.probe.endpoint import EndpointError, parse_logprobs
from bitsmith.probe.ladder import LADDER_METHODS, Ladder, ladder_cache_file, load_or_compute, rung_bits
from bitsmith.probe.run import ProbeConfig, probe
from bitsmith.probe.verdict import place

LADDER = {"w8": 0.001, "w4g128": 0.01, "w3g128": 0.05, "w2g64": 0.3}


# ----------------------------------------------------------------------------- maths against oracles


def _exact_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


@pytest.mark.parametrize("seed", range(5))
def test_topk_kl_is_exact_at_full_k_and_a_lower_bound_below(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    p, q = torch.randn(30, 50, generator=g) * 2, torch.randn(30, 50, generator=g) * 2
    exact = _exact_kl(p, q)
    ids, logq = topk_of(q, 50)
    torch.testing.assert_close(topk_kl(p, ids, logq), exact, atol=1e-9, rtol=0)
    previous = torch.zeros(30, dtype=torch.float64)
    for k in (1, 5, 20, 49):
        ids, logq = topk_of(q, k)
        bound = topk_kl(p, ids, logq)
        assert (bound <= exact + 1e-10).all()
        assert (bound >= previous - 1e-12).all()  # a finer partition never loses divergence
        previous = bound


def test_missing_slots_join_the_rest() -> None:
    """A slot the reference cannot name counts exactly as if the endpoint had not sent it."""
    g = torch.Generator().manual_seed(1)
    p, q = torch.randn(10, 40, generator=g), torch.randn(10, 40, generator=g)
    ids, logq = topk_of(q, 8)
    holed = ids.clone()
    holed[:, 3] = MISSING
    kept = [0, 1, 2, 4, 5, 6, 7]
    torch.testing.assert_close(topk_kl(p, holed, logq), topk_kl(p, ids[:, kept], logq[:, kept]))


def test_bootstrap_is_paired_and_centred() -> None:
    a = torch.arange(100, dtype=torch.float64)
    boot = bootstrap_means([a, 2 * a], resamples=300)
    torch.testing.assert_close(boot[:, 1], 2 * boot[:, 0])  # same positions in both columns
    assert abs(float(boot[:, 0].mean()) - 49.5) < 1.5


def test_place_on_the_ladder() -> None:
    on = place(0.01, LADDER)
    assert (on.bits, on.nearest, on.far) == (4.0, "w4g128", False)
    mid = place(math.sqrt(0.01 * 0.05), LADDER)  # halfway in log KL
    assert mid.bits == pytest.approx(3.5) and mid.describe() == "between w3g128 and w4g128"
    assert place(1e-5, LADDER).describe().startswith("at or above w8")
    assert place(0.5, LADDER).describe().startswith("at or below w2g64") and not place(0.5, LADDER).far
    assert place(1.0, LADDER).far


def test_place_interpolates_on_the_rungs_bits_per_weight() -> None:
    bits = {"w8": 8.06, "w4g128": 4.25, "w3g128": 3.25, "w2g64": 2.5}
    assert place(0.01, LADDER, bits).bits == pytest.approx(4.25)
    mid = place(math.sqrt(0.01 * 0.05), LADDER, bits)
    assert mid.bits == pytest.approx(3.75) and mid.describe() == "between w3g128 and w4g128"
    quarter = place(math.exp(0.25 * math.log(0.05) + 0.75 * math.log(0.3)), LADDER, bits)  # 3/4 of the way to w2g64
    assert quarter.bits == pytest.approx(2.5 + 0.25 * 0.75) and quarter.nearest == "w2g64"
    assert place(1e-5, LADDER, bits).bits == pytest.approx(8.06)


def test_rung_bits_count_codes_scales_and_zeros() -> None:
    # w4g128 over 256-wide rows: 4 code bits + (fp16 scale + fp16 zero) / 128 = 4.25; w8 per channel: 8 + 32 / 256
    assert rung_bits("w4g128", [(64, 256), (32, 256)]) == pytest.approx(4.25)
    assert rung_bits("w2g64", [(8, 128)]) == pytest.approx(2.5)
    assert rung_bits("w8", [(8, 256)]) == pytest.approx(8 + 32 / 256)
    assert rung_bits("w4g128s", [(8, 256)]) == pytest.approx(4 + 16 / 128)  # symmetric: no zero


def test_ladder_cache_is_keyed_by_method_and_rebuilds_an_old_version(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BITSMITH_CACHE", str(tmp_path))
    windows = {"prose": torch.arange(9)}
    files = {m: ladder_cache_file("ref", windows, 10, ("w8",), m) for m in LADDER_METHODS}
    assert len(set(files.values())) == len(LADDER_METHODS)
    path = files["hqq"]
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"version": "1", "rungs": ["w8"], "k": 10, "scores": {}}))  # before rung bits existed
    fresh = Ladder(("w8",), 10, {"w8": {}}, {"w8": 8.1}, "hqq")
    ladder, cached = load_or_compute(path, lambda: fresh)
    assert not cached and ladder is fresh
    again, cached = load_or_compute(path, lambda: pytest.fail("should come from the cache"))
    assert cached and again.bits == {"w8": 8.1} and again.method == "hqq"


def test_parse_both_response_shapes_and_refuse_others() -> None:
    legacy = {"logprobs": {"tokens": ["a", "b"], "top_logprobs": [None, {"x": -0.1, "y": -2.5}]}}
    rows = parse_logprobs(legacy)
    assert rows[0] is None and rows[1].tokens == ("x", "y") and rows[1].ids == (None, None)
    content = {"logprobs": {"content": [{"token": "x", "logprob": -0.3, "top_logprobs": [
        {"id": 5, "token": "y", "logprob": -2.0}, {"id": 4, "token": "x", "logprob": -0.3}]}]}}
    assert parse_logprobs(content)[0].ids == (4, 5)  # sorted most likely first
    with pytest.raises(EndpointError, match="no log-probabilities"):
        parse_logprobs({"text": "hi"})
    with pytest.raises(EndpointError, match="unrecognised"):
        parse_logprobs({"logprobs": {"what": 1}})


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The reference folder, two texts, and served copies: the reference, its rungs, another model."""
    from bitsmith.methods import get_method
    from bitsmith.models import open_source
    from bitsmith.models.arch import build_model
    from bitsmith.pipeline.common import quantizable_layers
    from bitsmith.spec import QuantSpec

    root = tmp_path_factory.mktemp("probe")
    ref = make_tiny_model(root / "ref", "llama", seed=4)
    texts = []
    for i in range(2):
        path = root / f"t{i}.txt"
        path.write_text(sample_text(400, seed=10 + i))
        texts.append(f"t{i}={path}")
    source = open_source(ref)

    def quantized(spec: str | None, ladder_method: str = "rtn"):
        """The reference with its decoder linears quantized as ``ladder_method``'s rungs are."""
        net = build_model(source, torch.float32)
        method, options = LADDER_METHODS[ladder_method]
        if spec is not None:
            for name in quantizable_layers(source.config):
                w = net.get_submodule(name).weight
                w.data = get_method(method)(w.data.float(), QuantSpec.parse(spec), None, dict(options)).dequantize()
        return net.eval()

    other = build_model(open_source(make_tiny_model(root / "other", "llama", seed=99)), torch.float32).eval()
    with torch.no_grad():  # confident where the reference is nearly flat: far beyond any rung of it
        other.lm_head.weight *= 8
    return {"ref": ref, "texts": tuple(texts), "tokenizer": source.tokenizer(), "quantized": quantized, "other": other}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BITSMITH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _probe(world, url: str, **kw):
    cfg = dict(url=url, reference=str(world["ref"]), texts=world["texts"], positions=40, k=10, resamples=200,
               ladder_method="rtn")
    cfg.update(kw)
    return probe(ProbeConfig(**cfg)).as_json()


def test_the_reference_itself_is_above_every_rung(world) -> None:
    with serve(world["quantized"](None), world["tokenizer"], "openai") as (url, state):
        report = _probe(world, url)
    assert report["mode"] == "echo" and state.requests == 2  # one echo request per text
    assert report["overall"]["kl"] < 1e-9 and report["overall"]["top1"] == 1.0
    assert report["overall"]["placement"].startswith("at or above w8")
    assert not report["different_model"] and report["tokenizer"]["checked"] > 0
    assert report["tokenizer"]["mismatched"] == report["tokenizer"]["unnamed"] == 0


@pytest.mark.parametrize("rung", ["w8", "w3g128", "w2g64"])
def test_each_rung_served_lands_on_itself(world, rung: str) -> None:
    """llama.cpp dialect (no echo: one request per position, ids in the answer)."""
    with serve(world["quantized"](rung), world["tokenizer"], "llama") as (url, state):
        report = _probe(world, url)
    assert report["mode"] == "stepwise" and state.requests == 2 * 40 + 2  # + the refused echo and its retry as text
    overall = report["overall"]
    assert overall["nearest"] == rung
    assert overall["kl"] == pytest.approx(overall["ladder"][rung]["kl"], rel=1e-3)  # float32 prefix vs window
    lo, hi = overall["bits_interval"]
    assert lo - 1e-6 <= overall["bits"] <= hi + 1e-6
    assert "behaves like" in report["verdict"]
    for name, domain in report["domains"].items():
        assert domain["kl"] == pytest.approx(domain["ladder"][rung]["kl"], rel=1e-3), name


@pytest.mark.parametrize("method", ["hqq", "rtn-clip"])
def test_a_copy_made_like_another_ladder_lands_on_that_ladder(world, method: str) -> None:
    """hqq (the default) and rtn-clip rungs: a served copy quantized the same way lands on its own rung,
    and the rungs' bits are their bits per weight, not their names."""
    with serve(world["quantized"]("w4g128", method), world["tokenizer"], "openai") as (url, _):
        report = _probe(world, url, ladder_method=method)
    overall = report["overall"]
    assert report["ladder_method"] == method and overall["nearest"] == "w4g128"
    assert overall["kl"] == pytest.approx(overall["ladder"]["w4g128"]["kl"], rel=1e-3)
    assert overall["bits"] == pytest.approx(overall["ladder"]["w4g128"]["bits"], abs=0.05)
    assert overall["ladder"]["w4g128"]["bits"] > 4 and overall["ladder"]["w2g64"]["bits"] >= 2.5
    assert f"of a {method} ladder" in report["verdict"]


def test_ladder_ranks_rungs_and_is_cached(world) -> None:
    with serve(world["quantized"]("w2g64"), world["tokenizer"], "openai") as (url, _):
        report = _probe(world, url)
    ladder = report["overall"]["ladder"]
    assert ladder["w8"]["kl"] < ladder["w4g128"]["kl"] < ladder["w3g128"]["kl"] < ladder["w2g64"]["kl"]
    assert report["timing_s"]["ladder_cached"] == 1.0  # computed by an earlier test with the same positions and k


def test_a_server_that_refuses_token_ids_gets_text(world) -> None:
    with serve(world["quantized"]("w3g128"), world["tokenizer"], "text") as (url, _):
        report = _probe(world, url)
    # the window starts with BOS, which a text prompt cannot carry: the echo cannot be aligned, so the
    # probe goes position by position, each prefix re-encoded by the server (approximate: no BOS)
    assert report["mode"] == "stepwise (text prompts: the server refused token ids)"
    assert report["overall"]["nearest"] == "w3g128"
    assert "behaves like" in report["verdict"]


def test_another_model_is_called_out(world) -> None:
    with serve(world["other"], world["tokenizer"], "openai") as (url, _):
        report = _probe(world, url)
    assert report["different_model"] and report["overall"]["far"]
    assert report["verdict"].startswith("a different model")


def test_another_tokenizer_is_called_out(world) -> None:
    with serve(world["quantized"](None), world["tokenizer"], "llama", rename=lambda s: s.upper()) as (url, _):
        report = _probe(world, url, positions=16)
    assert report["tokenizer"]["differs"] and report["different_model"]
    assert report["verdict"].startswith("a different tokenizer")


def test_api_key_and_unreachable_server(world) -> None:
    with serve(world["quantized"](None), world["tokenizer"], "openai", api_key="s3cret") as (url, _):
        with pytest.raises(EndpointError, match="--api-key"):
            _probe(world, url)
        assert _probe(world, url, api_key="s3cret", positions=16)["overall"]["kl"] < 1e-9
    with pytest.raises(EndpointError, match="cannot reach"):
        _probe(world, url)  # that server has stopped
    with pytest.raises(EndpointError, match="not an http"):
        _probe(world, "localhost:1")


def test_cli_text_json_and_errors(world, capsys) -> None:
    from bitsmith.cli import main

    args = ["probe", "--reference", str(world["ref"]), "--positions", "16", "--topk", "10", "--ladder-method", "rtn"]
    for t in world["texts"]:
        args += ["--text", t]
    with serve(world["quantized"]("w3g128"), world["tokenizer"], "llama") as (url, _):
        assert main([*args[:1], url, *args[1:], "--json"]) == 0
        data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert data["overall"]["nearest"] == "w3g128" and set(data["domains"]) == {"t0", "t1"}
        assert main([*args[:1], url, *args[1:]]) == 0
        text = capsys.readouterr().out
        assert "verdict: behaves like" in text and "w2g64" in text
        with pytest.raises(SystemExit) as exc:
            main([*args[:1], url, *args[1:], "--mode", "echo"])
    assert exc.value.code == 1
    assert "does not return prompt log-probabilities" in capsys.readouterr().err
