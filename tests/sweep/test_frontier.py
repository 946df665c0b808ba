"""The sweep's selection logic (Pareto frontier, recommendation) against brute-force oracles."""

import random

import pytest

from bitsmith.sweep.frontier import frontier_per_domain, pareto_front, recommend


def _dominated(p, points):
    """Oracle: another point is no larger and no worse, and strictly better on one of the two, or
    identical and listed earlier in (size, kld) order."""
    _, size, kld = p
    return any((s <= size and k <= kld and (s < size or k < kld)) for _, s, k in points)


@pytest.mark.parametrize("seed", range(20))
def test_pareto_front_matches_the_oracle_on_random_points(seed):
    rng = random.Random(seed)
    # few distinct sizes and KLDs, so ties are common
    points = [(f"v{i}", rng.choice([10, 20, 30, 40]), rng.choice([0.1, 0.2, 0.5, 1.0])) for i in range(rng.randint(1, 12))]
    front = pareto_front(points)
    undominated = {(s, k) for n, s, k in points if not _dominated((n, s, k), points)}
    assert {(s, k) for n, s, k in points if n in front} == undominated  # every undominated value, once
    assert len(front) == len(undominated)
    sizes = [next(s for n, s, _ in points if n == name) for name in front]
    klds = [next(k for n, _, k in points if n == name) for name in front]
    assert sizes == sorted(sizes) and klds == sorted(klds, reverse=True)


def _result(name, size, klds, bpw=4.0, tensor_bytes=None):
    r = {"name": name, "size_bytes": size, "bits_per_weight": bpw, "domains": {d: {"kld_mean": k} for d, k in klds.items()}}
    if tensor_bytes is not None:
        r["tensor_bytes"] = tensor_bytes
    return r


RESULTS = [
    _result("w8-rtn", 800, {"prose": 0.002, "code": 0.003}, 8.0),
    _result("w4g128-hqq", 450, {"prose": 0.08, "code": 0.12}, 4.25),
    _result("w4g128-gptq", 450, {"prose": 0.05, "code": 0.07}, 4.25),
    _result("w3g128-gptq", 350, {"prose": 0.2, "code": 0.09}, 3.25),
]


def test_recommend_picks_the_smallest_variant_under_the_limit_on_every_domain():
    rec = recommend(RESULTS, max_kld=0.1)
    assert rec.name == "w4g128-gptq"  # w3g128 is smaller but fails prose; hqq ties on size but fails code
    assert "w3g128-gptq" in rec.reason and "prose (0.2)" in rec.reason
    assert rec.reason.count(".") >= 1 and "\n" not in rec.reason


def test_the_next_smaller_named_is_the_best_method_at_that_size():
    results = RESULTS + [_result("w3g128-rtn", 350, {"prose": 0.9, "code": 0.9}, 3.25)]
    rec = recommend(results, max_kld=0.1)
    assert rec.name == "w4g128-gptq" and "w3g128-gptq" in rec.reason and "w3g128-rtn" not in rec.reason


def test_recommend_respects_memory_fit():
    fits = {"w8-rtn": {"fits": True, "need_gb": 1.0}, "w4g128-gptq": {"fits": False, "need_gb": 30.0},
            "w4g128-hqq": {"fits": False, "need_gb": 30.0}, "w3g128-gptq": {"fits": True, "need_gb": 0.5}}
    assert recommend(RESULTS, 0.1, fits, "24GB").name == "w8-rtn"
    assert recommend(RESULTS, 0.25, fits, "24GB").name == "w3g128-gptq"
    none = recommend(RESULTS, 0.1, {n: {"fits": False, "need_gb": 99.0} for n in fits}, "1GB")
    assert none.name is None and "1GB" in none.reason and "w4g128-gptq" in none.reason


def test_recommend_says_what_is_closest_when_nothing_qualifies():
    rec = recommend(RESULTS, max_kld=0.001)
    assert rec.name is None and "w8-rtn" in rec.reason and "0.003" in rec.reason
    assert recommend([], 0.1).name is None


def test_tensor_bytes_order_variants_when_file_sizes_differ_only_by_metadata():
    a = _result("w2-hqq", 1000, {"p": 0.5}, tensor_bytes=900)  # smaller file, same tensors, worse
    b = _result("w2-rtn", 1003, {"p": 0.3}, tensor_bytes=900)
    assert frontier_per_domain([a, b]) == {"p": ["w2-rtn"]}
    assert frontier_per_domain([_result("x", 1000, {"p": 0.5}), _result("y", 1003, {"p": 0.3})]) == {"p": ["x", "y"]}
