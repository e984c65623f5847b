"""Connection strings checked before anything connects: one line on what is wrong, never the string.

asyncpg's own parser is private API and its errors can echo the input (a password moved into a port by a
misplaced character), so the forms it accepts are checked here with urllib; tests compare the two.
"""

from __future__ import annotations

import re
import urllib.parse

_PG_SCHEMES = ("postgresql", "postgres")
_SSL_MODES = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})
_SSL_NEGOTIATIONS = frozenset({"postgres", "direct"})
_TARGET_SESSION_ATTRS = frozenset({"any", "primary", "standby", "read-write", "read-only", "prefer-standby"})
_TLS_VERSIONS = frozenset({"TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"})
_HOST_FORBIDDEN = re.compile(r"[@/?#\s]")  # never in a host name; '@' means an unencoded '@' in a password


class DsnError(ValueError):
    """A connection string that cannot be used. The message says why and never contains the string or any
    part of it (a misplaced character can move a password into any part)."""


def check_dsn(dsn: str) -> None:
    """Raise :class:`DsnError` unless asyncpg can parse ``dsn``: a ``postgresql://`` or ``postgres://`` URL,
    with any number of comma-separated hosts (``h1:5432,h2:5433``, ``[::1]``, a percent-encoded socket
    folder), query parameters (``?sslmode=require&host=...&port=...``); or an empty string (libpq's PG*
    variables and defaults). asyncpg takes no keyword/value strings (``host=h dbname=d``), so they are refused
    here. Pure Python, without importing asyncpg: this runs at
    every start (see runner.cli)."""
    if not dsn:
        return  # asyncpg then connects like libpq with no DSN: PGHOST, PGPORT, PGUSER, ... or their defaults
    if "://" not in dsn:
        if "=" in dsn:
            raise DsnError("is a keyword/value string (host=... dbname=...), which asyncpg does not take; "
                           "use a postgresql:// URL")
        raise DsnError("is not a postgresql:// or postgres:// URL")
    try:
        parsed = urllib.parse.urlparse(dsn)
    except ValueError:  # e.g. an unclosed [ of an IPv6 host
        raise DsnError("is not a valid URL (an unclosed [ in the host?)") from None
    if parsed.scheme not in _PG_SCHEMES:
        raise DsnError("has an unknown scheme: use postgresql:// or postgres://")
    # asyncpg splits the credentials off at the first '@'
    hostspec = parsed.netloc.partition("@")[2] if "@" in parsed.netloc else parsed.netloc
    hosts = _check_hosts(hostspec, unquote=True) if hostspec else 0
    if not parsed.query:
        return
    try:
        query = {key: values[-1] for key, values in
                 urllib.parse.parse_qs(parsed.query, strict_parsing=True).items()}
    except ValueError:
        raise DsnError("has a malformed query string (expected ?name=value&name=value)") from None
    ports = [_check_port(port, "the port parameter") for port in query["port"].split(",")] if query.get("port") else []
    if not hosts and query.get("host"):
        hosts = _check_hosts(query["host"], unquote=False)
        if len(ports) > 1 and len(ports) != hosts:
            raise DsnError(f"gives {len(ports)} ports for {hosts} hosts")
    for name, allowed in (("sslmode", _SSL_MODES), ("sslnegotiation", _SSL_NEGOTIATIONS),
                          ("target_session_attrs", _TARGET_SESSION_ATTRS),
                          ("ssl_min_protocol_version", _TLS_VERSIONS), ("ssl_max_protocol_version", _TLS_VERSIONS)):
        value = query.get(name)
        if value is not None and (value.replace("_", "-") if name == "sslmode" else value) not in allowed:
            raise DsnError(f"has an invalid {name}: use one of {', '.join(sorted(allowed))}")


def _check_hosts(hostlist: str, *, unquote: bool) -> int:
    """The number of hosts in a comma-separated host list (as asyncpg parses one); raise DsnError."""
    specs = hostlist.split(",")
    for spec in specs:
        if not spec:
            raise DsnError("has an empty host in its host list")
        if spec.startswith("/"):  # a socket folder
            continue
        if spec.startswith("["):
            match = re.fullmatch(r"\[([^\]]+)\](?::([^,]*))?", spec)
            if match is None:
                raise DsnError("has an invalid IPv6 host: use [address] or [address]:port")
            address, port = match.group(1), match.group(2) or ""
        else:
            address, _, port = spec.partition(":")
        if unquote:
            address, port = urllib.parse.unquote(address), urllib.parse.unquote(port)
        if not address.startswith("/") and _HOST_FORBIDDEN.search(address):
            raise DsnError("has a host name with '@', '/', '?', '#' or a space in it: percent-encode such "
                           "characters in the user name and password ('@' as %40)")
        if port:
            _check_port(port, "a port")
    return len(specs)


def _check_port(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise DsnError(f"has {what} that is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise DsnError(f"has {what} out of range (1 to 65535)")
    return port


def check_http_url(url: str) -> None:
    """Raise :class:`DsnError` unless ``url`` is an http:// or https:// URL with a host (a JSON-RPC node)."""
    try:
        parsed = urllib.parse.urlparse(url.strip())
        port = parsed.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        raise DsnError("is not a valid URL (its port must be a number from 1 to 65535)") from None
    if parsed.scheme not in ("http", "https"):
        raise DsnError("must be an http:// or https:// URL")
    if not parsed.hostname:
        raise DsnError("has no host")
    if port == 0:
        raise DsnError("has a port out of range (1 to 65535)")
