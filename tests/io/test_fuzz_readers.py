"""Property-based tests of the readers that meet files from elsewhere: the safetensors header reader,
the checkpoint metadata reader, the GPTQ layout decoder and the GGUF header reader.

The property is the hardening issue's error boundary: whatever the bytes, a reader returns a value
or raises the project's own error for that reader (SafetensorsError, CheckpointError, GPTQError,
the GGUF reader's error), whose message names the file; never another exception and never a hang.
Inputs are small, and examples derandomized so the file stays fast and deterministic; the long,
coverage-guided runs live in ``bench/fuzz/`` and every crash they found is replayed here from
``bench/fuzz/regressions/`` so it stays fixed."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitsmith.formats.gptq_layout import GPTQ_BITS, GPTQError, GPTQFormat, from_gptq, to_gptq, unpack_columns
from bitsmith.io.checkpoint import REPORT_FILE, CheckpointError, read_info
from bitsmith.io.safetensors import SafetensorsError, read_header
from bitsmith.io.gguf.header import GGUFError
from bitsmith.io.gguf.header import read_header as read_gguf
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

FAST = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
# the repository root is the first folder above this file that holds bench/ (tests may move into subfolders)
REGRESSIONS = next(p / "bench" for p in Path(__file__).resolve().parents if (p / "bench").is_dir()) / "fuzz" / "regressions"


def in_folder(name: str, data: bytes, **more: bytes) -> tuple[tempfile.TemporaryDirectory, Path]:
    """A fresh folder holding ``name`` with ``data`` (and the ``more`` files): (the folder, the file)."""
    tmp = tempfile.TemporaryDirectory(prefix="bitsmith-fuzz-")
    for file, content in {name: data, **more}.items():
        (Path(tmp.name) / file).write_bytes(content)
    return tmp, Path(tmp.name) / name


def assert_own_error(exc: BaseException, allowed: tuple[type[Exception], ...], file: str) -> None:
    """The error is one of the reader's own and its message names the file it is about."""
    assert isinstance(exc, allowed), f"{type(exc).__name__} escaped the reader: {exc!r:.300}"
    assert file in str(exc), f"the message does not name {file}: {exc}"


# -- safetensors ---------------------------------------------------------------------------------


def safetensors_bytes(header: object, data: bytes = b"", n: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header, allow_nan=True).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def good_header() -> dict:
    return {"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "y": {"dtype": "U8", "shape": [3], "data_offsets": [16, 19]}, "__metadata__": {"format": "pt"}}


def read_safetensors(data: bytes) -> object:
    """read_header on the bytes as ``w.safetensors``: its value, or the reader's own error checked."""
    tmp, path = in_folder("w.safetensors", data)
    with tmp:
        try:
            return read_header(path)
        except Exception as exc:  # noqa: BLE001 -- sorting the reader's own error from escapes is the point
            assert_own_error(exc, (SafetensorsError,), "w.safetensors")
            return exc


# Values a fuzzed header puts where an integer, a list or a string belongs. Huge integers, floats
# and infinities are what json.loads and int() turn into OverflowError or silently into a different
# number; a string of 5,000 digits is past Python's int(str) limit.
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5), st.just("9" * 5000), st.lists(st.integers(-3, 2**65), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.just([[[[1]]]]))


@FAST
@given(st.binary(max_size=64))
def test_safetensors_random_bytes(data: bytes) -> None:
    read_safetensors(data)


@FAST
@given(st.binary(max_size=64), st.integers(0, 2**64 - 1))
def test_safetensors_random_header_after_length(body: bytes, n: int) -> None:
    read_safetensors(struct.pack("<Q", n) + b"{" + body)


@FAST
@given(st.sampled_from(["x", "y"]), st.sampled_from(["dtype", "shape", "data_offsets", None]), ODD_VALUES)
def test_safetensors_mutated_entry(tensor: str, field: str | None, value: object) -> None:
    header = good_header()
    if field is None:
        header[tensor] = value  # the whole entry replaced
    else:
        header[tensor][field] = value
    result = read_safetensors(safetensors_bytes(header, b"\0" * 19))
    if not isinstance(result, Exception):  # accepted: then it agrees with the file
        assert all(t.end <= result.size for t in result.tensors.values())


@FAST
@given(ODD_VALUES)
def test_safetensors_mutated_metadata(value: object) -> None:
    header = good_header()
    header["__metadata__"] = value
    read_safetensors(safetensors_bytes(header, b"\0" * 19))


