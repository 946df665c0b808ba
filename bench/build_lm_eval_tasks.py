"""Build the two local lm-evaluation-harness task sets shipped in src/bitsmith/data/lm_eval_tasks
from the project's own public-domain text (Austen, Pride and Prejudice, the shipped 60k slice):

- ``bitsmith_cloze_mc.jsonl``: multiple choice. A sentence with its last word removed; the true last
  word and three distractors (last words of other sentences), order shuffled with a fixed seed.
- ``bitsmith_cloze_gen.jsonl``: generation. Other sentences, the model writes the missing last word
  (scored by exact match on the first generated word).

Deterministic (seeded); rerun only to rebuild the files: python bench/build_lm_eval_tasks.py
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "src" / "bitsmith" / "data" / "pride_and_prejudice_60k.txt"
OUT = ROOT / "src" / "bitsmith" / "data" / "lm_eval_tasks"
N_MC, N_GEN = 80, 60


def sentences(text: str) -> list[tuple[str, str]]:
    """(sentence without its last word, last word) for narrative sentences of 10-40 words ending in
    a plain word of 4+ letters and a full stop."""
    flat = re.sub(r"\s+", " ", text.replace("_", ""))
    found = []
    for s in re.split(r"(?<=[.!?])\s+", flat):
        m = re.fullmatch(r"([A-Z][^\"]*?) ([a-z]{4,})\.", s)
        if m and 10 <= len(s.split()) <= 40:
            found.append((m[1], m[2]))
    return found


def main() -> None:
    rng = random.Random(21)
    items = sentences(TEXT.read_text(encoding="utf-8"))
    rng.shuffle(items)
    words = sorted({w for _, w in items})
    mc, gen = items[:N_MC], items[N_MC:N_MC + N_GEN]
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "bitsmith_cloze_mc.jsonl", "w", encoding="utf-8") as f:
        for context, word in mc:
            choices = rng.sample([w for w in words if w != word], 3) + [word]
            rng.shuffle(choices)
            f.write(json.dumps({"context": context, "choices": choices, "label": choices.index(word)}) + "\n")
    with open(OUT / "bitsmith_cloze_gen.jsonl", "w", encoding="utf-8") as f:
        for context, word in gen:
            f.write(json.dumps({"context": context, "answer": word}) + "\n")
    print(f"{len(items)} candidate sentences; wrote {len(mc)} multiple-choice and {len(gen)} generation items to {OUT}")


if __name__ == "__main__":
    main()
