"""The one GGUF header reader: agrees with gguf-py's reader on metadata (arrays included, so a
copied header is the same bytes) and raises one error type, naming the file, for every bad file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from bitsmith.io.gguf.header import GGUFArray, GGUFError, read_header  # noqa: E402
from bitsmith.io.gguf.metadata import copy_gguf_metadata  # noqa: E402


def _write(path: Path) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("llama.flag", True)
    w.add_token_list([b"a", b"b\xc3\xa9", b"<s>"])
    w.add_token_scores([0.5, -1.25, 3.0])
    w.add_array("llama.per_layer", [1, 2])
    w.add_tensor("blk.0.attn_q.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_header_matches_gguf_reader_with_and_without_arrays(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    _write(path)
    reader = gguf.GGUFReader(str(path))
    full = read_header(path, arrays=True)
    brief = read_header(path)
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        assert full.metadata[key] == fld.contents(), key
        assert full.value_types[key][0] == fld.types[0], key
        if isinstance(brief.metadata[key], GGUFArray):
            assert len(brief.metadata[key]) == len(fld.contents())
    assert brief.metadata["tokenizer.ggml.tokens"] == GGUFArray(8, 3)
    assert [(t.name, t.shape) for t in full.tensors] == [("blk.0.attn_q.weight", (2, 32))]


def test_copied_metadata_is_the_same_bytes(tmp_path: Path) -> None:
    src = tmp_path / "m.gguf"
    _write(src)
    copies = []
    for name in ("a", "b"):
        w = gguf.GGUFWriter(str(tmp_path / f"{name}.gguf"), "llama")
        if name == "a":
            copy_gguf_metadata(w, src)
        else:  # gguf-py's own reader, what the exporter used before
            reader = gguf.GGUFReader(str(src))
            for key, fld in reader.fields.items():
                if key.startswith(("GGUF.", "general.architecture")):
                    continue
                sub = gguf.GGUFValueType(fld.types[-1]) if fld.types[0] == gguf.GGUFValueType.ARRAY else None
                w.add_key_value(key, fld.contents(), gguf.GGUFValueType(fld.types[0]), sub_type=sub)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        copies.append((tmp_path / f"{name}.gguf").read_bytes())
    assert copies[0] == copies[1]


def test_bad_files_raise_gguf_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    _write(path)
    data = path.read_bytes()
    cases = {
        "cut.gguf": (data[:-40], r"cut.gguf is truncated \(header says .* of tensor data"),
        "head.gguf": (data[:60], "head.gguf is truncated .*header is cut short"),
        "magic.gguf": (b"GGML" + data[4:], "magic.gguf is not a GGUF file"),
        "version.gguf": (data[:4] + (9).to_bytes(4, "little") + data[8:], "version.gguf is GGUF version 9"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(GGUFError, match=message):
            read_header(tmp_path / name, arrays=name == "head.gguf")
