"""Narrowing: a destination column whose type cannot hold every value of its source column's type.

PostgreSQL accepts ``INSERT INTO dest SELECT <source types>`` for bigint into integer or text into varchar(3)
(an assignment cast exists), so the EXPLAIN check in :mod:`plan` passes them; the rows then fail one by one.
:func:`narrowing` compares the two catalog types (base type and typmod, from one catalog query per side) and
says why the destination is narrower, or None:

- integers: int2 < int4 < int8; into numeric(p,s) the p-s integer digits must hold the widest value; into
  real/double precision the mantissa (24/53 bits) must hold it exactly;
- numeric(p,s): neither the p-s integer digits nor the s fraction digits may shrink (numeric without a
  precision is the widest); into an integer: no fraction digits and few enough integer digits;
- real/double precision: double into real narrows; a float into an integer or numeric(p,s) cannot hold it;
- character varying(n), character(n), text: by length (text and unbounded varchar hold any length);
  an integer into a bounded one needs room for its longest text ("-9223372036854775808");
- timestamp, timestamptz, time, timetz, interval: the fractional-second precision may not shrink
  (and an interval's fields may not be restricted); timestamp(tz) into date or time drops a part of the value,
  timestamptz into timestamp and timetz into time drop the time zone;
- bit(n) must keep n, bit varying(n) may not shrink;
- any other pair: the same type with the same typmod or an unconstrained destination is fine, a different
  typmod of the same type is narrowing; pairs of different types are left to the EXPLAIN check.

Domains are compared by their base type (their CHECK constraints are not), arrays by their element type.
"""

from __future__ import annotations

from runner.jobs.backfill.catalog import Column

VARHDRSZ = 4
INTEGER_BITS = {"smallint": 16, "integer": 32, "bigint": 64}
# the integer digits every value of the type has room for, and the longest value's digits
INTEGER_DIGITS_HELD = {"smallint": 4, "integer": 9, "bigint": 18}
INTEGER_DIGITS = {"smallint": 5, "integer": 10, "bigint": 19}
INTEGER_TEXT = {"smallint": 6, "integer": 11, "bigint": 20}  # "-32768", "-2147483648", "-9223372036854775808"
FLOAT_MANTISSA = {"real": 24, "double precision": 53}
FLOAT_DIGITS = {"real": 6, "double precision": 15}  # significant decimal digits held exactly
TEXT_TYPES = ("text", "character varying", "character")
TIMESTAMPS = ("timestamp without time zone", "timestamp with time zone")
TIMES = ("time without time zone", "time with time zone")
DEFAULT_SECONDS_PRECISION = 6
INTERVAL_FULL_RANGE = 0x7FFF
INTERVAL_FULL_PRECISION = 0xFFFF


def narrowing(source: Column, dest: Column) -> str | None:
    """Why ``dest`` cannot hold every value of ``source`` (a short reason), or None."""
    if source.base_array != dest.base_array:
        return None  # left to the EXPLAIN check
    s_type, d_type, s_mod, d_mod = source.base_type, dest.base_type, source.base_typmod, dest.base_typmod
    if not (source.base_builtin and dest.base_builtin):
        if s_type != d_type or d_mod == -1 or s_mod == d_mod:
            return None
        return f"type modifier: {source.type} values may not fit {dest.type}"
    for rule in (_integer, _numeric, _float, _text, _time, _bits):
        reason = rule(s_type, s_mod, d_type, d_mod)
        if reason is not None:
            return reason or None  # "": the rule knows the pair and it is fine
    if s_type == d_type and d_mod != -1 and s_mod != d_mod:
        return f"type modifier: {source.type} values may not fit {dest.type}"
    return None


# Each rule returns None when it does not know the pair, "" when the pair is fine, else the reason.
Reason = str | None


def _numeric_typmod(typmod: int) -> tuple[int, int] | None:
    """(precision, scale) of numeric(p,s); None for numeric without a precision."""
    if typmod < VARHDRSZ:
        return None
    value = typmod - VARHDRSZ
    return (value >> 16) & 0xFFFF, ((value & 0x7FF) ^ 1024) - 1024  # the scale is 11-bit signed (PostgreSQL 15+)


