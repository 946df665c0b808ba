"""The one safetensors reader (bitsmith.io.safetensors): every malformed-file case that either of
the two former readers (model sources, inspect) refused raises SafetensorsError naming the file, and
model sources / inspect re-raise it as their own error type with the same message."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from bitsmith.io.inspect import InspectError, inspect_path
from bitsmith.io.safetensors import (INDEX_FILE, MAX_HEADER, SafetensorsError, StTensor, read_header, read_small,
                                     shard_files)
from bitsmith.models.sources import ModelSourceError, SafetensorsStore


def _raw(header: object, data: bytes = b"", n: int | None = None) -> bytes:
    """A safetensors file's bytes: length prefix (``n`` overrides it), JSON header, data."""
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def _good(data_bytes: int = 16) -> dict:
    return {"a": {"dtype": "F32", "shape": [data_bytes // 4], "data_offsets": [0, data_bytes]},
            "__metadata__": {"format": "pt"}}


# (case, file bytes, what the message says); the cases of both former readers, plus the new checks
BAD_FILES = [
    ("empty file", b"", r"w\.safetensors is truncated \(0 bytes\); download it again"),
    ("cut inside the length prefix", b"\x10\x00\x00", r"w\.safetensors is truncated \(3 bytes\)"),
    ("header length below 2", _raw(b"{", n=1), "w.safetensors is not a safetensors file"),
    ("header length above the limit", _raw({}, n=MAX_HEADER + 1), "w.safetensors is not a safetensors file"),
    ("cut inside the header", _raw(_good())[:20], r"w\.safetensors is truncated \(its header alone says"),
    ("header is not JSON", _raw(b"{not json}"), "w.safetensors has a corrupt safetensors header"),
    ("header is not UTF-8", _raw(b"{\xff\xfe}"), "w.safetensors has a corrupt safetensors header"),
    ("header is a JSON list", _raw([1, 2]), r"corrupt safetensors header \(not a JSON object\)"),
    ("__metadata__ is a list", _raw({"__metadata__": [1]}), r"__metadata__ is not a JSON object"),
    ("entry without data_offsets", _raw({"a": {"dtype": "F32", "shape": [4]}}), "tensor 'a' is malformed"),
    ("entry with text offsets", _raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": ["x", 4]}}, b"\0" * 4),
     "tensor 'a' is malformed"),
    ("entry that is a number", _raw({"a": 7}), "tensor 'a' is malformed"),
    ("offsets in reverse", _raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4),
     "tensor 'a' is malformed"),
    ("negative dimension", _raw({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "tensor 'a' is malformed"),
    ("bytes that do not fit the shape", _raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
     r"tensor 'a' is malformed .*F32 \[2\] does not fill data_offsets \[0, 4\]"),
    ("a gap between tensors", _raw({"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, b"\0" * 4),
     r"the data of tensor 'a' starts at byte 2, expected 0"),
    ("overlapping tensors", _raw({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                                  "b": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, b"\0" * 4),
     r"the data of tensor 'a' starts at byte 0, expected 2|the data of tensor 'b' starts at byte 2, expected 4"),
    ("bytes after the last tensor", _raw(_good(), b"\0" * 20), "w.safetensors has 4 bytes after its last tensor"),
    ("data cut short", _raw(_good(2_000_000), b"\0" * 1_000_000),
     r"w\.safetensors is truncated \(header says 2\.0 MB of data, file has 1\.0 MB\); download it again"),
]


@pytest.mark.parametrize("case, data, message", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_every_bad_file_raises_the_one_error(tmp_path: Path, case: str, data: bytes, message: str) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    with pytest.raises(SafetensorsError, match=message):
        read_header(path)
    # model sources and inspect report the same message in their own error types
    with pytest.raises(ModelSourceError, match=message) as err:
        SafetensorsStore(tmp_path)
    assert isinstance(err.value.__cause__, SafetensorsError)
    with pytest.raises(InspectError, match=message):
        inspect_path(tmp_path)


def test_good_header(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(_raw(_good(), b"\0" * 16))
    header = read_header(path)
    assert header.metadata == {"format": "pt"} and header.size == path.stat().st_size
    t = header.tensors["a"]
    assert (t.dtype, t.shape, t.nbytes, t.numel) == ("F32", (4,), 16, 4)
    assert t.end == header.size  # offsets are absolute: the data ends the file


def test_read_small_refusals(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\0" * 8)
    with pytest.raises(SafetensorsError, match="w.safetensors: cannot read tensor a of dtype F8_E4M3 as numbers"):
        read_small(StTensor(path, "a", "F8_E4M3", (4,), 0, 4))
    with pytest.raises(SafetensorsError, match="w.safetensors: tensor a is .* MB, larger than inspect reads"):
        read_small(StTensor(path, "a", "U8", (2**27,), 0, 2**27))


BAD_INDEXES = [
    ("index is not JSON", "{oops", "is not a valid safetensors index"),
    ("index has no weight_map", json.dumps({"metadata": {}}), "is not a valid safetensors index"),
    ("weight_map is a list", json.dumps({"weight_map": ["a.safetensors"]}), "is not a valid safetensors index"),
    ("weight_map names a number", json.dumps({"weight_map": {"a": 3}}), "is not a valid safetensors index"),
    ("a listed shard is missing", json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}}),
     f"{INDEX_FILE} lists model-00002-of-00002.safetensors but it is missing from"),
]


@pytest.mark.parametrize("case, index, message", BAD_INDEXES, ids=[c[0] for c in BAD_INDEXES])
def test_every_bad_index_raises_the_one_error(tmp_path: Path, case: str, index: str, message: str) -> None:
    (tmp_path / INDEX_FILE).write_text(index)
    with pytest.raises(SafetensorsError, match=message):
        shard_files(tmp_path)
    with pytest.raises(ModelSourceError, match=message):
        SafetensorsStore(tmp_path)
    with pytest.raises(InspectError, match=message):
        inspect_path(tmp_path)


def test_shard_files(tmp_path: Path) -> None:
    for name in ("b.safetensors", "a.safetensors", "weights.bin"):
        (tmp_path / name).write_bytes(_raw(_good(), b"\0" * 16))
    assert shard_files(tmp_path) == [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    # inspect also reads a file whose contents are safetensors whatever its name
    assert shard_files(tmp_path, sniff=True) == [tmp_path / n for n in ("a.safetensors", "b.safetensors", "weights.bin")]
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"x": "b.safetensors", "y": "b.safetensors"}}))
    assert shard_files(tmp_path) == shard_files(tmp_path, sniff=True) == [tmp_path / "b.safetensors"]


def test_checkpoint_and_gptq_readers_raise_the_one_error(tmp_path: Path) -> None:
    """read_info (which used safe_open) and the GPTQ importer read shards through the same reader."""
    import torch

    from bitsmith.io.checkpoint import CheckpointWriter, read_info
    from bitsmith.io.import_gptq import load_gptq_folder

    with CheckpointWriter(tmp_path / "ck", "rtn", {}) as writer:
        writer.add_tensor("model.norm.weight", torch.ones(4096))
        folder = writer.finish()
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(SafetensorsError, match=r"model\.safetensors is truncated \(header says"):
        read_info(folder)
    (tmp_path / "gptq").mkdir()
    (tmp_path / "gptq" / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    (tmp_path / "gptq" / INDEX_FILE).write_text(json.dumps({"weight_map": {"a.qweight": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(SafetensorsError, match="lists model-00001-of-00001.safetensors but it is missing"):
        load_gptq_folder(tmp_path / "gptq")
