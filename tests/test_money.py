"""drip.money: parsing human amounts into atomic units and formatting them back."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drip.errors import InvalidAmount, InvalidRequest
from drip.money import (
    AMOUNT_ATOMIC_MAX,
    USDC,
    Asset,
    atomic,
    check_atomic,
    format_amount,
    format_plain,
    parse_amount,
    to_decimal,
)

# --- parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.007", 7_000),
        ("0.000001", 1),
        ("1", 1_000_000),
        ("1.5", 1_500_000),
        ("1.", 1_000_000),
        (".5", 500_000),
        ("+2", 2_000_000),
        ("0", 0),
        ("0.000000", 0),
        ("1_000", 1_000_000_000),
        ("1_000.000_001", 1_000_000_001),
        ("  2.25\n", 2_250_000),
        ("\t3 ", 3_000_000),
        ("1e2", 100_000_000),
        ("1E-6", 1),
        ("9223372036854.775807", AMOUNT_ATOMIC_MAX),
        (Decimal("0.007"), 7_000),
        (Decimal("1.500000"), 1_500_000),
        (Decimal("5E+3"), 5_000_000_000),
        (Decimal("0.0070000000"), 7_000),  # trailing zeros are not extra precision
        (5, 5_000_000),  # an int is whole dollars
        (0, 0),
        (0.007, 7_000),  # a float goes through str(): read as written
        (0.1, 100_000),
        (2.5, 2_500_000),
        (1e-06, 1),
    ],
)
def test_parse_amount_accepts(value: object, expected: int) -> None:
    result = parse_amount(value)
    assert result == expected
    assert type(result) is int


def test_float_is_read_as_written_not_as_its_binary_value() -> None:
    # Decimal(0.007) is 0.00700000000000000014571677198205...; str(0.007) is "0.007"
    assert Decimal.from_float(0.007) != Decimal("0.007")
    assert parse_amount(0.007) == parse_amount("0.007") == parse_amount(Decimal("0.007"))


def test_negative_allowed_only_on_request() -> None:
    assert parse_amount("-1", allow_negative=True) == -1_000_000
    assert parse_amount("-0.007", allow_negative=True) == -7_000
    assert parse_amount(-3, allow_negative=True) == -3_000_000
    assert parse_amount(Decimal("-0.5"), allow_negative=True) == -500_000


def test_zero_refused_when_not_allowed() -> None:
    for zero in ("0", "0.000", 0, Decimal("0"), 0.0, "-0"):
        with pytest.raises(InvalidAmount):
            parse_amount(zero, allow_zero=False)
    assert parse_amount("0.000001", allow_zero=False) == 1


@pytest.mark.parametrize(
    "value",
    [
        "-1",
        "-0.000001",
        -1,
        Decimal("-1"),
        -0.5,
        "1e400",
        "1e9999",
        "1e99999",  # exponent longer than the grammar allows
        "0.0000001",
        "1.0000001",
        "1e-7",
        Decimal("0.0000001"),
        1e-07,
        0.1 + 0.2,  # 0.30000000000000004: more precision than USDC has
        "_0.5_",  # an underscore only ever between two digits
        "1__0",
        "1_.5",
        float("nan"),
        float("inf"),
        float("-inf"),
        Decimal("NaN"),
        Decimal("sNaN"),
        Decimal("Infinity"),
        Decimal("-Infinity"),
        True,
        False,
        None,
        "abc",
        "",
        "   ",
        "1 000",
        "1,5",
        "0x10",
        "1.2.3",
        "--1",
        "1e",
        "e5",
        "inf",
        "nan",
        "Infinity",
        "\u0665",  # ARABIC-INDIC DIGIT FIVE: a digit, but not one an amount is written in
        "\uff15.5",  # FULLWIDTH DIGIT FIVE
        "1\u0660",
        "1" * 65,  # longer than any amount the ledger can hold
        "0." + "0" * 70 + "1",
        "9" * 60,  # fits the length limit, far outside the range
        "9223372036854.775808",  # one atomic unit past the ledger's range
        10**13,  # whole dollars beyond the range
        1e300,
        [1],
        {"amount": 1},
        b"1",
        object(),
    ],
    ids=repr,
)
def test_parse_amount_rejects(value: object) -> None:
    with pytest.raises(InvalidAmount) as info:
        parse_amount(value)
    # InvalidAmount is a bad-request error with the field name attached
    assert isinstance(info.value, InvalidRequest)
    assert info.value.param == "amount"
    assert info.value.code == "invalid_amount"


@pytest.mark.parametrize(
    "value",
    [Decimal("1e999999"), Decimal("9.99e999998"), Decimal("1e500000")],
    ids=str,
)
def test_parse_amount_rejects_huge_decimal_exponents(value: Decimal) -> None:
    """A Decimal near the context's Emax must be refused as InvalidAmount, not leak a
    ``decimal.Overflow`` (an ArithmeticError the API edge would turn into a 500)."""
    with pytest.raises(InvalidAmount):
        parse_amount(value)


@pytest.mark.parametrize(
    "value",
    [
        "1.00000000000000000000000000001",  # 30 significant digits
        "0.99999999999999999999999999999",  # would round *up* to 1.000000
        "1234567.0000000000000000000000001",
        "0.0000010000000000000000000000000001",
        Decimal("1.00000000000000000000000000001"),
    ],
)
def test_excess_precision_is_refused_not_rounded(value: object) -> None:
    """More decimals than the asset has is an error, however many significant digits the
    input carries: it must never be rounded (Decimal's default context keeps only 28
    digits) into an amount the caller did not write."""
    with pytest.raises(InvalidAmount):
        parse_amount(value)


def test_param_name_is_reported() -> None:
    with pytest.raises(InvalidAmount) as info:
        parse_amount("abc", param="initial_balance")
    assert info.value.param == "initial_balance"
    assert info.value.to_dict()["error"]["param"] == "initial_balance"


def test_too_long_string_message_is_truncated() -> None:
    with pytest.raises(InvalidAmount) as info:
        parse_amount("x" * 10_000)
    assert len(str(info.value)) < 200


def test_other_assets_use_their_own_decimals() -> None:
    eth_like = Asset("WEI18", 18)
    cents = Asset("CENT", 2)
    assert parse_amount("1", eth_like) == 10**18
    assert parse_amount("0.01", cents) == 1
    with pytest.raises(InvalidAmount):
        parse_amount("0.001", cents)
    assert format_amount(1, cents) == "0.01"
    assert format_plain(150, cents) == "1.5"


# --- atomic ints ---------------------------------------------------------------------


def test_check_atomic() -> None:
    assert check_atomic(0) == 0
    assert check_atomic(AMOUNT_ATOMIC_MAX) == AMOUNT_ATOMIC_MAX
    assert atomic(7_000) == 7_000
    assert check_atomic(-5, allow_negative=True) == -5
    for bad in (-1, AMOUNT_ATOMIC_MAX + 1, 1.0, 0.5, True, False, "1", Decimal(1), None):
        with pytest.raises(InvalidAmount):
            check_atomic(bad)
    with pytest.raises(InvalidAmount):
        check_atomic(0, allow_zero=False)
    with pytest.raises(InvalidAmount):
        check_atomic(-(AMOUNT_ATOMIC_MAX + 1), allow_negative=True)


# --- formatting ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("units", "amount", "plain"),
    [
        (0, "0.000000", "0"),
        (1, "0.000001", "0.000001"),
        (7_000, "0.007000", "0.007"),
        (100_000, "0.100000", "0.1"),
        (1_000_000, "1.000000", "1"),
        (1_500_000, "1.500000", "1.5"),
        (10_000_000, "10.000000", "10"),
        (1_000_000_001, "1000.000001", "1000.000001"),
        (-1, "-0.000001", "-0.000001"),
        (-1_500_000, "-1.500000", "-1.5"),
        (-2_000_000, "-2.000000", "-2"),
        (AMOUNT_ATOMIC_MAX, "9223372036854.775807", "9223372036854.775807"),
    ],
)
def test_format(units: int, amount: str, plain: str) -> None:
    assert format_amount(units) == amount
    assert format_plain(units) == plain
    assert to_decimal(units) == Decimal(amount)
    # and back again
    assert parse_amount(amount, allow_negative=True) == units
    assert parse_amount(plain, allow_negative=True) == units
    assert parse_amount(to_decimal(units), allow_negative=True) == units


def test_format_with_symbol() -> None:
    assert format_amount(1_500_000, symbol=True) == "1.500000 USDC"
    assert format_amount(0, USDC, symbol=True) == "0.000000 USDC"


def test_to_decimal_is_exact() -> None:
    assert to_decimal(7_000) == Decimal("0.007")
    assert to_decimal(1) == Decimal("0.000001")
    assert str(to_decimal(1_500_000)) == "1.500000"


atomic_ints = st.integers(min_value=-AMOUNT_ATOMIC_MAX, max_value=AMOUNT_ATOMIC_MAX)


@given(atomic_ints)
def test_format_plain_round_trips(units: int) -> None:
    text = format_plain(units)
    assert parse_amount(text, allow_negative=True) == units
    # shortest form: no trailing zeros after the point, no bare point
    assert not text.endswith(".")
    if "." in text:
        assert not text.endswith("0")


@given(atomic_ints)
def test_format_amount_round_trips(units: int) -> None:
    text = format_amount(units)
    assert len(text.split(".")[1]) == USDC.decimals
    assert parse_amount(text, allow_negative=True) == units
    assert parse_amount(to_decimal(units), allow_negative=True) == units
    assert Decimal(format_plain(units)) == to_decimal(units)


@given(st.integers(min_value=0, max_value=AMOUNT_ATOMIC_MAX))
def test_float_path_matches_string_path(units: int) -> None:
    """A float is read through str(): whenever a float prints as the plain decimal, it
    parses to the same atomic amount as that decimal string."""
    text = format_plain(units)
    as_float = float(text)
    if repr(as_float) in (text, text + ".0"):
        assert parse_amount(as_float) == units


@given(st.decimals(allow_nan=False, allow_infinity=False, places=6,
                   min_value=Decimal(-10**9), max_value=Decimal(10**9)))  # fmt: skip
def test_parse_decimal_matches_string(value: Decimal) -> None:
    expected = int(value.scaleb(6))
    assert parse_amount(value, allow_negative=True) == expected
    assert parse_amount(str(value), allow_negative=True) == expected
