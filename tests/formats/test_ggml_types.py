"""GGUF block types: bit-exact with gguf-py (and, when given one, with ggml's C quantizer), exact
round trips through gguf-py's dequantizer, error falling as bits rise, and clear edge-case errors."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from bitsmith.formats.ggml_types import GGML_TYPES, Family, decode, encode, get_type

ALL = list(GGML_TYPES)
QUANT = [n for n, t in GGML_TYPES.items() if t.family is not Family.FLOAT]
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
GGUF_PY_QUANTIZES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
IMPORTANCE_AWARE = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", *KQUANTS]


def _gaussian(seed: int, rows: int = 16, cols: int = 1024) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 3.0, (rows, 1))).astype(np.float32)


def _awkward(seed: int) -> np.ndarray:
    """Rows of exact .5 ties, equal-magnitude opposite-sign maxima, near-constant and sparse data.

    `+ 0.0` turns -0.0 into +0.0: gguf-py takes a block's min with numpy, which may pick -0.0
    where ggml's C scan keeps the first zero (see test_signed_zero_follows_c).
    """
    rng = np.random.default_rng(seed)
    halves = np.round(rng.standard_normal((4, 512)) * 16) / 2
    ties = rng.standard_normal((4, 512))
    ties[:, ::32], ties[:, 1::32] = 2.0, -2.0
    near_const = np.where(rng.random((4, 512)) < 0.05, 1.5, 1.0)
    sparse = rng.standard_normal((4, 512)) * (rng.random((4, 512)) < 0.1)
    return (np.concatenate([halves, ties, near_const, sparse]) + 0.0).astype(np.float32)


def _gguf_type(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name]


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def test_table_matches_gguf_constants() -> None:
    for name, t in GGML_TYPES.items():
        assert t.type_id == int(_gguf_type(name)), name
        assert (t.block_size, t.type_size) == GGML_QUANT_SIZES[_gguf_type(name)], name
    assert GGML_TYPES["Q4_K"].bits_per_weight == 4.5
    assert GGML_TYPES["Q8_0"].bits_per_weight == 8.5
    assert get_type("q6_k") is GGML_TYPES["Q6_K"]
    with pytest.raises(ValueError, match="unknown GGUF type 'Q7_K'; supported types: F32"):
        get_type("Q7_K")


@pytest.mark.parametrize("name", GGUF_PY_QUANTIZES)
def test_encode_bit_exact_with_gguf_py(name: str) -> None:
    for x in (_gaussian(1), _awkward(2), _gaussian(3, rows=3, cols=96) * np.float32(1e-30)):
        ours = encode(x, name)
        ref = quantize(x, _gguf_type(name))
        assert ours.dtype == np.uint8
        assert np.array_equal(ours, _bits(ref).reshape(ours.shape)), name


@pytest.mark.parametrize("name", ALL)
def test_decode_bit_exact_with_gguf_py_on_random_blocks(name: str) -> None:
    t = GGML_TYPES[name]
    rng = np.random.default_rng(t.type_id)
    blocks = rng.integers(0, 256, (64, t.type_size), dtype=np.uint8)
    if t.family is not Family.FLOAT:  # keep the fp16 scales finite: inf/NaN scales are not valid blocks
        for off in t.half_fields:
            scale = (rng.standard_normal(64) * 10.0 ** rng.uniform(-6, 3, 64)).astype(np.float16)
            blocks[:, off:off + 2] = scale.reshape(-1, 1).view(np.uint8)
    shape = (4, 16 * t.block_size)
    ours = decode(blocks.tobytes(), name, shape)
    ref = dequantize(blocks.reshape(4, -1), _gguf_type(name))
    assert ours.dtype == np.float32 and ours.shape == shape
    assert np.array_equal(ours.view(np.uint32), ref.reshape(shape).view(np.uint32)), name


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("weighted", [False, True])
def test_roundtrip_equals_gguf_dequantize(name: str, weighted: bool) -> None:
    x = np.concatenate([_gaussian(4, rows=8), _awkward(5)[:, :512].repeat(2, axis=1)])
    imp = np.random.default_rng(6).lognormal(0, 1, x.shape[1]).astype(np.float32) if weighted else None
    data = encode(x, name, imp)
    assert data.shape == (x.shape[0], GGML_TYPES[name].row_bytes(x.shape[1]))
    ours = decode(data, name, x.shape)
    ref = dequantize(data, _gguf_type(name))
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


def _sqnr_db(x: np.ndarray, y: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(x * x) / np.sum((x - y) ** 2)))


def test_error_falls_as_bits_rise() -> None:
    x = np.random.default_rng(7).standard_normal((32, 1024)).astype(np.float32)
    sqnr = {n: _sqnr_db(x, decode(encode(x, n), n, x.shape)) for n in KQUANTS}
    order = [sqnr[n] for n in KQUANTS]
    assert order == sorted(order), sqnr
    # Gaussian weights: each extra bit buys ~6 dB; floors well below llama.cpp's measured levels.
    floors = {"Q2_K": 9.5, "Q3_K": 15.5, "Q4_K": 22.0, "Q5_K": 28.0, "Q6_K": 34.0}
    assert all(sqnr[n] > floors[n] for n in KQUANTS), sqnr


def test_kquant_search_beats_plain_rounding_with_fewer_bits() -> None:
    # Q4_1/Q5_1 round with the block's min/max (plain asymmetric rounding) at 5.0/6.0 bits per
    # weight; the k-quant search at 4.5/5.5 bits must still have the lower error.
    x = np.random.default_rng(8).standard_normal((32, 1024)).astype(np.float32)
    mse = {n: float(np.mean((decode(encode(x, n), n, x.shape) - x) ** 2)) for n in ("Q4_K", "Q4_1", "Q5_K", "Q5_1")}
    assert mse["Q4_K"] < mse["Q4_1"] and mse["Q5_K"] < mse["Q5_1"], mse


@pytest.mark.parametrize("name", IMPORTANCE_AWARE)
def test_importance_lowers_weighted_error(name: str) -> None:
    rng = np.random.default_rng(9)
    x = rng.standard_normal((16, 1024)).astype(np.float32)
    imp = rng.lognormal(0, 1.5, 1024).astype(np.float32)

    def weighted_error(importance: np.ndarray | None) -> float:
        y = decode(encode(x, name, importance), name, x.shape)
        return float(np.sum(imp * (x - y) ** 2))

    plain, aware = weighted_error(None), weighted_error(imp)
    assert aware < 0.9 * plain, (plain, aware)


def test_importance_ignored_where_llama_cpp_ignores_it() -> None:
    x = _gaussian(10, rows=2, cols=256)
    imp = np.linspace(0, 5, 256, dtype=np.float32)
    for name in ("Q8_0", "F16", "BF16", "F32"):
        assert np.array_equal(encode(x, name, imp), encode(x, name))


@pytest.mark.parametrize("name", QUANT)
def test_zero_constant_and_tiny_blocks(name: str) -> None:
    cols = GGML_TYPES[name].block_size * 2
    zeros = np.zeros((2, cols), np.float32)
    assert np.all(decode(encode(zeros, name), name, zeros.shape) == 0)
    assert np.all(decode(encode(zeros, name, np.ones(cols, np.float32)), name, zeros.shape) == 0)
    const = np.full((2, cols), 0.37, np.float32)
    err = np.abs(decode(encode(const, name), name, const.shape) - const).max()
    assert err < 0.37 * 0.15, err  # a constant block is nearly exact (Q2_K's 2-bit grid is the coarsest)
    tiny = (np.random.default_rng(11).standard_normal((2, cols)) * 1e-30).astype(np.float32)
    y = decode(encode(tiny, name), name, tiny.shape)  # scales underflow fp16: decodes to ~zero, no error
    assert np.all(np.isfinite(y)) and np.abs(y).max() <= 1e-29


def test_signed_zero_follows_c() -> None:
    # ggml's C scan starts from +0.0 and keeps the first of tied extremes, so an all-zero Q4_0
    # block stores d = +0.0 / -8 = -0.0 whatever zeros it holds. gguf-py may differ only in
    # such zero signs; decoded values still compare equal.
    x = np.zeros((1, 64), np.float32)
    x[0, :32] = -0.0
    assert encode(x, "Q4_0")[0, :2].view(np.float16)[0] == 0
    assert np.signbit(encode(x, "Q4_0")[0, :2].view(np.float16)[0])
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        assert np.array_equal(decode(encode(x, name), name, x.shape), dequantize(quantize(x, _gguf_type(name)), _gguf_type(name)))


@pytest.mark.parametrize("name", QUANT + ["F16"])
def test_huge_weights_rejected(name: str) -> None:
    x = np.ones((1, max(64, GGML_TYPES[name].block_size * 2)), np.float32)
    x[0, 3] = 1e30
    with pytest.raises(ValueError, match=rf"1 {name} (block|value) overflows float16 .*largest \|weight\| there is 1e\+30"):
        encode(x, name)
    many = np.ones((300, 256), np.float32)
    many[::3, 7] = 1e30  # spread over several internal chunks: the count covers the whole tensor
    with pytest.raises(ValueError, match=r"^100 Q4_K blocks overflow float16"):
        encode(many, "Q4_K")
    big = encode(np.full((1, 32), 3e38, np.float32), "BF16")  # BF16 holds it (rounds to 3.0e38)
    assert np.isfinite(decode(big, "BF16", (1, 32))).all()


def test_row_length_errors() -> None:
    with pytest.raises(ValueError, match=r"^row length 576 is not a multiple of Q4_K's block of 256 weights; "
                                         r"use Q4_0/Q8_0 \(block 32\) for this tensor$"):
        encode(np.zeros((2, 576), np.float32), "Q4_K")
    with pytest.raises(ValueError, match="row length 33 is not a multiple of Q8_0's block of 32 weights; pad the rows"):
        encode(np.zeros((2, 33), np.float32), "Q8_0")
    with pytest.raises(ValueError, match="row length 576 is not a multiple of Q6_K"):
        decode(np.zeros(10, np.uint8), "Q6_K", (1, 576))


def test_non_finite_rejected_with_count() -> None:
    x = np.zeros((4, 256), np.float32)
    x[0, 0], x[1, 5], x[3, 9] = np.nan, np.inf, np.nan
    for name in ("Q4_K", "Q8_0", "F16"):
        with pytest.raises(ValueError, match=r"weights contain 3 non-finite values \(2 NaN, 1 inf\) out of 1024"):
            encode(x, name)


def test_bad_arguments() -> None:
    x = _gaussian(12, rows=2, cols=256)
    with pytest.raises(ValueError, match=r"one weight per input column, shape \(256,\); got \(128,\)"):
        encode(x, "Q4_K", np.ones(128, np.float32))
    with pytest.raises(ValueError, match="importance must be finite and >= 0"):
        encode(x, "Q4_K", -np.ones(256, np.float32))
    with pytest.raises(ValueError, match=r"Q4_K data for shape \(2, 256\) must be 288 bytes .* got 287"):
        decode(np.zeros(287, np.uint8), "Q4_K", (2, 256))
    with pytest.raises(ValueError, match="float array"):
        encode(np.array([["a"] * 32]), "Q8_0")


def test_any_leading_shape_and_empty() -> None:
    x = _gaussian(13, rows=6, cols=512).reshape(2, 3, 512)
    data = encode(x, "Q5_K")
    assert data.shape == (2, 3, 2 * 176)
    flat = encode(x.reshape(6, 512), "Q5_K")
    assert np.array_equal(data.reshape(6, -1), flat)
    assert np.array_equal(decode(data, "Q5_K", x.shape).reshape(6, 512), decode(flat, "Q5_K", (6, 512)))
    assert encode(x[0, 0], "Q8_0").shape == (16 * 34,)
    assert encode(np.zeros((0, 256), np.float32), "Q2_K").shape == (0, 84)
    assert decode(b"", "Q2_K", (0, 256)).shape == (0, 256)


# ---- optional: bit-exact against ggml's C quantizer (llama.cpp's ggml-quants.c) --------------
# Set BITSMITH_GGML_LIB to a libggml-base.so built without FMA contraction (GGML_NATIVE=OFF on
# x86-64), e.g. from github.com/ggml-org/ggml: cmake -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON.

GGML_LIB = os.environ.get("BITSMITH_GGML_LIB")


def _c_quantize(lib: ctypes.CDLL, x: np.ndarray, name: str, imp: np.ndarray | None) -> np.ndarray:
    t = GGML_TYPES[name]
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros((x.shape[0], t.row_bytes(x.shape[1])), np.uint8)
    imp_c = None if imp is None else np.ascontiguousarray(imp, np.float32)
    fn(t.type_id, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
       None if imp_c is None else imp_c.ctypes.data)
    return out


@pytest.mark.skipif(not GGML_LIB, reason="set BITSMITH_GGML_LIB to a libggml-base.so to compare with ggml's C code")
@pytest.mark.parametrize("name", QUANT)
def test_bit_exact_with_ggml_c(name: str) -> None:
    lib = ctypes.CDLL(GGML_LIB)
    rng = np.random.default_rng(14)
    x = np.concatenate([_gaussian(15, rows=8), _awkward(16).repeat(2, axis=1),
                        rng.standard_t(2, (8, 1024)).astype(np.float32)])
    x[-1, :40] = -0.0
    for imp in (None, rng.lognormal(0, 1, 1024).astype(np.float32), (rng.random(1024) < 0.7).astype(np.float32)):
        assert np.array_equal(encode(x, name, imp), _c_quantize(lib, x, name, imp)), (name, imp is not None)