def _numeric_name(typmod: int) -> str:
    ps = _numeric_typmod(typmod)
    return "numeric" if ps is None else f"numeric({ps[0]},{ps[1]})"


def _integer(s_type: str, s_mod: int, d_type: str, d_mod: int) -> Reason:
    if s_type not in INTEGER_BITS:
        return None
    if d_type in INTEGER_BITS:
        if INTEGER_BITS[d_type] < INTEGER_BITS[s_type]:
            return (f"integer width: {s_type} is {INTEGER_BITS[s_type]}-bit, {d_type} only "
                    f"{INTEGER_BITS[d_type]}-bit")
        return ""
    if d_type == "numeric":
        ps = _numeric_typmod(d_mod)
        if ps is not None and ps[0] - ps[1] < INTEGER_DIGITS[s_type]:
            return (f"precision: {s_type} values have up to {INTEGER_DIGITS[s_type]} digits, "
                    f"{_numeric_name(d_mod)} keeps {max(ps[0] - ps[1], 0)} before the point")
        return ""
    if d_type in FLOAT_MANTISSA:
        if INTEGER_BITS[s_type] - 1 > FLOAT_MANTISSA[d_type]:
            return (f"precision: {d_type} holds {FLOAT_MANTISSA[d_type]}-bit integers exactly, "
                    f"{s_type} values need {INTEGER_BITS[s_type] - 1} bits")
        return ""
    if d_type in ("character varying", "character"):
        length = d_mod - VARHDRSZ if d_mod >= VARHDRSZ else None
        if length is not None and length < INTEGER_TEXT[s_type]:
            return (f"length: {s_type} values are up to {INTEGER_TEXT[s_type]} characters long as text, "
                    f"the destination holds {length}")
        return ""
    return None


def _numeric(s_type: str, s_mod: int, d_type: str, d_mod: int) -> Reason:
    if s_type != "numeric":
        return None
    source = _numeric_typmod(s_mod)
    if d_type == "numeric":
        dest = _numeric_typmod(d_mod)
        if dest is None:
            return ""
        if source is None:
            return f"precision: numeric without a precision holds values {_numeric_name(d_mod)} cannot"
        if dest[0] - dest[1] < source[0] - source[1]:
            return (f"precision: {_numeric_name(s_mod)} has {source[0] - source[1]} digits before the point, "
                    f"{_numeric_name(d_mod)} {dest[0] - dest[1]}")
        if dest[1] < source[1]:
            return (f"scale: {_numeric_name(s_mod)} has {source[1]} fraction digits, {_numeric_name(d_mod)} "
                    f"{dest[1]} (values would be rounded)")
        return ""
    if d_type in INTEGER_BITS:
        if source is None:
            return f"a type that cannot hold the source's values: numeric without a precision into {d_type}"
        if source[1] > 0:
            return (f"scale: {_numeric_name(s_mod)} has {source[1]} fraction digits, {d_type} none "
                    "(values would be rounded)")
        if source[0] - source[1] > INTEGER_DIGITS_HELD[d_type]:
            return (f"precision: {_numeric_name(s_mod)} has {source[0] - source[1]} digits before the point, "
                    f"{d_type} holds {INTEGER_DIGITS_HELD[d_type]}")
        return ""
    if d_type in FLOAT_DIGITS:
        if source is None or source[0] > FLOAT_DIGITS[d_type]:
            return (f"precision: {d_type} holds {FLOAT_DIGITS[d_type]} significant digits exactly, "
                    f"{_numeric_name(s_mod)} {'more' if source is None else source[0]}")
        return ""
    return None


