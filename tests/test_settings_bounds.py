"""Settings that cannot work are refused at load, one line naming the variable: non-finite numbers, durations
under a millisecond (PostgreSQL takes timeouts in whole milliseconds) or past what a derived interval can
hold, counts past their column, and DSNs asyncpg cannot parse (without echoing them). Through the CLI: exit 2,
one `error:` line, no traceback, nothing written, at once (no connect-retry loop). A server that refuses a
well-formed DSN (unknown role or database) fails at once too, with exit 1."""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from runner.config import SettingsError, load_settings
from runner.config.dsn import DsnError, check_dsn
from runner.config.settings import MAX_PG_TIMEOUT_S, Settings
from runner.db import session_settings
from tests.conftest import run_cli

# A bad value must fail at once: far under RUNNER_DB_CONNECT_TIMEOUT (30 s, the old retry loop).
QUICK_S = 15
SECRET = "hunter2-s3cr3t"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith("RUNNER_"):
            monkeypatch.delenv(key)
    return monkeypatch


def refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> str:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert name in message, message
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity", "1e400"])
@pytest.mark.parametrize("name", [
    "RUNNER_STATEMENT_TIMEOUT", "RUNNER_LEASE_TIMEOUT", "RUNNER_HEARTBEAT_INTERVAL", "RUNNER_POLL_INTERVAL",
    "RUNNER_DB_CONNECT_TIMEOUT", "RUNNER_IDLE_IN_TRANSACTION_TIMEOUT", "RUNNER_JOB_TIMEOUT", "RUNNER_RETENTION",
    "RUNNER_RETRY_BACKOFF_MAX", "RUNNER_SHUTDOWN_GRACE", "RUNNER_COMPLETION_FLUSH_INTERVAL",
    "RUNNER_CHAIN_RPC_TIMEOUT",
])
def test_non_finite_floats_are_refused(clean_env: pytest.MonkeyPatch, name: str, value: str) -> None:
    message = refused(clean_env, name, value)
    assert "must be a number" in message


def test_every_float_setting_is_finite() -> None:
    """No float field can take inf or nan: the model refuses them, whatever each field's bounds."""
    floats = [name for name, field in Settings.model_fields.items() if "float" in str(field.annotation)]
    assert len(floats) > 20
    for name in floats:
        for value in (float("inf"), float("nan")):
            with pytest.raises(SettingsError, match=f"RUNNER_{name.upper()}"):
                load_settings(**{name: value})


@pytest.mark.parametrize("name", ["RUNNER_STATEMENT_TIMEOUT", "RUNNER_HEARTBEAT_INTERVAL",
                                  "RUNNER_POOL_ACQUIRE_TIMEOUT", "RUNNER_POLL_INTERVAL"])
@pytest.mark.parametrize("value", ["0.0001", "0.0009", "1e-9"])
def test_sub_millisecond_durations_are_refused(clean_env: pytest.MonkeyPatch, name: str, value: str) -> None:
    message = refused(clean_env, name, value)
    assert "from 0.001" in message


