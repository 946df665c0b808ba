"""Two HumanEval runs problem by problem: pass@1 on the problems both tested, and which one passed alone.

    python bench/humaneval_compare.py A.jsonl B.jsonl [--names A,B]

Each file is a run's per-problem record: the ``.jsonl`` that ``bench/humaneval_speed.py --out`` and
``bench/humaneval_server.py --out`` append to as problems are tested (complete or cut short), or their
final ``.json`` (its ``outcomes`` map). Prints what it counted; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def statuses(path: Path) -> dict[str, str]:
    """task_id -> status of one run's record."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return {r["task_id"]: r["status"] for r in map(json.loads, filter(None, text.splitlines()))}
    data = json.loads(text)
    rows = data.get("rows", [data])
    return dict(rows[-1]["outcomes"])


def compare(a: dict[str, str], b: dict[str, str]) -> dict:
    both = sorted(set(a) & set(b), key=lambda t: int(t.rsplit("/", 1)[-1]))
    only_a = [t for t in both if a[t] == "passed" != b[t]]
    only_b = [t for t in both if b[t] == "passed" != a[t]]
    return {"tested_a": len(a), "tested_b": len(b), "both": len(both),
            "passed_a": sum(a[t] == "passed" for t in both), "passed_b": sum(b[t] == "passed" for t in both),
            "only_a": only_a, "only_b": only_b}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--names", default="A,B", help="two labels for the runs")
    args = ap.parse_args()
    na, nb = args.names.split(",")
    c = compare(statuses(args.a), statuses(args.b))
    print(f"tested: {na} {c['tested_a']}, {nb} {c['tested_b']}; both {c['both']}")
    print(f"pass@1 on the {c['both']} problems both tested: {na} {c['passed_a']}, {nb} {c['passed_b']}")
    print(f"passed by {na} only: {len(c['only_a'])} {' '.join(c['only_a'])}")
    print(f"passed by {nb} only: {len(c['only_b'])} {' '.join(c['only_b'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