@pytest.mark.parametrize("text", ['{"x": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 4]}}',
                                  '{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, -Infinity]}}',
                                  '{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, NaN]}}',
                                  '{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}}',
                                  '{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1' + "0" * 5000 + ']}}',
                                  '{"x": {"dtype": "F32", "shape": [' + "2," * 20000 + '2], "data_offsets": [0, 4]}}',
                                  '{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"a": 1}}',
                                  '{"x": {"dtype": 7, "shape": [1], "data_offsets": [0, 4]}}',
                                  '{"x": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}',
                                  '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}",
                                  '{"__metadata__": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}"],
                         ids=["inf shape", "-inf offset", "nan offset", "float offset", "5000-digit offset",
                              "20000 dims", "int metadata", "int dtype", "string shape", "deep list", "deep object"])
def test_safetensors_crafted_headers(text: str) -> None:
    """Headers the fuzzers reached, or that were read in the code: each is SafetensorsError."""
    result = read_safetensors(safetensors_bytes(text.encode(), b"\0" * 4))
    assert isinstance(result, SafetensorsError)
    assert len(str(result)) < 600  # one readable line, whatever the header held


# -- checkpoint metadata -------------------------------------------------------------------------


def checkpoint_shard(meta: dict[str, str]) -> bytes:
    header = {"l.qweight": {"dtype": "U8", "shape": [2, 16], "data_offsets": [0, 32]},
              "l.scale": {"dtype": "F16", "shape": [2, 1], "data_offsets": [32, 36]}, "__metadata__": meta}
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 36


def good_quantization() -> dict:
    return {"method": "rtn", "options": {}, "tensors": {"l": {"spec": "w4g32s", "shape": [2, 32]}}}


def read_checkpoint(shard: bytes, report: bytes | None = None) -> object:
    more = {} if report is None else {REPORT_FILE: report}
    tmp, path = in_folder("model.safetensors", shard, **more)
    with tmp:
        try:
            return read_info(path.parent)
        except Exception as exc:  # noqa: BLE001
            names = str(exc)
            assert isinstance(exc, (CheckpointError, SafetensorsError)), f"{type(exc).__name__}: {exc!r:.300}"
            assert "model.safetensors" in names or REPORT_FILE in names, names
            return exc


def test_checkpoint_good_metadata_reads() -> None:
    info = read_checkpoint(checkpoint_shard({"format": "bitsmith", "format_version": "1",
                                             "quantization": json.dumps(good_quantization())}), b'{"report": {"a": 1}}')
    assert info.specs == {"l": QuantSpec.parse("w4g32s")} and info.shapes == {"l": (2, 32)}
    assert info.report == {"a": 1}


@FAST
@given(st.sampled_from(["method", "options", "tensors", "spec", "shape", "layer", None]), ODD_VALUES)
def test_checkpoint_mutated_quantization(field: str | None, value: object) -> None:
    q = good_quantization()
    if field in ("spec", "shape"):
        q["tensors"]["l"][field] = value
    elif field == "layer":
        q["tensors"]["l"] = value
    elif field is not None:
        q[field] = value
    else:
        q = value
    read_checkpoint(checkpoint_shard({"format": "bitsmith", "format_version": "1", "quantization": json.dumps(q)}))


@FAST
@given(st.dictionaries(st.sampled_from(["format", "format_version", "quantization", "x"]),
                       st.one_of(st.sampled_from(["bitsmith", "1", "{", "[]", "null", '{"method": 1}']),
                                 st.text(max_size=8)), max_size=4),
       st.one_of(st.none(), st.binary(max_size=24), st.sampled_from([b"[]", b'{"report": 3}', b"{", b"\xff"])))
def test_checkpoint_fuzzed_metadata_and_report(meta: dict[str, str], report: bytes | None) -> None:
    read_checkpoint(checkpoint_shard(meta), report)


# -- GPTQ layout ---------------------------------------------------------------------------------


@st.composite
def quantized(draw) -> QuantizedTensor:
    bits = draw(st.sampled_from(GPTQ_BITS))
    out_features = draw(st.sampled_from([32, 64]))
    group = draw(st.sampled_from([None, 32]))
    in_features = 32 * draw(st.integers(1, 3))
    spec = QuantSpec(bits, group, draw(st.booleans()))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=g, dtype=torch.uint8)
    groups = spec.groups_per_row(in_features)
    scale = (torch.rand(out_features, groups, generator=g) + 0.1).half()
    zero = None if spec.symmetric else torch.randint(1, 2**bits, (out_features, groups), generator=g).half()
    return QuantizedTensor(codes, scale, zero, spec)


