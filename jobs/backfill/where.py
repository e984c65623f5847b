"""``--where`` expressions become structured filters; nothing the user types ever reaches SQL as text.

Accepted forms (the column may be double-quoted; a value may be single- or double-quoted)::

    created_at>=2024-01-01      status != 'done'      id in 1,2,3      note is null      note is not null
"""

from __future__ import annotations

import re

from runner.errors import PayloadError
from runner.jobs.backfill.spec import Filter, parse_filter

_COLUMN = r'(?P<col>"(?:[^"]|"")+"|[^\s=!<>"]+)'
_NULL_TEST = re.compile(rf"^\s*{_COLUMN}\s+is\s+(?P<negated>not\s+)?null\s*$", re.IGNORECASE)
_IN = re.compile(rf"^\s*{_COLUMN}\s+in\s+(?P<values>.+?)\s*$", re.IGNORECASE | re.DOTALL)
_COMPARISON = re.compile(rf"^\s*{_COLUMN}\s*(?P<op>>=|<=|!=|<>|=|<|>)\s*(?P<value>.*?)\s*$", re.DOTALL)
HELP = ("use COLUMN OP VALUE (OP one of = != < <= > >=), COLUMN in A,B,C, COLUMN is null, "
        "or COLUMN is not null")


def parse_where(expression: str) -> Filter:
    """Parse one ``--where``; raise PayloadError (a usage error) when it is not one of the forms above."""
    if match := _NULL_TEST.match(expression):
        op = "not_null" if match["negated"] else "is_null"
        return parse_filter([_column(match["col"]), op])
    if match := _IN.match(expression):
        values = _unwrap(match["values"], "(", ")")
        items = [_unquote(v.strip()) for v in values.split(",")]
        if any(item == "" for item in items):
            raise PayloadError(f"--where {expression!r}: empty value in the 'in' list")
        return parse_filter([_column(match["col"]), "in", items])
    if match := _COMPARISON.match(expression):
        value = _unquote(match["value"])
        if match["value"] == "":
            raise PayloadError(f"--where {expression!r}: missing value after {match['op']!r}")
        op = "!=" if match["op"] == "<>" else match["op"]
        return parse_filter([_column(match["col"]), op, value])
    raise PayloadError(f"--where {expression!r}: cannot parse; {HELP}")


def _column(text: str) -> str:
    if len(text) >= 2 and text.startswith('"') and text.endswith('"'):
        return text[1:-1].replace('""', '"')
    return text


def _unwrap(text: str, opening: str, closing: str) -> str:
    text = text.strip()
    if text.startswith(opening) and text.endswith(closing):
        return text[1:-1]
    return text


def _unquote(text: str) -> str:
    for quote in ("'", '"'):
        if len(text) >= 2 and text.startswith(quote) and text.endswith(quote):
            return text[1:-1].replace(quote * 2, quote)
    return text
