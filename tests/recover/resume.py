"""Shared check of the distillation tests: a run stopped after block 0 of the block stage and resumed
against the same run uninterrupted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bitsmith.recover import DistillResult, distill


class _Stop(Exception):
    pass


def _stop_after_block_0(step: int, total: int, last: dict) -> None:
    if last.get("stage") == "block" and last["block"] == 0:
        raise _Stop


def resumed_and_whole(start, model, tmp_path: Path, cfg) -> tuple[DistillResult, DistillResult]:
    """(resumed, uninterrupted) runs of ``distill(start, model, ..., cfg)``; asserts their tensors are
    bit-identical, the callers compare what else they need (curves, block records)."""
    whole = distill(start, model, tmp_path / "whole", cfg)
    with pytest.raises(_Stop):
        distill(start, model, tmp_path / "part", cfg, progress=_stop_after_block_0)
    resumed = distill(start, model, tmp_path / "part", cfg, resume=True)
    a, b = load_file(str(whole.path / "model.safetensors")), load_file(str(resumed.path / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return resumed, whole