@settings(FAST, max_examples=40)
@given(quantized(), st.sampled_from(list(GPTQFormat)))
def test_gptq_valid_layers_round_trip(qt: QuantizedTensor, fmt: GPTQFormat) -> None:
    back = from_gptq(to_gptq(qt, fmt), qt.spec.bits, qt.spec.group_size or -1, qt.spec.symmetric, fmt)
    assert torch.equal(back.codes, qt.codes) and torch.equal(back.scale, qt.scale)
    assert torch.equal(back.dequantize(), qt.dequantize())


DTYPES = st.sampled_from([torch.int32, torch.int32, torch.int64, torch.uint8, torch.float16, torch.float32])
SHAPES = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)


@FAST
@given(SHAPES, DTYPES, st.integers(-1, 9))
def test_gptq_unpack_columns_any_tensor(shape: tuple[int, ...], dtype: torch.dtype, bits: int) -> None:
    words = torch.zeros(shape, dtype=dtype)
    try:
        codes = unpack_columns(words, bits)
    except GPTQError:
        return
    assert codes.shape == (shape[0], shape[1] * 32 // bits) and codes.dtype == torch.uint8


@FAST
@given(st.fixed_dictionaries({p: st.one_of(st.none(), st.tuples(SHAPES, DTYPES))
                              for p in ("qweight", "qzeros", "scales", "g_idx")}),
       st.sampled_from([2, 3, 4, 8, 5]), st.sampled_from([-1, 32, 8, 0, 7, -5]), st.booleans())
def test_gptq_from_gptq_wrong_shaped_tensors(parts: dict, bits: int, group: int, sym: bool) -> None:
    tensors = {k: torch.zeros(v[0], dtype=v[1]) for k, v in parts.items() if v is not None}
    try:
        qt = from_gptq(tensors, bits, group, sym)
    except GPTQError:
        return
    assert qt.codes.shape[0] == tensors["qweight"].shape[1]


@FAST
@given(quantized(), st.sampled_from(["qweight", "qzeros", "scales", "g_idx"]), st.sampled_from(["drop", "row", "col", "dtype", "flat"]))
def test_gptq_one_tensor_of_a_valid_layer_damaged(qt: QuantizedTensor, part: str, how: str) -> None:
    g = to_gptq(qt)
    tensors = {p: getattr(g, p) for p in ("qweight", "qzeros", "scales", "g_idx")}
    t = tensors[part]
    damaged = {"drop": None, "row": t[:-1], "col": t[..., :-1] if t.dim() > 1 else t[1:],
               "dtype": t.to(torch.float32 if not t.is_floating_point() else torch.int32), "flat": t.reshape(-1)}[how]
    if damaged is None:
        del tensors[part]
    else:
        tensors[part] = damaged
    try:
        from_gptq(tensors, qt.spec.bits, qt.spec.group_size or -1, qt.spec.symmetric)
    except GPTQError:
        return
    assert part == "g_idx" and how in ("drop", "flat")  # g_idx is optional, and already flat


# -- GGUF header ---------------------------------------------------------------------------------


def gguf_string(s: str | bytes, n: int | None = None) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw) if n is None else n) + raw


def gguf_file(*, n_tensors: int = 1, n_kv: int = 3, alignment: bytes = struct.pack("<II", 4, 32),
              vocab: bytes | None = None, dims: tuple[int, ...] = (4, 2), qtype: int = 0) -> bytes:
    """GGUF v3: an architecture string, an alignment value, a 2-string array, one F32 tensor; each
    part replaceable by a corrupt one."""
    kv = (gguf_string("general.architecture") + struct.pack("<I", 8) + gguf_string("llama")
          + gguf_string("general.alignment") + alignment
          + gguf_string("tokenizer.ggml.tokens")
          + (vocab if vocab is not None else struct.pack("<IIQ", 9, 8, 2) + gguf_string("a") + gguf_string("b")))
    tensor = gguf_string("t.weight") + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
    tensor += struct.pack("<IQ", qtype, 0)
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv + tensor
    head += b"\0" * (-len(head) % 32)
    return head + struct.pack("<8f", *range(8))


def read_gguf_bytes(data: bytes) -> object:
    tmp, path = in_folder("m.gguf", data)
    with tmp:
        try:
            header = read_gguf(path)
        except Exception as exc:  # noqa: BLE001
            assert_own_error(exc, (GGUFError,), "m.gguf")
            return exc
        read_gguf(path, arrays=True)  # the exporter's way (array items read): accepts the same files
        return header


def test_gguf_seed_reads() -> None:
    header = read_gguf_bytes(gguf_file())
    assert [t.name for t in header.tensors] == ["t.weight"] and header.metadata["general.alignment"] == 32


