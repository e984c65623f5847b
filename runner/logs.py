"""structlog set-up: JSON lines off a TTY, key=value on one, and no password ever printed.

Redaction parses rather than pattern-matches one shape: every rule below finds the *span* of a secret in
the original text (a URL's password, a ``password=`` value, a hex private key), the spans are merged and
each merged span is replaced. A rule can only add spans, so one rule's oddity never unmasks another's
secret, and when a form is ambiguous the rules take too much rather than too little.

Forms covered (libpq's and the ones runner's own URLs use):

* URLs with userinfo, any scheme (``postgresql://``, ``postgres://``, ``postgresql+asyncpg://``,
  ``http://user:token@node``), multi-host or not. A password may hold any character, unescaped ``@``,
  ``:``, ``/``, ``#``, ``?``, spaces and quotes included: the userinfo ends at the *last* ``@`` of the line.
* ``password=`` as a URL query parameter (up to the next ``&name=``) and as a keyword/value pair
  (``password = x``, ``password='it''s'``, ``password='it\\'s'``); ``sslpassword=`` and ``*_password=`` too.
* ``'password': '...'`` as a dict's repr or JSON prints it.
* 32-byte hex strings (private keys).
"""

from __future__ import annotations

import bisect
import logging
import re
import sys
import uuid
from collections.abc import Mapping, MutableMapping
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import structlog

MASK = "***"
KEY_MASK = "<redacted-key>"

# a user name shown in front of a redacted password; anything else (quotes, spaces, slashes) is masked too
_PLAIN_USER = re.compile(r"[A-Za-z0-9._~%+-]*")


def _escaped_quoted(q: str) -> str:
    """A quoted value as it reads inside a repr or JSON string, where its quotes and backslashes are escaped
    once more: ``'it\\'s'`` (libpq's quoting) reads ``\\'it\\\\\\'s\\'`` in a repr."""
    e = re.escape("\\" + q)  # the escaped quote
    return (e + r"(?:\\\\\\\\|\\\\" + e + "|" + e + e + r"|(?:\\)?\\[^" + q + r"\\]|[^" + q
            + r"\\\n\r])*" + e)


# Quoted values, closed: libpq's backslash escapes, SQL's doubled quote, and the same once more escaped as
# it reads inside a repr or a JSON string (the quote escaped, or only the backslashes doubled). Which one a
# text uses cannot be known, so the longest match is taken; an unclosed quote runs to the line's end.
_CLOSED_VALUES = [re.compile(pattern) for pattern in (
    r"'(?:[^'\\\n\r]|\\.|'')*'",
    r"'(?:[^'\n\r]|'')*'",  # SQL's quoting, where a backslash is a backslash
    r'"(?:[^"\\\n\r]|\\.)*"',
    r"'(?:\\\\\\\\|\\\\'|''|(?:\\)?\\[^'\\]|[^'\\\n\r])*'",
    _escaped_quoted("'"),
    _escaped_quoted('"'),
)]
_OPEN_VALUE = re.compile(r"""\\?['"][^\n\r]*""")
_BARE_VALUE = re.compile(r"\S*")
_KEYWORD = re.compile(r"(?i)(?:password|passwd)\s*=\s*")  # sslpassword=, db_password= too
_WORD_START = re.compile(r"\w*$")
# A query parameter's bare value runs to the next `&name=` (a raw `&` inside a password does not end it),
# spaces included when one follows on the line or the string is one DSN; else to the first space.
_NEXT_PARAMETER = re.compile(r"&\w+=")
_SPACE = re.compile(r"\s")
_MAPPING_KEY = re.compile(r"""(?P<q>['"])(?P<key>\w+)(?P=q)\s*:\s*(?=['"])""")  # 'password': '...'
_REPR_STRING = [re.compile(r"'(?:[^'\\\n\r]|\\.)*'"), re.compile(r'"(?:[^"\\\n\r]|\\.)*"')]
_HEX_KEY = re.compile(r"\b(0x)?[0-9a-fA-F]{64}\b")  # a 32-byte hex string is treated as a private key
# keys of a structured value whose string values are secrets whatever they look like
SECRET_KEY = re.compile(r"(?i)(password|passwd|secret|token|private_?key|api_?key|credential)")

_Span = tuple[int, int, str]


def _line_end(text: str, start: int) -> int:
    ends = [i for i in (text.find("\n", start), text.find("\r", start)) if i != -1]
    return min(ends) if ends else len(text)


def _url_spans(text: str) -> list[_Span]:
    spans: list[_Span] = []
    pos = 0
    while (found := text.find("://", pos)) != -1:  # any scheme, and none: `://` starts an authority
        start = found + 3
        at = text.rfind("@", start, _line_end(text, start))
        if at == -1:
            pos = start
            continue
        userinfo = text[start:at]
        user, colon, _ = userinfo.partition(":")
        if _PLAIN_USER.fullmatch(user) is None or any(c.isspace() for c in userinfo):
            spans.append((start, at, MASK))  # the boundaries are a guess (a space, an odd user): mask it all
        elif colon:
            spans.append((start + len(user) + 1, at, MASK))
        pos = at + 1
    return spans


