"""JSON objects from users (a job's payload, a consensus transaction's input): one clear UsageError for
anything PostgreSQL's jsonb or Python would choke on later, before anything is written.

Kept free of heavy imports: the CLI, the App's enqueue checks and the consensus plugin share it.
"""

from __future__ import annotations

import json
from typing import Any

from runner.errors import PayloadError, UsageError

MAX_DEPTH = 100  # containers within containers; Python's json gives up near 1,000


def parse_json_object(text: str, where: str, max_bytes: int, *, noun: str = "the payload",
                      limit: str | None = "RUNNER_MAX_PAYLOAD_BYTES") -> dict[str, Any]:
    """``text`` as a JSON object, checked for size before it is parsed (a 50 MB argument is refused, not
    decoded), then as :func:`json_text` checks it. Messages read ``{where}: {noun} ...``."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise UsageError(f"{where}: {noun} is {size:,} bytes; at most {max_bytes:,}{_named(limit)}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    except RecursionError:
        raise UsageError(f"{where}: {noun} is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except ValueError as error:  # an integer past Python's digit limit, for one
        reason = "a number has more than 4,300 digits" if "digits" in str(error) else str(error)[:120]
        raise UsageError(f"{where}: not valid JSON ({reason})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{where}: {noun} must be a JSON object, got {type(value).__name__}")
    try:
        json_text(value, max_bytes, noun=noun, limit=limit)
    except PayloadError as error:
        raise UsageError(f"{where}: {error}") from None
    return value


def json_text(value: Any, max_bytes: int, *, noun: str = "the payload",
              limit: str | None = "RUNNER_MAX_PAYLOAD_BYTES") -> str:
    """``value`` as the JSON text to store; PayloadError (one line) when it nests deeper than MAX_DEPTH, is
    not JSON, is larger than ``max_bytes`` or holds a NUL character (which jsonb cannot store)."""
    if depth_exceeds(value, MAX_DEPTH):
        raise PayloadError(f"{noun} nests deeper than {MAX_DEPTH} levels")
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as error:
        raise PayloadError(f"{noun} is not JSON: {type(error).__name__}: {str(error)[:200]}") from None
    if len(text) > max_bytes:  # ASCII (json.dumps escapes the rest): characters are bytes
        raise PayloadError(f"{noun} is {len(text):,} bytes of JSON; at most {max_bytes:,}{_named(limit)}")
    if "\\u0000" in text:
        raise PayloadError(f"{noun} contains a NUL character (\\u0000), which PostgreSQL's jsonb cannot store")
    return text


def _named(limit: str | None) -> str:
    return f" ({limit})" if limit else ""


def depth_exceeds(value: Any, limit: int) -> bool:
    """True when containers nest deeper than ``limit`` (walked without recursion: a hostile value cannot
    exhaust the stack here)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
