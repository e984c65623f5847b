"""No password ever printed: redaction of every DSN form libpq accepts, of nested log values, of stdlib
records (asyncpg's), and of what a failing command prints, with passwords hypothesis makes up."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import structlog
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from runner.logs import configure_logging, redact, redact_dsn, redact_value
from tests.conftest import FAST_ENV, run_cli

# Every printable ASCII character, and some of the rest of Unicode (letters, symbols, punctuation, spaces).
PRINTABLE = st.characters(min_codepoint=32, max_codepoint=126)
UNICODE = st.characters(min_codepoint=0xA0, max_codepoint=0x2FFF, exclude_categories=("Cs", "Cc", "Zl", "Zp"))
PASSWORDS = st.text(alphabet=PRINTABLE | UNICODE, min_size=4, max_size=40)
NASTY = [
    "p@ss:w/rd#?x",  # every URL delimiter, unescaped
    "it's \"quoted\" & spaced",
    "%41%zz%", "a@b@c@d", "::::", "//@//", "?password=x&sslmode=", "'; DROP TABLE jobs; --",
    "pässwörd™ 密码", "x://y@z", "password='", "\\'\\", "ends with space ",
]
# the same DSN alone, inside a line of text, as a dict's repr, and on one line of several
WRAPPERS = (str, lambda d: f"error: cannot connect to {d} (timeout)", lambda d: repr({"dsn": d}),
            lambda d: f"first line\nb {d}\nlast line")
PROPERTY = settings(max_examples=200, database=None, deadline=None)


def _libpq_quoted(password: str) -> str:
    """A keyword/value value as libpq wants it quoted: backslash and quote escaped with a backslash."""
    return "'" + password.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _sql_quoted(password: str) -> str:
    """The same, with the quote doubled as in SQL (libpq does not, users do)."""
    return "'" + password.replace("'", "''") + "'"


def _forms(password: str) -> list[tuple[str, str]]:
    """(a DSN carrying ``password``, what its redaction should read): every form and spelling."""
    encoded = quote(password, safe="")
    return [
        (f"postgresql://app:{encoded}@db:5432/x", "postgresql://app:***@db:5432/x"),
        (f"postgresql://app:{password}@db:5432/x", "postgresql://app:***@db:5432/x"),
        (f"postgres://app:{password}@db/x?sslmode=require", "postgres://app:***@db/x?sslmode=require"),
        (f"postgresql://app:{password}@h1:5432,h2:5433/x", "postgresql://app:***@h1:5432,h2:5433/x"),
        (f"postgresql+asyncpg://app:{encoded}@db/x", "postgresql+asyncpg://app:***@db/x"),
        (f"http://user:{password}@node:8545", "http://user:***@node:8545"),
        (f"postgresql://db/x?password={encoded}&sslmode=require", "postgresql://db/x?password=***&sslmode=require"),
        (f"postgresql://db/x?sslmode=require&password={encoded}", "postgresql://db/x?sslmode=require&password=***"),
        (f"host=db user=app password={_libpq_quoted(password)} dbname=x", "host=db user=app password=*** dbname=x"),
        (f"host=db user=app password = {_sql_quoted(password)} dbname=x", "host=db user=app password = *** dbname=x"),
    ]


# --- unit: every form -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("dsn", "expected"), [
    ("postgresql://app:s3cret@db:5432/x", "postgresql://app:***@db:5432/x"),
    ("postgres://app:s3cret@db/x", "postgres://app:***@db/x"),
    ("postgresql://app:p@ss@db/x", "postgresql://app:***@db/x"),  # the last @ ends the userinfo
    ("postgresql://app:a:b/c#d?e@db/x", "postgresql://app:***@db/x"),
    ("postgresql://app:p%40ss%2F%3A%23@db/x", "postgresql://app:***@db/x"),
    ("postgresql://app:it's\"so\"@db/x", "postgresql://app:***@db/x"),
    ("postgresql://app:pässwörd@db/x", "postgresql://app:***@db/x"),
    ("postgresql://app:s3cret@h1:5432,h2:5433/x?target_session_attrs=read-write",
     "postgresql://app:***@h1:5432,h2:5433/x?target_session_attrs=read-write"),
    ("postgresql://app:s3cret@[::1]:5432/x", "postgresql://app:***@[::1]:5432/x"),
    ("postgresql://app@db/x", "postgresql://app@db/x"),  # a user and no password: nothing to hide
    ("postgresql://db/x?password=s3cret&sslmode=require", "postgresql://db/x?password=***&sslmode=require"),
    ("postgresql://db/x?sslmode=require&password=s3cret", "postgresql://db/x?sslmode=require&password=***"),
    ("postgresql://db/x?password=a&b c&sslmode=require", "postgresql://db/x?password=***&sslmode=require"),
    ("postgresql://app:s3cret@db/x?sslpassword=k3y", "postgresql://app:***@db/x?sslpassword=***"),
    ("postgresql+asyncpg://app:s3cret@db/x", "postgresql+asyncpg://app:***@db/x"),
    ("http://user:t0ken@node:8545/rpc", "http://user:***@node:8545/rpc"),
    ("host=db user=app password=s3cret dbname=x", "host=db user=app password=*** dbname=x"),
    ("host=db user=app password = s3cret dbname=x", "host=db user=app password = *** dbname=x"),
    ("host=db password='it''s secret' dbname=x", "host=db password=*** dbname=x"),
    ("host=db password='it\\'s secret' dbname=x", "host=db password=*** dbname=x"),
    ("host=db password='' dbname=x", "host=db password=*** dbname=x"),
    ("host=db PASSWORD=s3cret", "host=db PASSWORD=***"),
    ("host=db password='never closed dbname=x", "host=db password=***"),  # unterminated: to the line's end
    ("key 0x" + "ab" * 32, "key <redacted-key>"),
    ("key " + "AB" * 32 + " end", "key <redacted-key> end"),
])
def test_redact_every_form(dsn: str, expected: str) -> None:
    assert redact(dsn) == expected
    assert redact(redact(dsn)) == expected  # idempotent: a redacted line stays as it is


def test_redact_keeps_the_rest_of_the_line() -> None:
    line = ("database postgresql://app:s3cret@127.0.0.1:1/x did not answer within 1s: [Errno 111] "
            "Connect call failed ('127.0.0.1', 1)")
    assert redact(line) == line.replace("s3cret", "***")
    # several DSNs, one per line, and the hex rule of before
    text = "a postgresql://u:one@h/x\nb postgres://v:two@k/y password=three key 0x" + "cd" * 32
    assert redact(text) == "a postgresql://u:***@h/x\nb postgres://v:***@k/y password=*** key <redacted-key>"
    assert redact("no secrets here: http://node:8545/rpc?x=1") == "no secrets here: http://node:8545/rpc?x=1"


def test_ambiguous_text_is_over_redacted_not_leaked() -> None:
    # a space in the userinfo: the end of the URL is a guess, so all of the guessed userinfo goes
    assert redact("postgresql://app:my pass@db/x") == "postgresql://***@db/x"
    assert "s3cret" not in redact("http://node:8545 then postgresql://u:s3cret@db/x")
    assert "s3cret" not in redact("postgresql://u:s3cret@db/x?password=a@b")


def test_a_quoted_password_inside_a_repr() -> None:
    # a dict's repr escapes the quotes (or doubles the backslashes) of a keyword/value DSN inside it
    for password in ("it's \"so\"", "a' b", "x\\ y", "it''s"):
        dsn = "host=db password='" + password.replace("\\", "\\\\").replace("'", "\\'") + "' dbname=x"
        for text in (repr({"dsn": dsn}), json.dumps({"dsn": dsn}), repr(ValueError(dsn))):
            assert redact(text).count("dbname=x") == 1 and password not in redact(text), text


def test_pathological_input_is_redacted_in_linear_time() -> None:
    import time as clock

    for text in ("x" * 100_000, "0x" + "a" * 100_000, "?password=x " * 5000, "password='" * 20_000,
                 "://" * 30_000, "a://" + "@a " * 20_000, "'password': " * 5000):
        started = clock.perf_counter()
        redact(text)
        assert clock.perf_counter() - started < 2, text[:40]


def test_redact_dsn_takes_spaces_in_a_query_password() -> None:
    assert redact_dsn("postgresql://db/x?password=a b c") == "postgresql://db/x?password=***"
    assert redact_dsn("postgresql://app:s3cret@db/x") == "postgresql://app:***@db/x"


# --- unit: nested values ----------------------------------------------------------------------------------
class _Holder:
    def __repr__(self) -> str:
        return "Holder(dsn='postgresql://app:s3cret@db/x')"


def test_nested_event_values_are_redacted() -> None:
    from runner.logs import _redact_event

    event = {
        "event": "connecting to postgresql://app:s3cret@db/x",
        "config": {"url": "postgresql://app:s3cret@db/x", "pools": [{"dsn": "host=db password=s3cret"}]},
        "hosts": ("http://user:s3cret@node:8545", 5),
        "error": ValueError("bad dsn postgresql://app:s3cret@db/x"),
        "holder": _Holder(),
        "password": "s3cret",  # a secret-looking key: masked whatever its value looks like
        "nested": {"api_key": "s3cret", "token": b"s3cret", "count": 3, "ok": True, "none": None},
        "raw": b"postgresql://app:s3cret@db/x",
        "key": "0x" + "ef" * 32,
    }
    redacted = _redact_event(None, "info", event)
    rendered = json.dumps(redacted)
    assert "s3cret" not in rendered and "ef" * 32 not in rendered
    assert redacted["config"]["url"] == "postgresql://app:***@db/x"
    assert redacted["config"]["pools"] == [{"dsn": "host=db password=***"}]
    assert redacted["hosts"] == ("http://user:***@node:8545", 5)
    assert redacted["error"] == "ValueError('bad dsn postgresql://app:***@db/x')"
    assert redacted["nested"] == {"api_key": "***", "token": "***", "count": 3, "ok": True, "none": None}


def test_nesting_is_bounded() -> None:
    deep: list[Any] = ["postgresql://app:s3cret@db/x"]
    for _ in range(5000):  # deeper than repr can go
        deep = [deep]
    cyclic: dict[str, Any] = {"dsn": "postgresql://app:s3cret@db/x"}
    cyclic["self"] = cyclic
    for value in (deep, cyclic):
        assert "s3cret" not in json.dumps(redact_value(value), default=str)


# --- property: any password, every form -------------------------------------------------------------------
@PROPERTY
@given(password=PASSWORDS)
@example(password="p@ss:w/rd#?x")
@example(password="it's \"quoted\" & spaced")
@example(password="x://y@z")
@example(password="password='")
def test_no_password_survives_redaction(password: str) -> None:
    assume("**" not in password)  # the mask itself
    for dsn, expected in _forms(password):
        for wrap in WRAPPERS:
            # a password that is part of the text around it ("5432", "db/x", "timeout") proves nothing
            assume(password not in wrap(expected))
            text = wrap(dsn)
            out = redact(text)
            assert password not in out, (text, out)
            assert quote(password, safe="") not in out or quote(password, safe="") in expected, (text, out)
        assert password not in redact_dsn(dsn)


@PROPERTY
@given(password=PASSWORDS)
def test_plain_passwords_redact_to_exactly_the_skeleton(password: str) -> None:
    """With no delimiter that makes the form ambiguous, the redaction keeps everything else intact."""
    assume(not any(c in password for c in "=:/@&#?'\"\\") and not any(c.isspace() for c in password))
    for dsn, expected in _forms(password):
        assert redact(dsn) == expected, dsn


@settings(max_examples=100, database=None, deadline=None)
@given(password=PASSWORDS.filter(lambda p: "&" not in p))
def test_raw_query_password_in_a_dsn(password: str) -> None:
    dsn = f"postgresql://db/x?sslmode=require&password={password}"
    assume(password not in "postgresql://db/x?sslmode=require&password=***")
    assert password not in redact_dsn(dsn)


# --- stdlib records: asyncpg's traceback as one JSON line ------------------------------------------------
@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state: put structlog and the root logger back after."""
    was_configured = structlog.is_configured()
    old_config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    if was_configured:
        structlog.configure(**old_config)
    else:
        structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def _failing_with_a_dsn() -> BaseException:
    try:
        try:
            raise ConnectionResetError("connection reset while talking to postgresql://app:s3cret@db/x")
        except ConnectionResetError as inner:
            raise RuntimeError("pool floor") from inner
    except RuntimeError as error:
        return error


