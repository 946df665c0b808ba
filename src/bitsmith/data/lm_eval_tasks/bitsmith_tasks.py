"""Loaders for the local lm-evaluation-harness tasks shipped with bitsmith (the YAML files next to
this one name them with ``!function``): each reads its JSON-lines file from this folder, so the
tasks run offline, from any working directory. Built by bench/build_lm_eval_tasks.py from the
shipped Austen text (public domain)."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rows(name: str) -> list[dict]:
    with open(HERE / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _dataset(name: str) -> dict:
    import datasets

    return {"test": datasets.Dataset.from_list(_rows(name))}


def cloze_mc(**_: object) -> dict:
    return _dataset("bitsmith_cloze_mc.jsonl")


def cloze_gen(**_: object) -> dict:
    return _dataset("bitsmith_cloze_gen.jsonl")