@FAST
@given(st.binary(max_size=96), st.sampled_from([2, 3]))
def test_gguf_random_bytes_after_magic_and_version(body: bytes, version: int) -> None:
    read_gguf_bytes(b"GGUF" + struct.pack("<I", version) + body)


@FAST
@given(st.integers(0, len(gguf_file()) - 1), st.binary(min_size=1, max_size=8))
def test_gguf_overwritten_bytes(at: int, patch: bytes) -> None:
    data = gguf_file()
    read_gguf_bytes(data[:at] + patch + data[at + len(patch):])


HUGE = st.sampled_from([2**63, 2**64 - 1, 2**32, 10**12, 1 << 40])


@FAST
@given(HUGE, st.sampled_from([0, 1, 8, 9, 12]))
def test_gguf_huge_array_and_string_lengths(n: int, item_type: int) -> None:
    read_gguf_bytes(gguf_file(vocab=struct.pack("<IIQ", 9, item_type, n) + gguf_string("a")))
    read_gguf_bytes(gguf_file(vocab=struct.pack("<IIQ", 9, 8, 2) + gguf_string("a", n)))
    read_gguf_bytes(gguf_file(vocab=struct.pack("<IIQ", 9, 8, 1) + gguf_string("a") + struct.pack("<Q", n)))


@FAST
@given(st.integers(13, 2**32 - 1), st.booleans())
def test_gguf_unknown_value_types(vtype: int, in_array: bool) -> None:
    kv = struct.pack("<IIQ", 9, vtype, 1) if in_array else struct.pack("<I", vtype)
    read_gguf_bytes(gguf_file(vocab=kv + b"\0" * 16))


@FAST
@given(st.sampled_from([(4, 0), (5, 0), (10, 0), (11, -1), (6, 0.0), (6, float("inf")), (12, float("nan")),
                        (7, 1), (8, "x"), (0, 3), (5, -32)]))
def test_gguf_odd_alignments(value: tuple[int, object]) -> None:
    vtype, v = value
    fmt = {4: "<I", 5: "<i", 10: "<Q", 11: "<q", 6: "<f", 12: "<d", 7: "<?", 0: "<B"}.get(vtype)
    raw = gguf_string(v) if vtype == 8 else struct.pack(fmt, v)
    result = read_gguf_bytes(gguf_file(alignment=struct.pack("<I", vtype) + raw))
    assert isinstance(result, Exception) or result.tensors[0].offset % 32 == 0


@FAST
@given(st.integers(2, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_gguf_counts_beyond_the_file(n_tensors: int, n_kv: int) -> None:
    read_gguf_bytes(gguf_file(n_tensors=n_tensors))
    read_gguf_bytes(gguf_file(n_kv=max(n_kv, 4)))


@pytest.mark.parametrize("depth", [2, 9, 5000])
def test_gguf_nested_arrays(depth: int) -> None:
    """Arrays of arrays: a few levels read, thousands (12 bytes each) a GGUFError, not a RecursionError."""
    nested = struct.pack("<IQ", 9, 1) * depth + struct.pack("<IQ", 0, 0)
    result = read_gguf_bytes(gguf_file(vocab=struct.pack("<I", 9) + nested))
    assert isinstance(result, GGUFError) == (depth > 8)


@FAST
@given(st.lists(st.integers(0, 2**64 - 1), max_size=6).map(tuple), st.integers(0, 2**32 - 1))
def test_gguf_odd_tensor_entries(dims: tuple[int, ...], qtype: int) -> None:
    read_gguf_bytes(gguf_file(dims=dims, qtype=qtype))


# -- the crashes the long runs found, replayed ---------------------------------------------------


def regression_inputs() -> list[Path]:
    return sorted(p for p in REGRESSIONS.iterdir() if p.is_file()) if REGRESSIONS.is_dir() else []


@pytest.mark.parametrize("path", regression_inputs(), ids=lambda p: p.name)
def test_fuzz_regressions_stay_fixed(path: Path) -> None:
    target = path.name.split("-")[0]  # files are named <target>-<exception>-<file>-<line>-<sha1>
    if target in ("safetensors", "checkpoint"):  # a checkpoint input is a shard: both readers take it
        read_safetensors(path.read_bytes())  # each reader asserts: a value or its own error, naming the file
        read_checkpoint(path.read_bytes())
    elif target == "gguf":
        read_gguf_bytes(path.read_bytes())
    else:
        pytest.fail(f"{path.name}: no reader for target {target!r}")
