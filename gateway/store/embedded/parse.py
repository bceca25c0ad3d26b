"""Numbers as Redis reads and writes them: `string2ll`, `strtod`/`string2d`, "%.17g"."""

from __future__ import annotations

import math
import re

from .errors import NOT_FLOAT, NOT_INTEGER, ResponseError

LLONG_MIN, LLONG_MAX = -(1 << 63), (1 << 63) - 1
ULLONG_MAX = (1 << 64) - 1

# glibc strtod: optional space and sign, then hex, decimal, inf[inity] or nan[(...)]
_STRTOD = re.compile(
    rb"[ \t\n\v\f\r]*([+-]?)(?:"
    rb"(0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][+-]?[0-9]+)?)"
    rb"|((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)"
    rb"|([iI][nN][fF](?:[iI][nN][iI][tT][yY])?)"
    rb"|([nN][aA][nN](?:\([0-9A-Za-z_]*\))?))")
_NONZERO_MANTISSA = re.compile(rb"[1-9]|0[xX]?[0-9a-fA-F]*[1-9a-fA-F]")


def integer(raw: bytes, error: str = NOT_INTEGER) -> int:
    """A signed 64-bit integer written canonically (`string2ll`: no sign +, spaces or leading
    zeros), or a ResponseError."""
    value = as_integer(raw)
    if value is None:
        raise ResponseError(error)
    return value


def as_integer(raw: bytes) -> int | None:
    if raw.isdigit() and len(raw) < 19 and (raw[0] != 48 or len(raw) == 1):  # fast: 0..10^18
        return int(raw)
    if 0 < len(raw) < 21:
        try:
            value = int(raw)
        except ValueError:
            return None
        if LLONG_MIN <= value <= LLONG_MAX and b"%d" % value == raw:
            return value
    return None


def unsigned(raw: bytes) -> int | None:
    """`string2ull`: canonical non-negative, else what C's strtoull accepts whole."""
    value = as_integer(raw)
    if value is not None:
        return value if value >= 0 else None
    match = re.fullmatch(rb"[ \t\n\v\f\r]*([+-]?)([0-9]+)", raw)
    if match is None:
        return None
    value = int(match[2])
    if value > ULLONG_MAX:
        return None
    return (-value) & ULLONG_MAX if match[1] == b"-" else value


def strtod(raw: bytes) -> tuple[float, int, bool]:
    """C's strtod: (value, bytes consumed, out of range). Nothing parsed: (0.0, 0, False)."""
    match = _STRTOD.match(raw)
    if match is None:
        return 0.0, 0, False
    sign, hexa, decimal, inf, _ = match.groups()
    negative = sign == b"-"
    if inf:
        return -math.inf if negative else math.inf, match.end(), False
    if hexa is None and decimal is None:
        return math.copysign(math.nan, -1.0 if negative else 1.0), match.end(), False
    text = hexa or decimal
    try:
        value = float.fromhex(text.decode()) if hexa else float(text)
    except OverflowError:
        value = math.inf
    if negative:
        value = -value
    out_of_range = math.isinf(value) or (value == 0 and _NONZERO_MANTISSA.search(
        text.split(b"p")[0].split(b"P")[0] if hexa else text.split(b"e")[0].split(b"E")[0])
        is not None)
    return value, match.end(), out_of_range


def double(raw: bytes, error: str = NOT_FLOAT) -> float:
    """`string2d`, as ZADD reads a score: the whole string, no leading space, no NaN, no overflow
    or underflow to zero."""
    value, used, out_of_range = strtod(raw)
    if (not raw or raw[0] in b" \t\n\v\f\r" or used != len(raw) or math.isnan(value)
            or (out_of_range and (math.isinf(value) or value == 0))):
        raise ResponseError(error)
    return value


def format_double(value: float) -> bytes:
    """A double as Redis 7.0 replies with it (RESP2 bulk) and as scripts pass numbers: "%.17g"."""
    if math.isinf(value):
        return b"inf" if value > 0 else b"-inf"
    if math.isnan(value):
        return b"-nan" if math.copysign(1.0, value) < 0 else b"nan"
    return b"%.17g" % value
