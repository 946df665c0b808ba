"""Property-based tests of the text parsers a user reaches from the command line: the quantization
spec (``--spec w4g128``), sizes (``--memory 24GB``) and budgets (``--budget 3.5bpw`` / ``900MB``).

Each parser either returns a value or raises the project's own error (SpecError for specs, ValueError
for sizes and budgets) -- never another exception -- and valid values survive a round trip through
their own spelling. Example counts are kept small so the file runs in a few seconds."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitsmith.plan.allocate import Budget
from bitsmith.plan.fit import parse_size
from bitsmith.spec import BITS_RANGE, GRID_BITS, GROUP_SIZES, QuantSpec, SpecError

# derandomize: the same examples on every run (tests stay deterministic; fuzz for novelty in bench/fuzz)
FAST = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# Text close to the grammar finds more than uniform noise: spec-like tokens, digits and unit letters.
SPEC_ALPHABET = st.sampled_from(list("wWgGsSnNfFiItT0123456789 \t\n.-+_") + ["\x00", "٤", "Ⅳ", "ｗ", "İ"])
SIZE_ALPHABET = st.sampled_from(list("0123456789.kKmMgGtTiIbBpPwW eE-+\t") + ["٤", "\x00", "½"])


@st.composite
def valid_specs(draw) -> QuantSpec:
    grid = draw(st.sampled_from(["uniform", "nf", "fit"]))
    bits = draw(st.sampled_from(list(GRID_BITS if grid != "uniform" else BITS_RANGE)))
    group = draw(st.sampled_from([None, *GROUP_SIZES]))
    symmetric = grid == "uniform" and draw(st.booleans())
    return QuantSpec(bits, group, symmetric, grid)


@FAST
@given(valid_specs(), st.sampled_from(["", " ", "\n", "\t "]), st.booleans())
def test_spec_round_trips_through_its_spelling(spec: QuantSpec, pad: str, upper: bool) -> None:
    text = str(spec)
    assert QuantSpec.parse(text) == spec
    assert QuantSpec.parse(pad + (text.upper() if upper else text) + pad) == spec  # case and spaces do not matter


@FAST
@given(st.one_of(st.text(SPEC_ALPHABET, max_size=12), st.text(max_size=12),
                 st.integers(0, 10**6).map(lambda n: f"w{n}"), st.integers(0, 10**6).map(lambda n: f"w4g{n}"),
                 st.integers(4000, 6000).map(lambda n: "w" + "9" * n)))
def test_any_text_parses_or_raises_spec_error(text: str) -> None:
    try:
        spec = QuantSpec.parse(text)
    except SpecError as exc:
        assert str(exc)  # the message is what the user sees
        return
    assert QuantSpec.parse(str(spec)) == spec  # whatever parses has a spelling that parses back


UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


@FAST
@given(st.integers(0, 10**6), st.sampled_from(sorted(UNITS)), st.sampled_from(["", " "]), st.booleans())
def test_size_of_whole_number_and_unit_is_exact(n: int, unit: str, space: str, lower: bool) -> None:
    text = f"{n}{space}{unit.lower() if lower else unit}"
    assert parse_size(text) == n * UNITS[unit]


@FAST
@given(st.one_of(st.text(SIZE_ALPHABET, max_size=14), st.text(max_size=10),
                 st.integers(300, 500).map(lambda n: "9" * n + "TB"),
                 st.floats(allow_nan=True, allow_infinity=True).map(lambda x: f"{x}GB")))
def test_any_text_is_a_size_or_a_value_error(text: str) -> None:
    try:
        size = parse_size(text)
    except ValueError as exc:
        assert "size" in str(exc)
        return
    assert isinstance(size, int) and size >= 0


@FAST
@given(st.floats(0.01, 64, allow_nan=False).map(lambda x: round(x, 3)))
def test_bits_per_weight_budget_round_trips(bpw: float) -> None:
    budget = Budget.parse(f"{bpw}bpw")
    assert budget.bits_per_weight == bpw and budget.total_bytes is None
    assert Budget.parse(str(budget)) == budget


@FAST
@given(st.integers(1, 10**15))
def test_byte_budget_round_trips(n: int) -> None:
    budget = Budget.parse(f"{n}B")
    assert budget.total_bytes == n and Budget.parse(str(budget)) == budget


@FAST
@given(st.one_of(st.text(SIZE_ALPHABET, max_size=14), st.text(max_size=10),
                 st.integers(300, 500).map(lambda n: "9" * n + "bpw"),
                 st.integers(300, 500).map(lambda n: "9" * n + "GB")))
def test_any_text_is_a_budget_or_a_value_error(text: str) -> None:
    try:
        budget = Budget.parse(text)
    except ValueError as exc:
        assert "budget" in str(exc)
        return
    if budget.bits_per_weight is not None:
        assert math.isfinite(budget.bits_per_weight) and budget.bits_per_weight > 0
    else:
        assert budget.total_bytes > 0
