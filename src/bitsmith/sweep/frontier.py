"""Which variants are worth having: the size-vs-KLD Pareto frontier per domain, and the
recommendation (the smallest variant under a KLD limit on every domain that fits the memory).

Pure functions over plain result dicts (as :mod:`bitsmith.sweep.store` keeps them), so the logic is
tested without quantizing anything. A result dict holds ``name``, ``size_bytes``,
``bits_per_weight`` and ``domains`` ({domain: {"kld_mean": ...}}); a fit entry holds ``fits``
(bool) and ``need_gb``. Variants are ordered by ``tensor_bytes`` (the stored tensors alone, equal
for equal specs) when present, else by ``size_bytes``: two methods at one spec then tie on size and
the better KLD wins the tie."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["pareto_front", "frontier_per_domain", "Recommendation", "recommend", "worst_domain", "size_of"]


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the (name, size, kld) points no other point beats on both: sorted by size, a point is
    on the frontier when its KLD is strictly below every smaller (or equal-size, listed-before) one's."""
    front, best = [], float("inf")
    for name, _, kld in sorted(points, key=lambda p: (p[1], p[2])):
        if kld < best:
            front.append(name)
            best = kld
    return front


def frontier_per_domain(results: list[dict[str, Any]]) -> dict[str, list[str]]:
    """{domain: names on the size-vs-mean-KLD frontier, smallest first}."""
    domains = sorted({d for r in results for d in r["domains"]})
    return {d: pareto_front([(r["name"], size_of(r), r["domains"][d]["kld_mean"])
                             for r in results if d in r["domains"]]) for d in domains}


def size_of(result: dict[str, Any]) -> int:
    """The size variants are ordered by: tensor bytes when recorded, else the file size."""
    return int(result.get("tensor_bytes") or result["size_bytes"])


def worst_domain(result: dict[str, Any]) -> tuple[str, float]:
    """(domain, mean KLD) of the domain where ``result`` lost most."""
    return max(((d, m["kld_mean"]) for d, m in result["domains"].items()), key=lambda dk: dk[1])


@dataclass(frozen=True)
class Recommendation:
    name: str | None  # None: nothing qualifies
    reason: str  # one sentence


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _klds(result: dict[str, Any]) -> str:
    return ", ".join(f"{d} {m['kld_mean']:.3g}" for d, m in sorted(result["domains"].items()))


def recommend(results: list[dict[str, Any]], max_kld: float, fits: dict[str, dict[str, Any]] | None = None,
              memory: str | None = None) -> Recommendation:
    """The smallest variant whose mean KLD is at most ``max_kld`` on every domain and that fits
    ``memory`` (``fits[name]["fits"]``; without ``fits`` every variant fits), with the reason."""
    if not results:
        return Recommendation(None, "no variant finished, so there is nothing to recommend.")
    fits = fits or {}
    by_size = sorted(results, key=lambda r: (size_of(r), worst_domain(r)[1]))
    good = [r for r in by_size if worst_domain(r)[1] <= max_kld]
    fitting = [r for r in good if fits.get(r["name"], {}).get("fits", True)]
    where = f" and fits {memory}" if memory else ""
    if not good:
        closest = min(results, key=lambda r: worst_domain(r)[1])
        d, k = worst_domain(closest)
        return Recommendation(None, f"no variant keeps its mean KLD under {max_kld:g} on every domain: the closest, "
                                    f"{closest['name']}, reaches {k:.3g} on {d}; raise --max-kld or add wider specs.")
    if not fitting:
        small = good[0]
        need = fits.get(small["name"], {}).get("need_gb")
        return Recommendation(None, f"no variant under KLD {max_kld:g} fits {memory}: the smallest of them, "
                                    f"{small['name']}, needs {need:.2f} GB; add narrower specs or more memory.")
    best = fitting[0]
    reason = (f"{best['name']} is the smallest variant ({_mb(best['size_bytes'])}, {best['bits_per_weight']:.2f} "
              f"bits/weight) whose mean KLD stays under {max_kld:g} on every domain ({_klds(best)}){where}")
    smaller = [r for r in by_size if size_of(r) < size_of(best)]
    if smaller:  # the best of the next size down (two methods at one spec share a size)
        nxt = min((r for r in smaller if size_of(r) == size_of(smaller[-1])), key=lambda r: worst_domain(r)[1])
        d, k = worst_domain(nxt)
        why = f"exceeds it on {d} ({k:.3g})" if k > max_kld else f"does not fit {memory}"
        reason += f"; the next smaller, {nxt['name']}, {why}"
    return Recommendation(best["name"], reason + ".")