def test_statement_timeout_of_a_millisecond_is_one_millisecond(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RUNNER_STATEMENT_TIMEOUT", "0.001")
    assert session_settings(load_settings(), "w")["statement_timeout"] == "1"  # not "0" = no timeout


@pytest.mark.parametrize("value", ["0.0001", "0.0009"])
def test_idle_in_transaction_timeout_is_zero_for_off_or_a_millisecond_at_least(
    clean_env: pytest.MonkeyPatch, value: str
) -> None:
    message = refused(clean_env, "RUNNER_IDLE_IN_TRANSACTION_TIMEOUT", value)
    assert "0 (off)" in message and "milliseconds" in message
    clean_env.setenv("RUNNER_IDLE_IN_TRANSACTION_TIMEOUT", "0")
    assert session_settings(load_settings(), "w")["idle_in_transaction_session_timeout"] == "0"  # documented off


@pytest.mark.parametrize(("name", "value", "allowed"), [
    ("RUNNER_LEASE_TIMEOUT", "1e300", "from 0.001 to 31536000 seconds"),
    ("RUNNER_LEASE_TIMEOUT", "31536001", "to 31536000"),
    ("RUNNER_STATEMENT_TIMEOUT", "2147484", f"to {MAX_PG_TIMEOUT_S:.0f} seconds"),  # past int32 milliseconds
    ("RUNNER_IDLE_IN_TRANSACTION_TIMEOUT", "2147484", f"to {MAX_PG_TIMEOUT_S:.0f}"),
    ("RUNNER_HEARTBEAT_INTERVAL", "1e12", "to 31536000"),
    ("RUNNER_RETRY_BACKOFF_BASE", "1e300", "to 31536000"),
    ("RUNNER_JOB_TIMEOUT", "1e15", "to 31536000"),
    ("RUNNER_RETENTION", "1e300", "to 3153600000"),
    ("RUNNER_CONCURRENCY", "10001", "from 1 to 10000"),
    ("RUNNER_CLAIM_BATCH_SIZE", "100000", "from 1 to 10000"),
    ("RUNNER_DEFAULT_MAX_ATTEMPTS", "2147483648", "from 1 to 2147483647"),  # runner_jobs.max_attempts: int4
    ("RUNNER_MAX_RECOVERIES", "99999999999", "from 0 to 2147483647"),
    ("RUNNER_POOL_MAX_SIZE", "1000000", "to 1000"),
    ("RUNNER_POOL_RETRY_ATTEMPTS", "1000000", "to 1000"),
    ("RUNNER_DB_MAX_CONNECTIONS", "1000000", "to 262143"),
    ("RUNNER_STATEMENT_CACHE_SIZE", "1" * 5000, "from 0 to 100000"),  # past Python's int-digit limit too
])
def test_upper_bounds_name_the_variable_and_the_range(
    clean_env: pytest.MonkeyPatch, name: str, value: str, allowed: str
) -> None:
    message = refused(clean_env, name, value)
    assert allowed in message, message
    assert len(message) < 200, message


def test_the_largest_values_still_make_valid_server_settings(clean_env: pytest.MonkeyPatch) -> None:
    """A year-long lease is allowed; the derived idle-in-transaction timeout is capped at int32 milliseconds."""
    clean_env.setenv("RUNNER_LEASE_TIMEOUT", "31536000")
    clean_env.setenv("RUNNER_HEARTBEAT_INTERVAL", "60")
    clean_env.setenv("RUNNER_STATEMENT_TIMEOUT", str(MAX_PG_TIMEOUT_S))
    values = session_settings(load_settings(), "w")
    for name in ("statement_timeout", "idle_in_transaction_session_timeout"):
        assert 1 <= int(values[name]) <= 2**31 - 1


def test_a_min_pool_size_past_the_derived_max_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    assert "20" in refused(clean_env, "RUNNER_POOL_MIN_SIZE", "50")


BAD_DSNS = [
    pytest.param(f"postgresql://app:{SECRET}@db.example:abc/runner", "not a number", id="non-numeric-port"),
    pytest.param(f"postgresql://app:{SECRET}@db.example:99999/runner", "out of range", id="port-too-big"),
    pytest.param(f"postgresql://app:{SECRET}@db.example:0/runner", "out of range", id="port-zero"),
    pytest.param(f"mysql://app:{SECRET}@db.example/runner", "scheme", id="unknown-scheme"),
    pytest.param(f"http://app:{SECRET}@db.example/runner", "scheme", id="http-scheme"),
    pytest.param("not a url", "postgresql://", id="garbage"),
    pytest.param(SECRET, "postgresql://", id="a-bare-password"),
    pytest.param(f"host=db.example user=app password={SECRET} dbname=runner", "keyword/value", id="keyword-value"),
    pytest.param(f"postgresql://app:{SECRET}@[::1/runner", "valid URL", id="unclosed-ipv6"),
    pytest.param(f"postgresql://app:{SECRET}@[::1]x/runner", "IPv6", id="bad-ipv6"),
    pytest.param(f"postgresql://app:{SECRET}@h1,,h2/runner", "empty host", id="empty-host-in-list"),
    pytest.param(f"postgresql://app:p@{SECRET}@db.example/runner", "%40", id="unencoded-at-in-password"),
    pytest.param(f"postgresql://app:{SECRET}@db.example/runner?sslmode=sometimes", "sslmode", id="bad-sslmode"),
    pytest.param(f"postgresql://app:{SECRET}@db.example/runner?target_session_attrs=x", "target_session_attrs",
                 id="bad-target-session-attrs"),
    pytest.param(f"postgresql:///runner?host=h1,h2,h3&port=1,2&password={SECRET}", "2 ports for 3 hosts",
                 id="port-count"),
    pytest.param(f"postgresql:///runner?host=h1&port=x&password={SECRET}", "not a number", id="query-port"),
    pytest.param(f"postgresql://app:{SECRET}@db.example/runner?sslmode", "query string", id="malformed-query"),
]


@pytest.mark.parametrize(("dsn", "reason"), BAD_DSNS)
@pytest.mark.parametrize("name", ["RUNNER_DATABASE_URL", "RUNNER_LISTEN_DATABASE_URL"])
def test_unparseable_dsns_are_one_line_without_the_password(
    clean_env: pytest.MonkeyPatch, name: str, dsn: str, reason: str
) -> None:
    message = refused(clean_env, name, dsn)
    assert reason in message, message
    assert SECRET not in message and "db.example" not in message  # no part of the DSN is echoed


@pytest.mark.parametrize("dsn", [
    "postgresql://app:pw@db.example:5432/runner",
    "postgres://app:pw@db.example/runner",
    "postgresql://app:p%40ss%3Aw%2Ford@db.example/runner",  # percent-encoded '@', ':' and '/'
    "postgresql://h1:5432,h2:5433,h3/runner?target_session_attrs=read-write",  # multi-host
    "postgresql://[::1]:5432,[fe80::1%25eth0]/runner",
    "postgresql://%2Fvar%2Frun%2Fpostgresql/runner",  # a socket folder
    "postgresql:///runner?host=/tmp&port=5433",
    "postgresql:///runner?host=h1,h2&port=5432,5433&user=app&password=pw",
    "postgresql://app@db.example/runner?sslmode=verify-full&sslrootcert=/etc/ca.pem&application_name=x",
    "postgresql://app@db.example/runner?sslmode=verify_ca&ssl_min_protocol_version=TLSv1.2",
    "postgresql://db.example",
    "postgresql://",
    "",  # no DSN: asyncpg falls back on PGHOST, PGPORT, ... like libpq
])
def test_every_form_asyncpg_parses_is_accepted(clean_env: pytest.MonkeyPatch, dsn: str) -> None:
    check_dsn(dsn)
    clean_env.setenv("RUNNER_DATABASE_URL", dsn)
    assert load_settings().database_url is not None


@pytest.mark.parametrize(("dsn", "reason"), BAD_DSNS)
def test_asyncpg_refuses_what_check_dsn_refuses(dsn: str, reason: str) -> None:
    """check_dsn mirrors asyncpg's parser rather than importing it; each form it refuses fails in asyncpg too
    (or, for an "@" in a host name, a port out of range and text after an IPv6 host's "]", fails at connect or is
    silently ignored)."""
    from asyncpg.connect_utils import _parse_connect_dsn_and_args

    with pytest.raises(DsnError):
        check_dsn(dsn)
    if reason in ("%40", "out of range", "IPv6") or "," in dsn.split("?")[0]:
        return  # parsed by asyncpg, refused at connect (no such host, a port past 65535, an IndexError)
    with pytest.raises((asyncpg.exceptions.ClientConfigurationError, ValueError)):
        _parse_connect_dsn_and_args(
            dsn=dsn, host=None, port=None, user=None, password=None, passfile=None, database=None, ssl=None,
            service=None, servicefile=None, direct_tls=None, server_settings=None, target_session_attrs=None,
            krbsrvname=None, gsslib=None,
        )


@pytest.mark.parametrize(("url", "reason"), [
    ("ws://node:8546", "http"), ("node:8545", "http"), ("http://node:abc", "valid URL"),
    ("http://node:70000", "valid URL"), ("http://", "no host"), ("https://node:0/rpc", "out of range"),
])
def test_chain_url_must_be_an_http_url(clean_env: pytest.MonkeyPatch, url: str, reason: str) -> None:
    assert reason in refused(clean_env, "RUNNER_CHAIN_URL", url)


def test_source_url_is_parsed_at_first_use(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RUNNER_SOURCE_WAREHOUSE_URL", f"postgresql://app:{SECRET}@db.example:abc/w")
    settings = load_settings()  # other commands do not read source URLs: a bad one does not stop them
    with pytest.raises(SettingsError) as caught:
        settings.source_url("warehouse")
    message = str(caught.value)
    assert "RUNNER_SOURCE_WAREHOUSE_URL" in message and "not a number" in message
    assert SECRET not in message and "\n" not in message
    assert settings.source_url("other") is None


# --- through the CLI ------------------------------------------------------------------------------------
async def job_rows(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM runner_jobs"))


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert not [line for line in stderr.splitlines() if line.strip() and not line.startswith("error:")], stderr
    return errors[0]


@pytest.mark.parametrize(("env", "named"), [
    ({"RUNNER_STATEMENT_TIMEOUT": "inf"}, "RUNNER_STATEMENT_TIMEOUT"),
    ({"RUNNER_STATEMENT_TIMEOUT": "0.0001"}, "RUNNER_STATEMENT_TIMEOUT"),
    ({"RUNNER_LEASE_TIMEOUT": "1e300"}, "RUNNER_LEASE_TIMEOUT"),
    ({"RUNNER_DEFAULT_MAX_ATTEMPTS": "9999999999"}, "RUNNER_DEFAULT_MAX_ATTEMPTS"),
    ({"RUNNER_DATABASE_URL": f"postgresql://u:{SECRET}@h:abc/db"}, "RUNNER_DATABASE_URL"),
    ({"RUNNER_DATABASE_URL": "not a url"}, "RUNNER_DATABASE_URL"),
    ({"RUNNER_DATABASE_URL": f"postgresql://u:{SECRET}@127.0.0.1:99999/db"}, "RUNNER_DATABASE_URL"),
    ({"RUNNER_LISTEN_DATABASE_URL": f"mysql://u:{SECRET}@h/db"}, "RUNNER_LISTEN_DATABASE_URL"),
    ({"RUNNER_CHAIN_URL": "http://node:port"}, "RUNNER_CHAIN_URL"),
])
async def test_cli_refuses_a_bad_setting_at_once(
    runner_env: dict[str, str], conn: asyncpg.Connection, env: dict[str, str], named: str
) -> None:
    before = await job_rows(conn)
    result = run_cli(runner_env, "status", timeout=QUICK_S, **env)  # a retry loop would time out here
    assert result.returncode == 2, result.stderr
    line = one_error_line(result.stderr)
    assert named in line and SECRET not in result.stderr + result.stdout
    assert await job_rows(conn) == before


async def test_cli_enqueue_with_a_bad_dsn_writes_nothing(runner_env: dict[str, str], conn: asyncpg.Connection) -> None:
    before = await job_rows(conn)
    result = run_cli(runner_env, "enqueue", "noop", "--payload", "{}", timeout=QUICK_S,
                     RUNNER_DATABASE_URL=f"postgresql://u:{SECRET}@h:abc/db")
    assert result.returncode == 2
    assert "RUNNER_DATABASE_URL" in one_error_line(result.stderr)
    assert await job_rows(conn) == before


async def test_backfill_with_a_garbage_source_url_is_one_line_naming_it(
    runner_env: dict[str, str], conn: asyncpg.Connection
) -> None:
    before = await job_rows(conn)
    for garbage in ("not a url", f"postgresql://app:{SECRET}@db.example:abc/w"):
        result = run_cli(runner_env, "backfill", "public.t", "public.u", "--source", "x", timeout=QUICK_S,
                         RUNNER_SOURCE_X_URL=garbage)
        assert result.returncode == 2, result.stderr
        assert "RUNNER_SOURCE_X_URL" in one_error_line(result.stderr)
        assert SECRET not in result.stderr + result.stdout
    assert await job_rows(conn) == before


def _with_netloc(url: str, netloc: str | None = None, path: str | None = None) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=netloc or parts.netloc, path=path or parts.path))


async def test_a_server_that_refuses_fails_at_once_with_exit_1(
    runner_env: dict[str, str], database_url: str, conn: asyncpg.Connection
) -> None:
    """The DSN parses; the server says no (an unknown role, an unknown database). Waiting cannot change its
    answer: one line at once, exit 1 (a runtime refusal, not a malformed setting), no password."""
    host = urlsplit(database_url).netloc.rpartition("@")[2]
    before = await job_rows(conn)
    for url in (_with_netloc(database_url, f"no_such_role:{SECRET}@{host}"),
                _with_netloc(database_url, path="/no_such_database")):
        result = run_cli(runner_env, "status", timeout=QUICK_S, RUNNER_DATABASE_URL=url)
        assert result.returncode == 1, result.stderr
        line = one_error_line(result.stderr)
        assert "refused the connection" in line and "does not exist" in line, line
        assert SECRET not in result.stderr + result.stdout
    assert await job_rows(conn) == before


async def test_database_open_classifies_without_retrying(database_url: str) -> None:
    """At the pool boundary (any caller, not only settings): a DSN that cannot be parsed is InvalidDsn (exit 2)
    naming where it came from, a refusal is DatabaseRefused (exit 1); neither waits out the connect timeout."""
    import time

    from runner.db import Database, DatabaseRefused, InvalidDsn, RetryPolicy

    def pool(dsn: str) -> Database:
        return Database(dsn, name="t", min_size=1, max_size=2, retry=RetryPolicy(1, 0.01, 0.01, 1, 1),
                        server_settings={}, source="RUNNER_SOURCE_T_URL")

    started = time.monotonic()
    with pytest.raises(InvalidDsn) as bad:
        await pool(f"postgresql://u:{SECRET}@h:abc/db").open(30)
    assert bad.value.exit_code == 2 and "RUNNER_SOURCE_T_URL" in str(bad.value) and SECRET not in str(bad.value)
    with pytest.raises(DatabaseRefused) as no:
        await pool(_with_netloc(database_url, path="/no_such_database")).open(30)
    assert no.value.exit_code == 1 and "does not exist" in str(no.value)
    assert time.monotonic() - started < QUICK_S
