"""`runner demo` end to end from nothing set (embedded PostgreSQL, in-process chain), and the operate plugin."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from runner.app import App
from runner.embedded import EmbeddedPostgres
from runner.http import HttpServer
from runner.jobs.consensus import metrics
from runner.jobs.consensus.model import new_submission
from runner.jobs.consensus.store import ConsensusStore
from runner.jobs.demo import COPY_TABLE, SOURCE_TABLE, contract_addresses, sample_consensus_metrics
from tests.conftest import ROOT, run_cli
from tests.pg import wait_until

URL_LINE = re.compile(r"live metrics: (http://\S+)/metrics")


@pytest.fixture
def fresh_home() -> Iterator[Path]:
    """A RUNNER_HOME the embedded server's unprivileged user can enter (pytest's tmp dirs are 0700)."""
    home = Path(tempfile.mkdtemp(prefix="runner-demo-"))
    home.chmod(0o755)
    yield home / ".runner"
    try:
        EmbeddedPostgres(home / ".runner").stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def nothing_set(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    return {**env, "RUNNER_HOME": str(home), "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}


def fetch(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode()


async def test_demo_runs_end_to_end_from_nothing_set(fresh_home: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "runner", "demo", "--rows", "2000", "--transactions", "10"],
        cwd=fresh_home.parent, env=nothing_set(fresh_home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    url: str | None = None
    scraped: dict[str, str] = {}
    try:
        while url is None:
            line = await asyncio.to_thread(process.stdout.readline)
            if not line:
                break
            lines.append(line)
            if match := URL_LINE.search(line):
                url = match.group(1)
        assert url, "".join(lines) + (process.stderr.read() if process.stderr else "")
        # while the demo runs, its worker serves /metrics and /pool
        for path in ("/metrics", "/pool", "/healthz"):
            status, body = await asyncio.to_thread(fetch, url + path)
            assert status == 200, (path, body)
            scraped[path] = body
        out, err = await asyncio.to_thread(process.communicate, timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = "".join(lines) + out
    assert process.returncode == 0, output + err
    assert re.search(r"rows copied\s+│\s+2,000 of 2,000 \(backfill job succeeded\)", output), output
    assert re.search(r"transactions finalized\s+│\s+10 of 10\s", output), output
    assert re.search(r"peak pool connections\s+│\s+[1-9]\d* in use, \d+ open, max \d+", output), output
    assert re.search(r"peak chain connections\s+│\s+0 of at most 4 \(in-process", output), output
    assert re.search(rf"metrics were at\s+│\s+{re.escape(url)}/metrics\s", output), output
    assert "# TYPE runner_pool_in_use gauge" in scraped["/metrics"]
    assert '"budget"' in scraped["/pool"]

    # what the summary claims is in the database
    connection = await asyncpg.connect(EmbeddedPostgres(fresh_home).url())
    try:
        assert await connection.fetchval(f"SELECT count(*) FROM {COPY_TABLE}") == 2000
        differences = await connection.fetchval(
            f"SELECT count(*) FROM ((TABLE {SOURCE_TABLE} EXCEPT TABLE {COPY_TABLE}) "
            f"UNION ALL (TABLE {COPY_TABLE} EXCEPT TABLE {SOURCE_TABLE})) d")
        assert differences == 0
        statuses = await connection.fetch(
            "SELECT status, count(*) AS n, count(DISTINCT to_address) AS contracts "
            "FROM runner_consensus_transactions GROUP BY status")
        assert [(r["status"], r["n"], r["contracts"]) for r in statuses] == [("FINALIZED", 10, 5)]
        job = await connection.fetchrow("SELECT status, progress_done FROM runner_jobs WHERE kind = 'backfill'")
        assert (job["status"], job["progress_done"]) == ("succeeded", 2000)
    finally:
        await connection.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rows", "-1"], "error: --rows must not be negative, got -1"),
        (["--contracts", "0"], "error: --contracts must be positive, got 0"),
    ],
)
def test_demo_rejects_bad_sizes(runner_env: dict[str, str], args: list[str], message: str) -> None:
    result = run_cli(runner_env, "demo", *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [message]


def test_demo_needs_consensus_for_transactions(runner_env: dict[str, str]) -> None:
    result = run_cli(runner_env, "demo", "--rows", "10", RUNNER_CONSENSUS_ENABLED="false")
    assert result.returncode == 2
    assert "RUNNER_CONSENSUS_ENABLED is false" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_operate_plugin_samples_consensus_gauges(
    runner_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, app: App, conn: asyncpg.Connection
) -> None:
    monkeypatch.setenv("RUNNER_CONSENSUS_ENABLED", "true")  # the suite's default is off; read at first use
    store = ConsensusStore(app)
    sender, target = contract_addresses(2)
    hashes = await store.insert([new_submission(sender, target, {"op": "set", "key": f"k{i}", "value": i})
                                 for i in range(3)])
    # one of them decided 30 s ago and still not final: 30 s / the 5 s finality window = 6 windows
    await conn.execute(
        "UPDATE runner_consensus_transactions SET status = 'ACCEPTED', "
        "timestamp_awaiting_finalization = now() - interval '30 seconds' WHERE hash = $1", hashes[0])
    await sample_consensus_metrics(app)
    assert metrics.CONSENSUS_TRANSACTIONS.labels("PENDING")._value.get() == 2
    assert metrics.CONSENSUS_TRANSACTIONS.labels("ACCEPTED")._value.get() == 1
    assert metrics.CONSENSUS_TRANSACTIONS.labels("FINALIZED")._value.get() == 0
    ratio = metrics.CONSENSUS_NONFINAL_AGE_RATIO._value.get()
    assert 6 <= ratio < 7, ratio

    # the HTTP server runs the sampler on RUNNER_DEPTH_SAMPLE_INTERVAL, not per scrape
    await conn.execute("UPDATE runner_consensus_transactions SET status = 'FINALIZED' WHERE hash = $1", hashes[0])
    app._settings = app.settings.model_copy(update={"depth_sample_interval": 0.1})
    server = await HttpServer(app, host="127.0.0.1", port=0).start()
    try:
        async def sampled() -> bool:
            _, text = await asyncio.to_thread(fetch, f"{server.url}/metrics")
            return 'runner_consensus_transactions{status="FINALIZED"} 1.0' in text \
                and "runner_consensus_nonfinal_age_window_ratio 0.0" in text

        await wait_until(sampled, timeout_s=10)
    finally:
        await server.stop()


def test_demo_is_the_operate_plugins_command() -> None:
    result = subprocess.run([sys.executable, "-m", "runner", "demo", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={k: v for k, v in os.environ.items()
                                                        if not k.startswith("RUNNER_")})
    assert result.returncode == 0, result.stderr
    for flag in ("--rows", "--transactions", "--contracts", "--timeout"):
        assert flag in result.stdout