def _value_end(text: str, start: int, parameters: list[int] | None, whole: bool) -> int:
    """Where the value of a ``password=`` that ends at ``start`` ends; ``parameters``: the offsets of the
    text's ``&name=`` when it is a query parameter, else None."""
    ends = [m.end() for pattern in _CLOSED_VALUES if (m := pattern.match(text, start))]
    if ends:
        return max(ends)
    if (opened := _OPEN_VALUE.match(text, start)) is not None:
        return opened.end()
    if parameters is not None:  # a query parameter: `&name=` ends it, a space only if none follows
        line_end = _line_end(text, start)
        following = bisect.bisect_left(parameters, start)
        if following < len(parameters) and parameters[following] < line_end:
            return parameters[following]
        if whole:
            return line_end
        space = _SPACE.search(text, start, line_end)
        return space.start() if space else line_end
    return _BARE_VALUE.match(text, start).end()  # type: ignore[union-attr]


def _keyword_spans(text: str, whole: bool) -> list[_Span]:
    spans: list[_Span] = []
    parameters: list[int] | None = None
    covered = 0  # a `password=` inside the value of the one before adds nothing (and would cost a rescan)
    for match in _KEYWORD.finditer(text):
        if match.start() < covered:
            continue
        # a query parameter (`?password=`, `&sslpassword=`) if the word it ends starts after `?` or `&`
        word = _WORD_START.search(text, max(0, match.start() - 64), match.start())
        before = word.start() - 1 if word else match.start() - 1
        query = before >= 0 and text[before] in "?&"
        if query and parameters is None:
            parameters = [m.start() for m in _NEXT_PARAMETER.finditer(text)]
        covered = _value_end(text, match.end(), parameters if query else None, whole)
        spans.append((match.end(), covered, MASK))
    for match in _MAPPING_KEY.finditer(text):
        if SECRET_KEY.search(match["key"]):
            ends = [m.end() for pattern in _REPR_STRING if (m := pattern.match(text, match.end()))]
            if ends:
                spans.append((match.end(), max(ends), MASK))
    return spans


def _redact(text: str, whole: bool) -> str:
    spans = _url_spans(text) + _keyword_spans(text, whole)
    spans.extend((*m.span(), KEY_MASK) for m in _HEX_KEY.finditer(text))
    if not spans:
        return text
    spans.sort()
    merged: list[list[Any]] = []
    for start, end, mask in spans:
        if merged and start <= merged[-1][1]:
            last = merged[-1]
            last[1] = max(last[1], end)
            last[2] = MASK if MASK in (last[2], mask) else KEY_MASK
        else:
            merged.append([start, end, mask])
    out, pos = [], 0
    for start, end, mask in merged:
        out.append(text[pos:start])
        out.append(mask)
        pos = end
    out.append(text[pos:])
    return "".join(out)


def redact(text: str) -> str:
    """Remove DSN passwords, ``password=`` values and 32-byte hex secrets from free text (a log line)."""
    return _redact(text, whole=False)


def redact_dsn(url: str) -> str:
    """``redact`` for a string that is one DSN: a ``password=`` query value may then hold spaces."""
    return _redact(url, whole=True)


# --- log events ---------------------------------------------------------------------------------------
MAX_DEPTH = 8
_PLAIN = (int, float, bool, type(None), datetime, date, time, timedelta, uuid.UUID, Decimal)


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except RecursionError:
        return f"<{type(value).__name__}: too deeply nested to print>"
    except Exception as error:  # a broken __repr__ must not lose the log line
        return f"<{type(value).__name__}: repr failed: {type(error).__name__}>"


def redact_value(value: Any, depth: int = 0) -> Any:
    """``value`` with every string in it redacted: containers walked (to :data:`MAX_DEPTH`), exceptions and
    other objects turned into their redacted repr; values under a secret-looking key masked whole."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, _PLAIN):
        return value
    if depth >= MAX_DEPTH:
        return redact(_safe_repr(value))
    if isinstance(value, Mapping):
        return {key: _redact_item(key, item, depth) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [redact_value(item, depth + 1) for item in value]
        return items if isinstance(value, list | set | frozenset) else tuple(items)
    if isinstance(value, bytes | bytearray):
        return redact(bytes(value).decode("utf-8", "backslashreplace"))
    if isinstance(value, BaseException) and type(value).__repr__ is BaseException.__repr__:
        # its arguments redacted before they are quoted: a DSN inside is then read at one level of quoting
        args = ", ".join(_safe_repr(redact_value(arg, depth + 1)) for arg in value.args)
        return redact(f"{type(value).__name__}({args})")
    return redact(_safe_repr(value))  # other exceptions and objects: what the renderer would print


def _redact_item(key: Any, item: Any, depth: int) -> Any:
    if isinstance(key, str) and isinstance(item, str | bytes) and SECRET_KEY.search(key):
        return MASK
    return redact_value(item, depth + 1)


def _redact_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        event[key] = _redact_item(key, value, -1)
    return event


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _Stderr:
    """Whatever ``sys.stderr`` is at the time of writing (pytest's capture, contextlib.redirect_stderr)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root logger's handler that runner installs: stdlib records (asyncpg, alembic, asyncio, web3) go
    through the same processors, redaction and renderer as runner's own events."""

    def __init__(self) -> None:
        super().__init__(_Stderr())  # type: ignore[arg-type]


def configure_logging(fmt: str = "auto", level: str = "info", *, stdlib: bool = True) -> None:
    """Set up structlog and (with ``stdlib``, as the CLI does) the stdlib root logger alike; calling it
    again replaces the set-up. A library user's App passes ``stdlib=False``: their logging is theirs."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            _redact_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    if not stdlib:
        return
    handler = _StderrHandler()
    handler.setLevel(_LEVELS[level])
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_logger_name,
            structlog.processors.add_log_level,
            timestamper,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,  # the traceback into the `exception` field: one line
            _redact_event,
            renderer,
        ],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
