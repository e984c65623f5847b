"""Bad input from the CLI and the API: one `error:` line, exit 2, no traceback, nothing written."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import runner
from runner.app import App
from tests.conftest import run_cli

NESTED_1000 = '{"a": ' * 1000 + "1" + "}" * 1000
NESTED_150 = '{"a": ' * 150 + "1" + "}" * 150
BIG_INT = '{"n": 1' + "0" * 5000 + "}"
TWO_KIB = '{"blob": "' + "x" * 2048 + '"}'  # past a 1 KiB RUNNER_MAX_PAYLOAD_BYTES (argv caps one argument at 128 KiB)


async def job_count(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM runner_jobs"))


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-2000:]
    assert lines[0].startswith("error: "), lines
    assert "Traceback" not in stderr
    assert len(lines[0]) < 600, lines[0][:600]  # the bad value is named, not echoed whole
    return lines[0]


CLI_CASES: list[tuple[list[str], str]] = [
    (["enqueue", "noop", "--payload", NESTED_1000], "nest"),
    (["enqueue", "noop", "--payload", NESTED_150], "nests deeper than 100 levels"),
    (["enqueue", "noop", "--payload", BIG_INT], "--payload: not valid JSON"),
    (["enqueue", "noop", "--payload", '{"a": "x\\u0000y"}'], "NUL"),
    (["enqueue", "noop", "--payload", TWO_KIB], "at most 1,024 (RUNNER_MAX_PAYLOAD_BYTES)"),
    (["enqueue", "noop", "--priority", str(2**31)], "priority must be an integer between"),
    (["enqueue", "noop", "--max-attempts", str(2**31)], "max_attempts must be an integer between 1"),
    (["enqueue", "noop", "--delay", "1e15"], "delay must be a number of seconds"),
    (["enqueue", "noop", "--delay", "inf"], "delay must be a number of seconds"),
    (["enqueue", "noop", "--delay", "nan"], "delay must be a number of seconds"),
    (["enqueue", "noop", "--queue", "q" * 10_000], "at most 128 characters"),
    (["enqueue", "noop", "--queue", "a\nb"], "control characters"),
    (["enqueue", "noop", "--dedupe-key", "k" * 5000], "dedupe key"),
    (["enqueue", "noop", "--priority", "high"], "'--priority'"),
    (["enqueue", "k" * 10_000], "(10,000 characters)"),
    (["show", "abc"], "job_id"),
    (["show", "-1"], "-1"),
    (["show", str(2**63)], "ids are integers from 1 to"),
    (["cancel", str(2**63)], "ids are integers from 1 to"),
    (["retry", "0"], "ids are integers from 1 to"),
]


@pytest.mark.parametrize(("args", "fragment"), CLI_CASES, ids=lambda v: str(v)[:40] if isinstance(v, list) else None)
async def test_bad_cli_input_is_one_line_exit_2_and_writes_nothing(
    runner_env: dict[str, str], conn: asyncpg.Connection, args: list[str], fragment: str
) -> None:
    before = await job_count(conn)
    small_limit = {"RUNNER_MAX_PAYLOAD_BYTES": "1024"} if args[-1] == TWO_KIB else {}
    result = run_cli(runner_env, *args, **small_limit)
    assert result.returncode == 2, (result.stdout[-500:], result.stderr[-2000:])
    assert fragment in one_error_line(result.stderr)
    assert await job_count(conn) == before


async def test_bad_jsonl_files_are_one_line_naming_the_line(
    runner_env: dict[str, str], conn: asyncpg.Connection, tmp_path: Path
) -> None:
    cases = {
        b'{"a": 1}\n{"b": "\xff\xfe"}\n': "line 2: not UTF-8",
        b'{"a": 1}\n' + NESTED_1000.encode() + b"\n": "line 2",
        b'{"a": 1}\n' + BIG_INT.encode() + b"\n": "line 2: not valid JSON",
        b'{"a": 1}\n[1, 2]\n': "line 2: the payload must be a JSON object",
    }
    for content, fragment in cases.items():
        path = tmp_path / "jobs.jsonl"
        path.write_bytes(content)
        result = run_cli(runner_env, "enqueue", "noop", "--jsonl", str(path))
        assert result.returncode == 2, result.stderr[-2000:]
        assert fragment in one_error_line(result.stderr)
    assert await job_count(conn) == 0  # the good first lines were not inserted either


async def test_bad_api_input_raises_typed_errors_and_writes_nothing(app: App, conn: asyncpg.Connection) -> None:
    nested: dict[str, Any] = {}
    inner = nested
    for _ in range(150):
        inner["a"] = {}
        inner = inner["a"]
    cases: list[tuple[dict[str, Any], dict[str, Any], type[Exception]]] = [
        (nested, {}, runner.PayloadError),
        ({"blob": "x" * (2 << 20)}, {}, runner.PayloadError),
        ({"n": math.inf}, {}, runner.PayloadError),
        ({"s": "\x00"}, {}, runner.PayloadError),
        ({"o": object()}, {}, runner.PayloadError),
        ({}, {"priority": True}, runner.UsageError),
        ({}, {"delay": -1}, runner.UsageError),
        ({}, {"queue": "tab\there"}, runner.UsageError),
    ]
    for payload, options, error in cases:
        with pytest.raises(error):
            await app.enqueue("noop", payload, **options)
    for bad_id in (0, -5, 2**63, True):
        with pytest.raises(runner.JobNotFound):
            await app.get(bad_id)
    assert await job_count(conn) == 0


async def test_a_payload_python_cannot_decode_is_shown_not_a_crash(
    runner_env: dict[str, str], app: App
) -> None:
    poison = await app.db.fetchval(
        "INSERT INTO runner_jobs (kind, payload) VALUES ('noop', ('{\"n\": 1' || repeat('0', 5000) || '}')::jsonb) "
        "RETURNING id")
    shown = run_cli(runner_env, "show", str(poison), "--json")
    assert shown.returncode == 0, shown.stderr
    assert '"undecodable": "ValueError: Exceeds the limit' in shown.stdout
    listed = run_cli(runner_env, "list", "--json")
    assert listed.returncode == 0 and str(poison) in listed.stdout
    job = await app.get(poison)
    assert job.payload["undecodable"].startswith("ValueError")


@pytest.mark.parametrize(("name", "value"), [("RUNNER_CONSENSUS_LEADER_TIMEOUT", "inf"),
                                             ("RUNNER_CONSENSUS_FINALITY_WINDOW", "nan"),
                                             ("RUNNER_CONSENSUS_TX_STUCK_AFTER", "1e300")])
async def test_plugin_settings_are_finite_and_bounded(runner_env: dict[str, str], name: str, value: str) -> None:
    result = run_cli(runner_env, "status", **{name: value})
    assert result.returncode == 2
    assert one_error_line(result.stderr).startswith(f"error: {name}: ")
