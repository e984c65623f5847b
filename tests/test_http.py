"""The worker's HTTP server against a real worker and a real PostgreSQL: metrics move, health and pool."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runner.app import App
from runner.config import load_settings
from runner.http import HttpServer, HttpServerError
from runner.plugins import Plugin
from runner.queue import NewJob
from runner.worker import Worker
from tests import pg
from tests.conftest import start_worker
from tests.pg import wait_until

# Every family the issue lists (counters are exposed without their _total suffix by the parser).
FAMILIES = {
    "runner_pool_size": "gauge",
    "runner_pool_idle": "gauge",
    "runner_pool_in_use": "gauge",
    "runner_pool_waiters": "gauge",
    "runner_pool_acquire_wait_seconds": "histogram",
    "runner_pool_exhaustion_retries": "counter",
    "runner_pool_give_ups": "counter",
    "runner_jobs_claimed": "counter",
    "runner_jobs_finished": "counter",
    "runner_jobs_recovered": "counter",
    "runner_job_duration_seconds": "histogram",
    "runner_queue_depth": "gauge",
    "runner_heartbeat_lag_seconds": "gauge",
    "runner_chain_rpc_seconds": "histogram",
    "runner_chain_rpc_errors": "counter",
    "runner_chain_rpc_retries": "counter",
    "runner_chain_open_connections": "gauge",
    "runner_consensus_transactions": "gauge",
    "runner_event_loop_lag_seconds": "gauge",
}
HTTP_ENV = {
    "RUNNER_HTTP_ENABLED": "true",
    "RUNNER_HTTP_HOST": "127.0.0.1",
    "RUNNER_HTTP_PORT": "0",
    "RUNNER_POOL_MIN_SIZE": "3",
    "RUNNER_POOL_MAX_SIZE": "7",
    "RUNNER_DEPTH_SAMPLE_INTERVAL": "0.2",
    "RUNNER_CONSENSUS_ENABLED": "false",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url, timeout=aiohttp.ClientTimeout(10)) as response:
        return response.status, await response.text()


async def get_json(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(url, timeout=aiohttp.ClientTimeout(10)) as response:
        return response.status, await response.json()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def families(text: str) -> dict[str, str]:
    return {family.name: family.type for family in text_string_to_metric_families(text)}


@pytest.fixture
async def http_app(runner_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[App]:
    for key, val in HTTP_ENV.items():
        monkeypatch.setenv(key, val)
    app = await App.open(load_settings())
    yield app
    await app.close()


@pytest.fixture
async def worker(http_app: App) -> AsyncIterator[Worker]:
    worker = Worker(http_app, install_signal_handlers=False)
    task = asyncio.create_task(worker.run(), name="worker-under-test")
    await wait_until(lambda: _running(worker, task))
    yield worker
    worker.request_stop()
    await asyncio.wait_for(task, 30)


async def _running(worker: Worker, task: asyncio.Task[None]) -> bool:
    if task.done():
        task.result()  # surface the worker's error instead of a timeout
    return worker.state == "running" and worker.http is not None


async def test_metrics_families_exist_and_move(worker: Worker, http_app: App) -> None:
    assert worker.http is not None
    url = worker.http.url
    status, before = await get(f"{url}/metrics")
    assert status == 200
    found = families(before)
    missing = {name: kind for name, kind in FAMILIES.items() if found.get(name) != kind}
    assert not missing, f"families missing or of the wrong type: {missing}"

    await http_app.queue.job_enqueue_many([NewJob("noop", {"i": i}) for i in range(25)])
    await http_app.queue.job_enqueue(NewJob("fail", {"message": "on purpose", "fatal": True}))

    async def depth_sampled() -> bool:
        _, text = await get(f"{url}/metrics")
        return value(text, "runner_queue_depth", status="succeeded") == 25 \
            and value(text, "runner_queue_depth", status="failed") == 1

    await wait_until(depth_sampled, timeout_s=30)
    _, after = await get(f"{url}/metrics")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("runner_jobs_claimed_total", kind="noop") == 25
    assert delta("runner_jobs_claimed_total", kind="fail") == 1
    assert delta("runner_jobs_finished_total", kind="noop", outcome="succeeded") == 25
    assert delta("runner_jobs_finished_total", kind="fail", outcome="failed") == 1
    assert delta("runner_job_duration_seconds_count", kind="noop") == 25
    assert delta("runner_pool_acquire_wait_seconds_count", pool="runner") > 0
    assert value(after, "runner_pool_size", pool="runner") >= 3
    assert value(after, "runner_pool_max", pool="runner") == 7
    assert value(after, "runner_queue_depth", status="pending") == 0
    assert 0 <= value(after, "runner_heartbeat_lag_seconds") < 30


async def test_running_jobs_gauge_follows_the_executor(worker: Worker, http_app: App) -> None:
    assert worker.http is not None
    url = worker.http.url

    async def running_is(n: int) -> bool:
        _, text = await get(f"{url}/metrics")
        return value(text, "runner_jobs_running") == n

    await http_app.queue.job_enqueue_many([NewJob("sleep", {"seconds": 5}) for _ in range(3)])
    await wait_until(lambda: running_is(3), timeout_s=30)  # read at scrape time from the executor
    await wait_until(lambda: running_is(0), timeout_s=60)


async def test_pool_matches_configured_pool(worker: Worker, http_app: App) -> None:
    assert worker.http is not None
    status, body = await get_json(f"{worker.http.url}/pool")
    assert status == 200
    assert body["pool"] == "runner"
    assert (body["min"], body["max"]) == (3, 7)
    # a live worker: the pool may grow or lend a connection between two reads, so check the invariants
    assert 3 <= body["size"] <= 7
    assert body["in_use"] + body["idle"] == body["size"]
    assert 0 <= body["waiters"] and 0 <= body["peak_in_use"] <= 7
    assert body["give_ups"] == 0
    budget = body["budget"]
    assert budget["derived"] is False
    assert (budget["min_size"], budget["max_size"]) == (3, 7)
    assert budget["db_max_connections"] == http_app.settings.db_max_connections
    assert budget["worker_replicas"] == http_app.settings.worker_replicas


async def test_pool_shows_the_derived_budget(
    runner_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNNER_DB_MAX_CONNECTIONS", "50")
    monkeypatch.setenv("RUNNER_WORKER_REPLICAS", "4")
    settings = load_settings()
    app = await App.open(settings)
    server = await HttpServer(app, host="127.0.0.1", port=0).start()
    try:
        status, body = await get_json(f"{server.url}/pool")
    finally:
        await server.stop()
        await app.close()
    assert status == 200
    # floor(50 x 0.8 / 4) - 1 listener connection = 9
    assert body["max"] == 9 and body["min"] == 2
    assert body["budget"]["derived"] is True
    assert body["budget"]["formula"] == "min(20, floor(50 x 0.8 / 4) - 1) = 9: 2 control + 7 jobs"
    assert body["lanes"] == {"control_reserved": 2, "jobs_max": 7, "jobs_in_use": 0}
    assert (body["budget"]["db_max_connections"], body["budget"]["worker_replicas"]) == (50, 4)


async def test_healthz_turns_503_when_a_loop_is_killed(worker: Worker) -> None:
    assert worker.http is not None
    url = worker.http.url
    status, body = await get_json(f"{url}/healthz")
    assert status == 200, body
    assert body["status"] == "ok" and body["state"] == "running"
    names = {loop["name"] for loop in body["loops"]}
    assert {"fetcher", "heartbeat", "rescuer", "completer", "listener", "depth"} <= names

    rescuer = next(s for s in worker.services if s.name == "rescuer")
    task = worker._tasks[id(rescuer)]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    status, body = await get_json(f"{url}/healthz")
    assert status == 503
    assert body["status"] == "unhealthy"
    assert body["reasons"] == ["worker loop 'rescuer' is not running"]
    assert [loop["alive"] for loop in body["loops"] if loop["name"] == "rescuer"] == [False]
    # the other loops still run: the worker itself did not stop
    assert worker.state == "running"


async def test_readyz_checks_the_database_and_plugin_checks(
    http_app: App, pg_server: pg.TestServer, database_url: str
) -> None:
    async def chain_down(_app: App) -> None:
        raise ConnectionError("chain at http://127.0.0.1:1 refused the connection")

    server = await HttpServer(http_app, host="127.0.0.1", port=0).start()
    try:
        status, body = await get_json(f"{server.url}/readyz")
        assert status == 200, body
        assert body["checks"] == {"database": "ok"}

        http_app.plugins.append(Plugin(name="fakechain", readiness=chain_down))
        status, body = await get_json(f"{server.url}/readyz")
        assert status == 503
        assert body["checks"]["database"] == "ok"
        assert body["checks"]["fakechain"] == "ConnectionError: chain at http://127.0.0.1:1 refused the connection"
        http_app.plugins.pop()

        await pg_server.drop(database_url.rsplit("/", 1)[1])  # the database goes away under the pool
        status, body = await get_json(f"{server.url}/readyz")
        assert status == 503
        assert body["checks"]["database"] != "ok"
        assert body["reasons"][0].startswith("database: ")
    finally:
        await server.stop()


async def test_healthz_reports_event_loop_lag(http_app: App) -> None:
    server = await HttpServer(http_app, host="127.0.0.1", port=0, lag_threshold_s=0.2, lag_window_s=1.0).start()
    try:
        await asyncio.sleep(0.3)
        status, body = await get_json(f"{server.url}/healthz")
        assert status == 200, body
        asyncio.get_running_loop().call_soon(time.sleep, 0.6)  # a blocking call stalls the loop
        await asyncio.sleep(0)
        status, body = await get_json(f"{server.url}/healthz")
        assert status == 503
        assert len(body["reasons"]) == 1 and body["reasons"][0].startswith("event loop lag ")
        assert "RUNNER_LOOP_LAG_THRESHOLD=0.2s" in body["reasons"][0]
        assert body["event_loop_lag_s"] > 0.2

        async def recovered() -> bool:
            return (await get(f"{server.url}/healthz"))[0] == 200

        await wait_until(recovered, timeout_s=10)
    finally:
        await server.stop()


async def test_port_in_use_is_one_clear_error(http_app: App) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(HttpServerError, match=rf"cannot listen on 127\.0\.0\.1:{port} .*RUNNER_HTTP_PORT"):
            await HttpServer(http_app, host="127.0.0.1", port=port).start()


async def test_worker_process_serves_metrics_and_pool(runner_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "worker.log"
    process = start_worker(
        runner_env, log_path=log_path, RUNNER_HTTP_ENABLED="true", RUNNER_HTTP_PORT=str(port),
        RUNNER_POOL_MAX_SIZE="5", RUNNER_POOL_MIN_SIZE="1", RUNNER_CONSENSUS_ENABLED="false",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async def answers() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"worker exited {process.returncode}: {log_path.read_text()[-2000:]}")
            try:
                return (await get(f"{url}/readyz"))[0] == 200
            except aiohttp.ClientError:
                return False

        await wait_until(answers, timeout_s=60, interval_s=0.2)
        status, pool = await get_json(f"{url}/pool")
        assert status == 200 and (pool["min"], pool["max"]) == (1, 5)
        status, text = await get(f"{url}/metrics")
        assert status == 200 and families(text).get("runner_jobs_claimed") == "counter"
        status, health = await get_json(f"{url}/healthz")
        assert status == 200 and health["state"] == "running", health
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 30)
    assert code == 0, log_path.read_text()[-2000:]


async def test_worker_with_its_port_taken_exits_with_one_line_before_claiming(
    app: App, runner_env: dict[str, str]
) -> None:
    from runner.queue import NewJob
    from tests.conftest import run_cli

    [job_id] = await app.queue.job_enqueue_many([NewJob("noop", {})])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(runner_env, "worker", RUNNER_HTTP_ENABLED="true", RUNNER_HTTP_PORT=str(port))
    assert result.returncode == 1
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"cannot listen on 127.0.0.1:{port}" in line and "RUNNER_HTTP_PORT" in line
    row = await app.queue.job_get(job_id)
    assert (row["status"], row["lease_epoch"]) == ("pending", 0)  # nothing was claimed