def test_stdlib_records_are_one_redacted_json_line(capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    configure_logging("json", "info")
    configure_logging("json", "info")  # twice: still one handler, one line per record
    error = _failing_with_a_dsn()
    logging.getLogger("asyncpg.pool").error(
        "Failed to restore the pool connection floor for %s", "postgresql://app:s3cret@db/x",
        exc_info=(type(error), error, error.__traceback__))
    logging.getLogger("asyncpg.pool").debug("below the configured level")
    structlog.get_logger("runner.test").info("ours", dsn={"url": "postgresql://app:s3cret@db/x"})
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 2, lines
    record, ours = (json.loads(line) for line in lines)
    assert record["event"] == "Failed to restore the pool connection floor for postgresql://app:***@db/x"
    assert record["level"] == "error" and record["logger"] == "asyncpg.pool" and "timestamp" in record
    assert "Traceback (most recent call last)" in record["exception"]
    assert "ConnectionResetError" in record["exception"] and "RuntimeError: pool floor" in record["exception"]
    assert ours["dsn"] == {"url": "postgresql://app:***@db/x"}
    assert all("s3cret" not in line for line in lines)


def test_stdlib_level_follows_the_configured_level(capsys: pytest.CaptureFixture[str],
                                                   restore_logging: None) -> None:
    configure_logging("json", "info")
    configure_logging("json", "warning")  # again, with another level: the new one holds
    logging.getLogger("asyncpg").info("dropped")
    logging.getLogger("asyncpg").warning("kept password=s3cret")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert [line["event"] for line in lines] == ["kept password=***"]


def test_a_worker_subprocess_logs_stdlib_records_as_json(tmp_path: Path) -> None:
    """What a deployed process prints: asyncpg's logger, through runner's set-up, in a fresh interpreter."""
    code = (
        "import logging\n"
        "from runner.logs import configure_logging\n"
        "configure_logging('json', 'info')\n"
        "try:\n"
        "    raise OSError('gone: postgresql://app:s3cret@db/x')\n"
        "except OSError:\n"
        "    logging.getLogger('asyncpg.pool').exception('Failed to restore the pool connection floor')\n"
    )
    import subprocess

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    record = json.loads(lines[0])
    assert record["event"] == "Failed to restore the pool connection floor"
    assert "OSError: gone: postgresql://app:***@db/x" in record["exception"]
    assert "s3cret" not in result.stderr


# --- end to end: a failing command prints no password --------------------------------------------------
@pytest.fixture(scope="module")
def bare_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tests' RUNNER_* settings without a database: every command here is meant to fail."""
    return {"RUNNER_HOME": str(tmp_path_factory.mktemp("home")), **FAST_ENV}


def _dsns(password: str) -> list[str]:
    encoded = quote(password, safe="")
    return [
        f"postgresql://app:{encoded}@127.0.0.1:1/x",  # as a user writes it: a closed port
        f"postgresql://app:{password}@127.0.0.1:1/x",  # raw: what asyncpg or the settings make of it
        f"postgresql://app:{encoded}@127.0.0.1:abc/x",  # a port that is not a number
        f"postgresql://app:{password}@127.0.0.1:abc/x",
    ]


def _assert_fails_without(password: str, env: dict[str, str]) -> None:
    forms = {password, quote(password, safe=""), quote(password), json.dumps(password)[1:-1]}

    def status(dsn: str) -> Any:
        return dsn, run_cli(env, "status", RUNNER_DATABASE_URL=dsn, RUNNER_DB_CONNECT_TIMEOUT="1", timeout=60)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(status, _dsns(password)))
    for dsn, result in results:
        output = result.stdout + result.stderr
        assert result.returncode in (1, 2), (dsn, output)
        assert "Traceback" not in output, (dsn, output)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, (dsn, output)
        others = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("error: ")]
        assert all(json.loads(line) for line in others), (dsn, output)  # the rest: JSON log lines
        leaked = [form for form in forms if form in output]
        assert not leaked, (dsn, leaked, output)


@pytest.mark.parametrize("password", NASTY[:6])
def test_failing_command_prints_no_password(password: str, bare_env: dict[str, str]) -> None:
    _assert_fails_without(password, bare_env)


@settings(max_examples=6, database=None, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(password=PASSWORDS.filter(lambda p: len(p) >= 6 and len(set(p)) > 3))
def test_failing_command_prints_no_generated_password(password: str, bare_env: dict[str, str]) -> None:
    _assert_fails_without(password, bare_env)