def _float(s_type: str, s_mod: int, d_type: str, d_mod: int) -> Reason:
    if s_type not in FLOAT_DIGITS:
        return None
    if d_type in FLOAT_DIGITS:
        if FLOAT_DIGITS[d_type] < FLOAT_DIGITS[s_type]:
            return f"precision: {s_type} into {d_type} loses digits and range"
        return ""
    if d_type in INTEGER_BITS or (d_type == "numeric" and d_mod != -1):
        shown = _numeric_name(d_mod) if d_type == "numeric" else d_type
        return f"a type that cannot hold the source's values: {s_type} (fractions, exponents) into {shown}"
    return None if d_type != "numeric" else ""


def _text(s_type: str, s_mod: int, d_type: str, d_mod: int) -> Reason:
    if s_type not in TEXT_TYPES or d_type not in TEXT_TYPES:
        return None
    dest = d_mod - VARHDRSZ if d_type != "text" and d_mod >= VARHDRSZ else None
    source = s_mod - VARHDRSZ if s_type != "text" and s_mod >= VARHDRSZ else None
    if dest is not None and (source is None or source > dest):
        return f"length: the source's values can be {'longer' if source is None else f'{source} characters'}, " \
               f"the destination holds {dest}"
    return ""


def _seconds_precision(typmod: int) -> int:
    return DEFAULT_SECONDS_PRECISION if typmod < 0 else typmod


def _interval(typmod: int) -> tuple[int, int]:
    """(fields, fractional-second precision) of an interval typmod."""
    if typmod < 0:
        return INTERVAL_FULL_RANGE, DEFAULT_SECONDS_PRECISION
    precision = typmod & 0xFFFF
    return (typmod >> 16) & 0x7FFF, DEFAULT_SECONDS_PRECISION if precision == INTERVAL_FULL_PRECISION else precision


def _time(s_type: str, s_mod: int, d_type: str, d_mod: int) -> Reason:
    if s_type == "interval" and d_type == "interval":
        (s_fields, s_precision), (d_fields, d_precision) = _interval(s_mod), _interval(d_mod)
        if d_fields != INTERVAL_FULL_RANGE and d_fields != s_fields:
            return "a type that cannot hold the source's values: the destination interval keeps fewer fields"
        return _precision(s_precision, d_precision)
    if s_type not in (*TIMESTAMPS, *TIMES, "date"):
        return None
    if s_type == "date":
        return "" if d_type in (*TIMESTAMPS, "date") else None
    if d_type == "date":
        return f"a type that cannot hold the source's values: date drops the time of day of {s_type}"
    if s_type in TIMESTAMPS and d_type in TIMES:
        return f"a type that cannot hold the source's values: {d_type} drops the date of {s_type}"
    if (s_type, d_type) in (("timestamp with time zone", "timestamp without time zone"),
                            ("time with time zone", "time without time zone")):
        return (f"a type that cannot hold the source's values: {d_type} drops the time zone "
                "(values would shift to the session's TimeZone)")
    if (s_type in TIMESTAMPS) != (d_type in TIMESTAMPS) or d_type not in (*TIMESTAMPS, *TIMES):
        return None
    return _precision(_seconds_precision(s_mod), _seconds_precision(d_mod))


def _precision(source: int, dest: int) -> str:
    if dest < source:
        return f"precision: {source} fractional-second digits into {dest} (values would be rounded)"
    return ""


def _bits(s_type: str, s_mod: int, d_type: str, d_mod: int) -> Reason:
    if s_type not in ("bit", "bit varying") or d_type not in ("bit", "bit varying"):
        return None
    source, dest = (None if s_mod < 0 else s_mod), (None if d_mod < 0 else d_mod)
    if d_type == "bit" and dest is not None and (s_type != "bit" or source != dest):
        return f"length: bit({dest}) takes exactly {dest} bits"
    if dest is not None and (source is None or source > dest):
        return f"length: the source's values can be {'longer' if source is None else f'{source} bits'}, " \
               f"the destination holds {dest}"
    return ""


def check_narrowing(pairs: list[tuple[Column, Column]]) -> list[tuple[Column, Column, str]]:
    """Every (source, dest, reason) of a narrowing pair, in column order."""
    found = []
    for source, dest in pairs:
        reason = narrowing(source, dest)
        if reason is not None:
            found.append((source, dest, reason))
    return found
