"""Checkpoint format versions: a layer that a version-1 reader would load silently wrong (rotated
codes, vector codebooks) puts its shard at version 2, which older bitsmith refuses with "upgrade";
plain checkpoints stay version 1, so older bitsmith keeps reading them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.tiny import make_tiny_model

from bitsmith.io.checkpoint import READABLE_VERSIONS, CheckpointError, read_info, shard_version
from bitsmith.io.safetensors import read_header, shard_files


def test_shard_version_marks_only_what_v1_misreads() -> None:
    assert shard_version({"a": {"spec": "w4g128", "shape": [8, 8]}}) == "1"
    assert shard_version({"a": {"spec": "w4g128", "shape": [8, 8]}, "b": {"spec": "w3g32", "shape": [8, 32], "rotate": {"block": 32}}}) == "2"
    assert shard_version({"a": {"spec": "w2g64vq", "shape": [8, 64]}}) == "2"
    assert shard_version({}) == "1"


def test_inspect_reads_the_same_versions() -> None:
    from bitsmith.io import inspect

    assert tuple(inspect._BITSMITH_VERSIONS) == READABLE_VERSIONS  # noqa: SLF001 (the torch-free copy)


def _versions(folder: Path) -> set[str]:
    return {read_header(p).metadata["format_version"] for p in shard_files(folder)}


@pytest.mark.parametrize("rotate", [False, True])
def test_written_version_follows_the_layers(tmp_path: Path, rotate: bool) -> None:
    import bitsmith

    tiny = make_tiny_model(tmp_path / "tiny", "llama")
    out = tmp_path / "q"
    bitsmith.quantize(tiny, out, "w4g32", "rtn", options={"rotate": True, "rotate_seed": 1} if rotate else {})
    assert _versions(out) == ({"2"} if rotate else {"1"})
    assert json.loads((out / "bitsmith.json").read_text())["format_version"] == ("2" if rotate else "1")
    assert read_info(out).format_version == ("2" if rotate else "1")


def test_unknown_version_is_refused_with_upgrade(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    import bitsmith

    tiny = make_tiny_model(tmp_path / "tiny", "llama")
    out = tmp_path / "q"
    bitsmith.quantize(tiny, out, "w4g32", "rtn")
    shard = shard_files(out)[0]
    meta = dict(read_header(shard).metadata, format_version="3")
    save_file(load_file(str(shard)), str(shard), metadata=meta)
    with pytest.raises(CheckpointError, match="upgrade bitsmith"):
        read_info(out)
