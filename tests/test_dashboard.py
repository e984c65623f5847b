"""The web dashboard at the HTTP level, against a real database holding jobs in every state: every page and
its JSON twin answer; user data is escaped and secrets masked; a POST without a valid CSRF token, from
another origin, or in read-only mode changes nothing; authentication by token, login cookie and basic auth;
a bind beyond loopback without authentication is refused by the command (exit 2)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from runner import queue_sql
from runner.app import App
from runner.config import load_settings
from runner.dashboard import Auth, DashboardBindError, build
from runner.dashboard import data as dashboard_data
from runner.dashboard.security import CSP, auth_from_settings
from runner.http import HttpServer
from runner.queue import JobOutcome
from runner.worker import Worker
from tests.conftest import ROOT, cli_env, run_cli
from tests.pg import wait_until

TOKEN = "t0ken-for-the-dashboard-test"
PASSWORD = "basic-auth-password-123"
SECRET_IN_ERROR = "hunter2hunter2"
MARKUP = '<script>alert("x")</script><img src=x onerror=alert(1)>'
TX_HASH = "0x" + "ab" * 32
CHAIN_TX = "0x" + "cd" * 32
CONTRACT = "0x" + "12" * 20
PAGES = ("/", "/jobs", "/jobs?status=failed", "/jobs?error=boom", "/jobs?kind=noop&queue=default&limit=2",
         "/backfills", "/schedules", "/consensus", f"/consensus/{TX_HASH}")
APIS = ("/api/overview", "/api/jobs", "/api/jobs?status=running", "/api/backfills", "/api/schedules",
        "/api/consensus", f"/api/consensus/{TX_HASH}")
ODD_SCHEDULE = "team/a & b <x>"  # a slash, an ampersand and markup in a name
CSRF_INPUT = re.compile(r'name="csrf" value="([0-9a-f]{64})"')


@dataclass
class Jobs:
    """The jobs the dashboard is looked at with, one per state (ids)."""

    pending: int
    delayed: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    backfill: int
    chunks: list[int]

    def all(self) -> list[int]:
        return [self.pending, self.delayed, self.running, self.succeeded, self.failed, self.cancelled,
                self.backfill, *self.chunks]


async def set_state(conn: asyncpg.Connection, job_id: int, status: str, **columns: Any) -> None:
    assignments = ["status = $2"] + [f"{name} = ${i}" for i, name in enumerate(columns, start=3)]
    if status in ("succeeded", "failed", "cancelled"):
        assignments.append("finished_at = now()")
    if status in ("running", "succeeded", "failed"):
        assignments.append("started_at = now() - interval '10 seconds'")
    await conn.execute(f"UPDATE runner_jobs SET {', '.join(assignments)} WHERE id = $1", job_id, status,
                       *columns.values())


@pytest.fixture
async def jobs(app: App, conn: asyncpg.Connection) -> Jobs:
    pending = await app.enqueue("noop", {"note": MARKUP, "nested": {"list": [1, 2, MARKUP]}})
    delayed = await app.enqueue("noop", {"when": "later"}, delay=3600)
    running = await app.enqueue("noop", {"n": 1})
    await set_state(conn, running, "running", lease_owner="worker-a", lease_epoch=3, progress_done=40,
                    progress_total=100, lease_expires_at=None, checkpoint='{"after": 40}')
    await conn.execute("UPDATE runner_jobs SET lease_expires_at = now() + interval '30 s' WHERE id = $1", running)
    succeeded = await app.enqueue("noop", {"n": 2})
    await set_state(conn, succeeded, "succeeded", result='{"copied": 7}')
    failed = await app.enqueue("noop", {"n": 3})
    error = (f"Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: boom {MARKUP} "
             f"connecting to postgresql://app:{SECRET_IN_ERROR}@db.internal:5432/prod")
    await set_state(conn, failed, "failed", attempts=5, last_error=error)
    cancelled = await app.enqueue("noop", {"n": 4})
    await set_state(conn, cancelled, "cancelled", last_error="cancelled before it ran")
    backfill = await app.enqueue("noop", {"source": "default", "source_table": "public.src", "dest": "default",
                                          "dest_table": "public.dst", "parallel": 2})
    await conn.execute("UPDATE runner_jobs SET kind = 'backfill' WHERE id = $1", backfill)
    await set_state(conn, backfill, "running", lease_owner="worker-a", lease_epoch=1)
    chunks = []
    for n, (after, upto) in enumerate(((None, 500), (500, None))):
        chunk = await conn.fetchval(
            "INSERT INTO runner_jobs (kind, payload, parent_id) VALUES ('backfill_chunk', $1::text::jsonb, $2) "
            "RETURNING id", json.dumps({"chunk": {"after": after, "upto": upto}}), backfill)
        await set_state(conn, chunk, "running", lease_owner="worker-a", lease_epoch=1, progress_done=100 * (n + 1),
                        progress_total=500)
        chunks.append(chunk)
    await conn.execute("INSERT INTO runner_workers (id, host, pid, queues, concurrency, pool) "
                       "VALUES ('worker-a', 'host-1', 4242, 'default,backfill', 200, $1::jsonb)", json.dumps(
                           {"size": 5, "max": 20, "in_use": 3, "waiters": 2, "peak_in_use": 4,
                            "exhaustion_retries": 7, "give_ups": 0}))
    await app.add_schedule("nightly", "noop", cron="0 3 * * *", payload={"n": 5})
    await app.add_schedule(ODD_SCHEDULE, "noop", every=3600)
    await conn.execute(
        "INSERT INTO runner_consensus_transactions (hash, status, from_address, to_address, input, leader, votes, "
        "activated_at, activated_event_tx, proposed_event_tx) VALUES ($1, 'PROPOSING', $2, $3, $4::text::jsonb, "
        "$2, $5::text::jsonb, now(), $6, $6)",
        TX_HASH, "0x" + "34" * 20, CONTRACT, json.dumps({"method": "set", "note": MARKUP}),
        json.dumps({"0xv1": "agree"}), CHAIN_TX)
    return Jobs(pending, delayed, running, succeeded, failed, cancelled, backfill, chunks)


Factory = Callable[..., Any]


@pytest.fixture
async def dashboard(app: App) -> AsyncIterator[Factory]:
    """dashboard(auth=..., read_only=...): a client of a dashboard on a real port, over real HTTP."""
    clients: list[TestClient[Any, Any]] = []

    async def make(auth: Auth | None = None, read_only: bool = False) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = TestClient(TestServer(build(app, auth or Auth(), read_only)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def csrf_of(client: TestClient[Any, Any], path: str = "/jobs", **kwargs: Any) -> str:
    response = await client.get(path, **kwargs)
    assert response.status == 200, await response.text()
    match = CSRF_INPUT.search(await response.text())
    assert match, "no CSRF field on the page"
    return match.group(1)


async def status_of(conn: asyncpg.Connection, job_id: int) -> str:
    return str(await conn.fetchval("SELECT status FROM runner_jobs WHERE id = $1", job_id))


async def test_every_page_and_its_json_answer(dashboard: Factory, jobs: Jobs) -> None:
    client = await dashboard()
    for path in (*PAGES, *(f"/jobs/{job_id}" for job_id in jobs.all())):
        response = await client.get(path)
        body = await response.text()
        assert response.status == 200, (path, body[:2000])
        assert response.headers["Content-Security-Policy"] == CSP
        assert "script-src 'self'" in CSP and "frame-ancestors 'none'" in CSP and "unsafe-inline" not in CSP
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "same-origin"
        assert response.headers["Content-Type"].startswith("text/html")
    for path in APIS:
        response = await client.get(path)
        assert response.status == 200, (path, await response.text())
        assert response.headers["Content-Type"].startswith("application/json")
        await response.json()
    for asset in ("/static/dashboard.js", "/static/dashboard.css"):
        response = await client.get(asset)
        assert response.status == 200 and response.headers["X-Content-Type-Options"] == "nosniff"


async def test_pages_show_the_data(dashboard: Factory, jobs: Jobs, conn: asyncpg.Connection) -> None:
    client = await dashboard()
    overview = await (await client.get("/api/overview")).json()
    assert overview["counts"]["jobs"] == {"pending": 1, "delayed": 1, "running": 4, "succeeded": 1, "failed": 1,
                                          "cancelled": 1}
    assert overview["counts"]["estimated"] == []
    assert len(overview["throughput"]) == 60 and overview["chart"]["succeeded"] == 1
    assert overview["chart"]["failed"] == 1 and overview["chart"]["cancelled"] == 1
    (worker,) = overview["workers"]
    assert (worker["id"], worker["concurrency"], worker["running"], worker["live"]) == ("worker-a", 200, 4, True)
    assert (worker["pool_in_use"], worker["pool_size"], worker["pool_max"], worker["pool_waiters"],
            worker["pool_exhaustion_retries"]) == (3, 5, 20, 2, 7)
    home = await (await client.get("/")).text()
    assert '<span data-bind="pool_in_use" data-format="num">3</span> / <span data-bind="pool_size"' in home
    assert {row["id"] for row in overview["running"]} == {jobs.running, jobs.backfill, *jobs.chunks}
    assert [row["id"] for row in overview["recent"]][:2] == [jobs.chunks[1], jobs.chunks[0]]

    listed = await (await client.get("/api/jobs?status=failed&status=cancelled")).json()
    assert [job["id"] for job in listed["jobs"]] == [jobs.cancelled, jobs.failed]
    by_error = await (await client.get("/api/jobs?error=BOOM")).json()
    assert [job["id"] for job in by_error["jobs"]] == [jobs.failed]
    wildcard = await (await client.get("/api/jobs?error=%25")).json()  # a literal %, not LIKE's wildcard
    assert wildcard["jobs"] == []
    first = await (await client.get("/api/jobs?limit=3")).json()
    second = await (await client.get(f"/api/jobs?limit=3&before_id={first['next_before_id']}")).json()
    seen = [job["id"] for job in first["jobs"] + second["jobs"]]
    assert seen == sorted(jobs.all(), reverse=True)[:6] and first["next_before_id"] == first["jobs"][-1]["id"]
    page = await (await client.get("/jobs?limit=3")).text()
    assert f'href="/jobs?limit=3&amp;before_id={first["next_before_id"]}"' in page

    detail = await (await client.get(f"/api/jobs/{jobs.running}")).json()
    assert detail["job"]["lease_owner"] == "worker-a" and detail["job"]["lease_epoch"] == 3
    assert detail["job"]["checkpoint"] == {"after": 40} and detail["rows_per_s"] > 0 and detail["eta_s"] > 0
    assert [e["event"] for e in detail["timeline"]] == ["created", "runnable from", "started", "lease expires"]
    page = await (await client.get(f"/jobs/{jobs.running}")).text()
    assert 'value="40" max="100"' in page and "worker-a" in page and 'id="cancel"' in page
    succeeded = await (await client.get(f"/jobs/{jobs.succeeded}")).text()
    assert "&#34;copied&#34;: 7" in succeeded

    backfills = await (await client.get("/api/backfills")).json()
    (running,) = backfills["running"]
    assert running["id"] == jobs.backfill and running["source"] == "default:public.src"
    assert (running["progress_done"], running["progress_total"]) == (300, 1000)  # summed over its chunks
    assert [c["id"] for c in running["chunks"]] == jobs.chunks and running["chunks"][1]["chunk"] == {
        "after": 500, "upto": None}
    assert running["rows_per_s"] > 0
    page = await (await client.get("/backfills")).text()
    assert f'id="chunks-{jobs.backfill}"' in page and "&gt; 500" in page and "&lt;= 500" in page

    schedules = await (await client.get("/api/schedules")).json()
    assert [(s["name"], s["paused"], s["rule"]) for s in schedules["schedules"]] == [
        ("nightly", False, "cron 0 3 * * * (UTC)"), (ODD_SCHEDULE, False, "every 3600s")]

    consensus = await (await client.get("/api/consensus")).json()
    assert consensus["present"] and consensus["by_contract"] == {CONTRACT: {"PROPOSING": 1}}
    tx = await (await client.get(f"/api/consensus/{TX_HASH}")).json()
    assert [(e["event"], e["chain_tx"]) for e in tx["timeline"] if e["chain_tx"]] == [
        ("activated event", CHAIN_TX), ("proposed event", CHAIN_TX)]
    page = await (await client.get(f"/consensus/{TX_HASH}")).text()
    assert CHAIN_TX in page and "0xv1" in page
    # a column the dashboard does not name is shown too (a later consensus revision's, say)
    await conn.execute("ALTER TABLE runner_consensus_transactions ADD COLUMN dashboard_probe text DEFAULT '<b>7</b>'")
    tx = await (await client.get(f"/api/consensus/{TX_HASH}")).json()
    assert tx["transaction"]["other_columns"]["dashboard_probe"] == "<b>7</b>"
    page = await (await client.get(f"/consensus/{TX_HASH}")).text()
    assert "<dt>dashboard_probe</dt><dd>&lt;b&gt;7&lt;/b&gt;</dd>" in page
    missing = await client.get(f"/consensus/0x{'00' * 32}")
    assert missing.status == 404
    assert (await client.get("/jobs/999999999")).status == 404
    assert (await client.get("/jobs/abc")).status == 404
    assert (await client.get("/jobs?status=nope")).status == 400


async def attempt_log(conn: asyncpg.Connection, job_id: int) -> list[dict[str, Any]]:
    log = json.loads(await conn.fetchval("SELECT attempt_log::text FROM runner_jobs WHERE id = $1", job_id))
    assert isinstance(log, list)
    return log


async def test_each_attempt_is_recorded_by_the_statement_that_ends_it(
    app: App, dashboard: Factory, conn: asyncpg.Connection
) -> None:
    """A real worker runs a job that fails twice then fails for good, and one that succeeds in its own
    transaction (ctx.complete_in); the rescuer's and the hand-back's statements end attempts too. Each
    attempt is in the job's attempt log, and on its page."""
    worker_id = app.settings.worker_id
    failing = await app.enqueue("fail", {"message": f"boom {MARKUP}\nsecond line"}, max_attempts=3)
    recorded = await app.enqueue("record", {})
    worker = Worker(app, queues=["default"], install_signal_handlers=False, serve_http=False)
    running = asyncio.create_task(worker.run())
    try:
        async def finished() -> bool:
            return {await status_of(conn, failing), await status_of(conn, recorded)} == {"failed", "succeeded"}

        await wait_until(finished, timeout_s=60)
    finally:
        worker.request_stop()
        await asyncio.wait_for(running, 30)
    log = await attempt_log(conn, failing)
    assert [(a["attempt"], a["outcome"], a["status"], a["worker"], a["lease_epoch"]) for a in log] == [
        (1, "error", "pending", worker_id, 1), (2, "error", "pending", worker_id, 2),
        (3, "error", "failed", worker_id, 3)]
    assert all(a["error"] == f"tests.kinds.JobFailed: boom {MARKUP}" for a in log)  # the first line only
    assert all(a["started_at"] <= a["finished_at"] for a in log)
    # a first attempt that succeeds is not logged (the hot path writes no jsonb): the page derives it
    assert await attempt_log(conn, recorded) == []

    # the rescuer: a lease that expired
    lost = await app.enqueue("noop", {})
    [claimed] = await app.queue.job_claim(["default"], 1, "gone-worker", 30, ["noop"])
    await conn.execute("UPDATE runner_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1", lost)
    assert [r.job_id for r in await app.queue.job_rescue_stale(3)] == [lost]
    [rescued] = await attempt_log(conn, lost)
    assert (rescued["outcome"], rescued["status"], rescued["worker"], rescued["lease_epoch"]) == (
        "recovered", "pending", "gone-worker", claimed.lease_epoch)
    assert rescued["error"].startswith("lease of gone-worker expired at ")
    # handed back: a claim this worker does not run, and a release (PoolExhausted) through COMPLETE
    [again] = await app.queue.job_claim(["default"], 1, "other-worker", 30, ["noop"])
    assert [r.job_id for r in await app.queue.job_release_owned_except("other-worker", [])] == [lost]
    [third] = await app.queue.job_claim(["default"], 1, "other-worker", 30, ["noop"])
    await app.queue.job_complete_many([JobOutcome(lost, third.lease_epoch, "noop", "released")])
    assert [(a["outcome"], a["status"], a["lease_epoch"], a["attempt"]) for a in await attempt_log(conn, lost)] == [
        ("recovered", "pending", claimed.lease_epoch, 1), ("handed back", "pending", again.lease_epoch, 2),
        ("handed back", "pending", third.lease_epoch, 2)]

    client = await dashboard()
    detail = await (await client.get(f"/api/jobs/{failing}")).json()
    assert [(a["attempt"], a["outcome"], a["status"]) for a in detail["attempts"]] == [
        (1, "error", "pending"), (2, "error", "pending"), (3, "error", "failed")]
    assert all(a["duration_s"] is not None and a["duration_s"] >= 0 for a in detail["attempts"])
    derived = (await (await client.get(f"/api/jobs/{recorded}")).json())["attempts"]
    assert [(a["attempt"], a["outcome"], a["status"]) for a in derived] == [(1, "succeeded", "succeeded")]
    assert derived[0]["duration_s"] is not None and derived[0]["duration_s"] >= 0
    page = await (await client.get(f"/jobs/{failing}")).text()
    table = page[page.index('<table id="attempts">'):page.index('<template id="tpl-attempt">')]
    assert table.count("<tr>") == 4 and f'<td data-bind="worker">{worker_id}</td>' in table  # a head and three attempts
    assert "JobFailed: boom &lt;script&gt;" in table and "<script>" not in table and "second line" not in table
    # the attempt running now is the last row, with no end
    [now_running] = await app.queue.job_claim(["default"], 1, "other-worker", 30, ["noop"])
    detail = await (await client.get(f"/api/jobs/{lost}")).json()
    assert [(a["outcome"], a["finished_at"], a["lease_epoch"]) for a in detail["attempts"]][-1] == (
        "running", None, now_running.lease_epoch)


async def test_the_attempt_log_keeps_the_newest_entries_only(app: App, conn: asyncpg.Connection) -> None:
    job_id = await app.enqueue("noop", {})
    old = [{"attempt": n, "outcome": "handed back"} for n in range(1, 41)]  # more than the cap, say an old limit
    await conn.execute("UPDATE runner_jobs SET attempt_log = $2::text::jsonb WHERE id = $1", job_id, json.dumps(old))
    [claimed] = await app.queue.job_claim(["default"], 1, "w", 30, ["noop"])
    await app.queue.job_complete_many([JobOutcome(job_id, claimed.lease_epoch, "noop", "succeeded")])
    log = await attempt_log(conn, job_id)
    assert len(log) == queue_sql.ATTEMPT_LOG_LIMIT == 25
    assert [a["attempt"] for a in log[:-1]] == list(range(17, 41)) and log[-1]["outcome"] == "succeeded"


async def test_a_search_no_index_serves_pages_through_windows_of_ids(
    dashboard: Factory, jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dashboard_data, "SEARCH_WINDOW", 3)
    client = await dashboard()
    noop = sorted({jobs.pending, jobs.delayed, jobs.running, jobs.succeeded, jobs.failed, jobs.cancelled},
                  reverse=True)
    for query, expected in (("kind=noop", noop), ("error=boom", [jobs.failed]),
                            ("status=succeeded&status=cancelled", [jobs.cancelled, jobs.succeeded])):
        seen: list[int] = []
        pages: list[dict[str, Any]] = []
        path: str | None = f"/api/jobs?{query}&limit=2"
        while path is not None:
            page = await (await client.get(path)).json()
            pages.append(page)
            seen += [job["id"] for job in page["jobs"]]
            path = None if page["next_before_id"] is None else (
                f"/api/jobs?{query}&limit=2&before_id={page['next_before_id']}")
        assert seen == expected, (query, pages)
        assert all(len(page["jobs"]) <= 2 for page in pages) and pages[-1]["next_before_id"] is None
    # the first window (the 3 newest ids: the backfill and its chunks) holds no noop job: said, and paged on
    first = await (await client.get("/jobs?kind=noop&limit=2")).text()
    assert 'id="no-match"' in first and f"among ids from {jobs.backfill}" in first and 'rel="next"' in first
    # an index serves unfinished statuses: no window, every match on one page
    running = await (await client.get("/api/jobs?status=running")).json()
    assert len(running["jobs"]) == 4 and running["searched_from"] is None


async def test_user_data_is_rendered_inert_and_secrets_masked(dashboard: Factory, jobs: Jobs) -> None:
    client = await dashboard()
    pages = ["/", "/jobs", f"/jobs/{jobs.pending}", f"/jobs/{jobs.failed}", f"/consensus/{TX_HASH}"]
    for path in pages:
        body = await (await client.get(path)).text()
        # the only script is the vendored file; no markup from the data survives as markup
        assert re.findall(r"<script[^>]*>", body) == ['<script src="/static/dashboard.js" defer>'], path
        assert "<img" not in body and "onerror=alert" not in body.replace("onerror=alert(1)&gt;", ""), path
        assert SECRET_IN_ERROR not in body, path
    pending = await (await client.get(f"/jobs/{jobs.pending}")).text()
    assert r"&lt;script&gt;alert(\&#34;x\&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in pending
    failed = await (await client.get(f"/jobs/{jobs.failed}")).text()
    assert "Traceback (most recent call last):" in failed and "RuntimeError: boom &lt;script&gt;" in failed
    listed = await (await client.get("/api/jobs?status=failed")).json()
    assert SECRET_IN_ERROR not in json.dumps(listed) and "postgresql://app:" in listed["jobs"][0]["last_error"]
    detail = await (await client.get(f"/api/jobs/{jobs.failed}")).json()
    assert SECRET_IN_ERROR not in json.dumps(detail)


async def test_a_post_without_a_valid_csrf_token_changes_nothing(
    dashboard: Factory, jobs: Jobs, conn: asyncpg.Connection
) -> None:
    client = await dashboard()
    token = await csrf_of(client)
    for data in ({}, {"csrf": "0" * 64}, {"csrf": ""}):
        response = await client.post(f"/jobs/{jobs.pending}/cancel", data=data, allow_redirects=False)
        assert response.status == 403, await response.text()
        response = await client.post("/jobs/bulk", data={**data, "action": "retry", "ids": [str(jobs.failed)]},
                                     allow_redirects=False)
        assert response.status == 403
    assert (await client.post(f"/api/jobs/{jobs.pending}/cancel")).status == 403
    # a valid token from another origin
    response = await client.post(f"/jobs/{jobs.pending}/cancel", data={"csrf": token},
                                 headers={"Origin": "http://evil.example"}, allow_redirects=False)
    assert response.status == 403
    # the token of another browser (another CSRF cookie) is not this one's
    other = await dashboard()
    response = await other.post(f"/jobs/{jobs.pending}/cancel", data={"csrf": token}, allow_redirects=False)
    assert response.status == 403
    assert await status_of(conn, jobs.pending) == "pending" and await status_of(conn, jobs.failed) == "failed"

    response = await client.post(f"/jobs/{jobs.pending}/cancel", data={"csrf": token}, allow_redirects=False,
                                 headers={"Origin": "null"})
    assert response.status == 403
    # this site's own origin, also behind a proxy that ends TLS (scheme https, X-Forwarded-Host)
    own = f"https://{client.host}:{client.port}"
    response = await client.post(f"/jobs/{jobs.pending}/cancel", data={"csrf": token}, allow_redirects=False,
                                 headers={"Origin": own})
    assert response.status == 303 and response.headers["Location"] == f"/jobs/{jobs.pending}?notice=cancelled"
    assert await status_of(conn, jobs.pending) == "cancelled"
    response = await client.post(f"/jobs/{jobs.running}/cancel", data={"csrf": token}, allow_redirects=False,
                                 headers={"Origin": "https://dash.example", "X-Forwarded-Host": "dash.example"})
    assert response.status == 303
    assert await conn.fetchval("SELECT cancel_requested FROM runner_jobs WHERE id = $1", jobs.running)
    response = await client.post(f"/jobs/{jobs.succeeded}/cancel", data={"csrf": token})
    assert response.status == 409 and "already finished" in await response.text()
    response = await client.post("/jobs/bulk", data={"csrf": token, "action": "retry", "next": "/jobs",
                                                     "ids": [str(jobs.failed), str(jobs.cancelled)]},
                                 allow_redirects=False)
    assert response.status == 303 and response.headers["Location"] == "/jobs?notice=bulk"
    assert await status_of(conn, jobs.failed) == "pending" and await status_of(conn, jobs.cancelled) == "pending"
    response = await client.post(f"/api/jobs/{jobs.pending}/retry", headers={"X-CSRF-Token": token})
    assert response.status == 200 and (await response.json())["status"] == "pending"
    response = await client.post("/schedules/nightly/pause", data={"csrf": token}, allow_redirects=False)
    assert response.status == 303
    assert await conn.fetchval("SELECT paused FROM runner_schedules WHERE name = 'nightly'")
    response = await client.post("/schedules/nightly/resume", data={"csrf": token}, allow_redirects=False)
    assert response.status == 303
    assert not await conn.fetchval("SELECT paused FROM runner_schedules WHERE name = 'nightly'")
    # the page's own form for a name with a slash, an ampersand and markup pauses that schedule
    page = await (await client.get("/schedules")).text()
    action = re.search(r'action="(/schedules/team[^"]*/pause)"', page)
    assert action and "<x>" not in page and "&lt;x&gt;" in page
    response = await client.post(action.group(1).replace("&amp;", "&"), data={"csrf": token},
                                 allow_redirects=False)
    assert response.status == 303, await response.text()
    assert await conn.fetchval("SELECT paused FROM runner_schedules WHERE name = $1", ODD_SCHEDULE)
    # an open redirect is not one
    response = await client.post("/jobs/bulk", data={"csrf": token, "action": "cancel", "next": "//evil.example",
                                                     "ids": [str(jobs.delayed)]}, allow_redirects=False)
    assert response.headers["Location"] == "/?notice=bulk"


async def test_without_auth_only_loopback_host_names_are_answered(dashboard: Factory, jobs: Jobs) -> None:
    """A DNS-rebinding guard: a page of evil.example whose name now resolves to 127.0.0.1 is refused."""
    client = await dashboard()
    for host in ("evil.example", "evil.example:9188", "10.0.0.5:9188"):
        response = await client.get("/api/overview", headers={"Host": host})
        assert response.status == 403, host
        assert "counts" not in await response.text()
    for host in ("localhost:9188", "127.0.0.1", "[::1]:9188"):
        assert (await client.get("/api/overview", headers={"Host": host})).status == 200, host
    protected = await dashboard(Auth.of(TOKEN))  # with credentials any name will do (a proxy's)
    response = await protected.get("/api/overview", headers={"Host": "dash.example",
                                                              "Authorization": f"Bearer {TOKEN}"})
    assert response.status == 200


async def test_token_auth_bearer_and_login(dashboard: Factory, jobs: Jobs, conn: asyncpg.Connection) -> None:
    # replicas with the same secrets accept each other's CSRF tokens; other secrets (or none) do not
    assert Auth.of(TOKEN).csrf_for("b" * 32) == Auth.of(TOKEN).csrf_for("b" * 32)
    assert Auth.of(TOKEN).csrf_for("b" * 32) != Auth.of(TOKEN + "x").csrf_for("b" * 32)
    assert Auth().csrf_for("b" * 32) != Auth().csrf_for("b" * 32)
    assert TOKEN not in repr(Auth.of(TOKEN)) and PASSWORD not in repr(Auth.of(None, "ops", PASSWORD))
    client = await dashboard(Auth.of(TOKEN))
    for path in ("/", "/jobs", f"/jobs/{jobs.pending}", "/api/overview", "/api/jobs"):
        response = await client.get(path)
        assert response.status == 401, path
        assert "worker-a" not in await response.text()
    assert (await client.get("/api/overview", headers={"Authorization": "Bearer wrong-token-xxxxxxxx"})).status == 401
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/", "/api/overview", f"/jobs/{jobs.pending}"):
        assert (await client.get(path, headers=bearer)).status == 200, path
    # a script with the bearer header needs no CSRF token: no browser sends that header by itself
    response = await client.post(f"/api/jobs/{jobs.pending}/cancel", headers=bearer)
    assert response.status == 200 and await status_of(conn, jobs.pending) == "cancelled"
    assert (await client.post(f"/api/jobs/{jobs.delayed}/cancel")).status == 401

    # the login form sets a cookie holding an HMAC of the token, never the token
    login = await client.get("/login")
    assert login.status == 200
    csrf = CSRF_INPUT.search(await login.text())
    assert csrf
    wrong = await client.post("/login", data={"csrf": csrf.group(1), "token": "not-the-token", "next": "/jobs"})
    assert wrong.status == 401
    no_csrf = await client.post("/login", data={"token": TOKEN, "next": "/jobs"}, allow_redirects=False)
    assert no_csrf.status == 403
    response = await client.post("/login", data={"csrf": csrf.group(1), "token": TOKEN, "next": "/jobs"},
                                 allow_redirects=False)
    assert response.status == 303 and response.headers["Location"] == "/jobs"
    cookie = response.cookies["runner_dashboard_session"]
    assert TOKEN not in cookie.value and cookie["httponly"] and cookie["samesite"] == "Strict"
    assert not cookie["secure"]  # plain HTTP here (behind a proxy that ends TLS it is Secure: below)
    assert (await client.get("/jobs")).status == 200
    assert (await client.get("/api/overview")).status == 200
    behind = await client.post("/login", data={"csrf": csrf.group(1), "token": TOKEN, "next": "/"},
                               headers={"X-Forwarded-Proto": "https"}, allow_redirects=False)
    assert behind.status == 303 and behind.cookies["runner_dashboard_session"]["secure"]


async def test_basic_auth(dashboard: Factory, jobs: Jobs) -> None:
    client = await dashboard(Auth.of(None, "ops", PASSWORD))
    response = await client.get("/")
    assert response.status == 401 and response.headers["WWW-Authenticate"].startswith("Basic ")

    def basic(user: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    assert (await client.get("/", headers=basic("ops", "wrong"))).status == 401
    assert (await client.get("/", headers=basic("root", PASSWORD))).status == 401
    assert (await client.get("/", headers={"Authorization": "Basic !!!"})).status == 401
    assert (await client.get("/", headers=basic("ops", PASSWORD))).status == 200
    assert (await client.get(f"/api/jobs/{jobs.failed}", headers=basic("ops", PASSWORD))).status == 200
    # basic auth is sent by browsers on their own: its POSTs need the CSRF token
    response = await client.post(f"/jobs/{jobs.pending}/cancel", headers=basic("ops", PASSWORD))
    assert response.status == 403


async def test_read_only_hides_and_refuses_actions(
    dashboard: Factory, jobs: Jobs, conn: asyncpg.Connection
) -> None:
    auth = Auth()
    client = await dashboard(auth, read_only=True)
    page = await (await client.get(f"/jobs/{jobs.pending}")).text()
    assert "read-only" in page and 'id="cancel"' not in page and "/cancel" not in page
    listing = await (await client.get("/jobs")).text()
    assert 'action="/jobs/bulk"' not in listing and 'name="ids"' not in listing
    assert CSRF_INPUT.search(listing) is None  # no form at all: nothing to post
    schedules = await (await client.get("/schedules")).text()
    assert "/pause" not in schedules and "nightly" in schedules
    # even with this browser's valid CSRF token every action is refused
    browser = next(c.value for c in client.session.cookie_jar if c.key == "runner_dashboard_csrf")
    valid = auth.csrf_for(browser)
    for path, data in ((f"/jobs/{jobs.pending}/cancel", {}), (f"/jobs/{jobs.failed}/retry", {}),
                       ("/jobs/bulk", {"action": "cancel", "ids": [str(jobs.pending)]}),
                       ("/schedules/nightly/pause", {}), (f"/api/jobs/{jobs.pending}/cancel", {})):
        response = await client.post(path, data={**data, "csrf": valid}, allow_redirects=False)
        assert response.status == 403, path
        assert "read-only" in await response.text()
    assert await status_of(conn, jobs.pending) == "pending" and await status_of(conn, jobs.failed) == "failed"
    assert not await conn.fetchval("SELECT paused FROM runner_schedules WHERE name = 'nightly'")


async def test_a_transactions_appeals_and_round_are_shown(
    dashboard: Factory, jobs: Jobs, conn: asyncpg.Connection
) -> None:
    started, committed, revealed, leader_started = ("0x" + c * 64 for c in "1234")
    appeals = [
        {"kind": "validator", "round": 1, "validators": ["0xa1", "0xa2", "0xa3"], "votes": [{"vote": 1}] * 3,
         "outcome": "failed", "merged": "majority agrees", "started_event_tx": started,
         "committed_event_tx": committed, "revealed_event_tx": revealed},
        {"kind": "leader", "round": 2, "validators": [], "votes": [], "outcome": "succeeded",
         "merged": MARKUP, "started_event_tx": leader_started},
        "not an object",
    ]
    await conn.execute("UPDATE runner_consensus_transactions SET round = 3, appeal_failed = 1, "
                       "appeal_requested = 'validator', appeals = $2::text::jsonb WHERE hash = $1",
                       TX_HASH, json.dumps(appeals))
    client = await dashboard()
    tx = await (await client.get(f"/api/consensus/{TX_HASH}")).json()
    assert (tx["transaction"]["round"], tx["transaction"]["appeal_failed"],
            tx["transaction"]["appeal_requested"]) == (3, 1, "validator")
    assert [(a["number"], a["kind"], a["round"], a["validators"], a["votes"], a["outcome"]) for a in tx["appeals"]] == [
        (1, "validator", 1, 3, 3, "failed"), (2, "leader", 2, 0, 0, "succeeded"), (3, None, None, None, None, None)]
    assert [(a["started_event_tx"], a["committed_event_tx"], a["revealed_event_tx"]) for a in tx["appeals"][:2]] == [
        (started, committed, revealed), (leader_started, None, None)]  # chain txs whole, never masked as keys
    assert "appeals" not in tx["transaction"]["other_columns"] and "round" not in tx["transaction"]["other_columns"]
    page = await (await client.get(f"/consensus/{TX_HASH}")).text()
    table = page[page.index('<table id="appeals">'):page.index('<template id="tpl-appeal">')]
    assert table.count("<tr>") == 4  # a head and three appeals
    assert ('<td data-bind="kind">validator</td><td class="num" data-bind="round">1</td>'
            '<td class="num" data-bind="validators">3</td>') in table
    assert f'<td class="hash" data-bind="started_event_tx">{leader_started}</td>' in table
    assert all(chain_tx in table for chain_tx in (started, committed, revealed))
    assert "&lt;script&gt;" in table and "<script>" not in table and "<img" not in table
    assert '<dd id="tx-round" data-live="transaction.round">3</dd>' in page
    assert '<dd id="tx-appeal-requested" data-live="transaction.appeal_requested">validator</dd>' in page
    listed = await (await client.get("/api/consensus")).json()
    assert [(t["round"], t["appeal_count"]) for t in listed["transactions"]] == [(3, 3)]
    assert "<th class=\"num\">round</th>" in await (await client.get("/consensus")).text()

    # an older schema (before the revisions that added rounds and appeals): the pages answer without them
    await conn.execute("ALTER TABLE runner_consensus_transactions DROP COLUMN appeals CASCADE, "
                       "DROP COLUMN appeal_requested CASCADE, DROP COLUMN appeal_failed CASCADE, "
                       "DROP COLUMN round CASCADE, DROP COLUMN rotation_count CASCADE")
    tx = await (await client.get(f"/api/consensus/{TX_HASH}")).json()
    assert tx["appeals"] == [] and not tx["appeals_column"] and tx["transaction"]["round"] is None
    page = await client.get(f"/consensus/{TX_HASH}")
    body = await page.text()
    assert page.status == 200 and 'id="appeals"' not in body and 'id="tx-round"' not in body and CHAIN_TX in body
    listing = await client.get("/consensus")
    assert listing.status == 200 and "<th class=\"num\">round</th>" not in await listing.text()
    listed = await (await client.get("/api/consensus")).json()
    assert "round" not in listed["transactions"][0] and listed["transactions"][0]["hash"] == TX_HASH


async def test_consensus_page_says_when_its_tables_are_absent(
    dashboard: Factory, conn: asyncpg.Connection
) -> None:
    await conn.execute("DROP TABLE runner_consensus_transactions CASCADE")
    client = await dashboard()
    page = await client.get("/consensus")
    assert page.status == 200 and 'id="consensus-absent"' in await page.text()
    assert (await (await client.get("/api/consensus")).json())["present"] is False
    assert (await client.get(f"/consensus/{TX_HASH}")).status == 200


def test_a_bind_beyond_loopback_without_auth_exits_2(runner_env: dict[str, str]) -> None:
    for args, extra in ((("--host", "0.0.0.0"), {}), ((), {"RUNNER_DASHBOARD_HOST": "192.0.2.1"}),
                        (("--host", "example.com", "--read-only"), {})):
        result = run_cli(runner_env, "dashboard", *args, timeout=60, **extra)
        assert result.returncode == 2, result
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("error: the dashboard would listen on ") and "RUNNER_DASHBOARD_TOKEN" in line, line
    short = run_cli(runner_env, "dashboard", "--host", "0.0.0.0", timeout=60, RUNNER_DASHBOARD_TOKEN="short")
    assert short.returncode == 2 and "RUNNER_DASHBOARD_TOKEN" in short.stderr and "short" not in short.stderr
    half = run_cli(runner_env, "dashboard", timeout=60, RUNNER_DASHBOARD_USER="ops")
    assert half.returncode == 2 and "RUNNER_DASHBOARD_PASSWORD" in half.stderr


async def test_the_command_serves_beyond_loopback_with_a_token(runner_env: dict[str, str]) -> None:
    import aiohttp

    process = subprocess.Popen(
        [sys.executable, "-m", "runner", "dashboard", "--host", "0.0.0.0", "--port", "0"],
        env=cli_env(runner_env, RUNNER_DASHBOARD_TOKEN=TOKEN), cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert process.stderr is not None
        line = process.stderr.readline()  # blocks until it listens (or exits: an empty line)
        match = re.match(r"dashboard on http://0\.0\.0\.0:(\d+)\n", line)
        assert match, line + process.stderr.read()
        url = f"http://127.0.0.1:{match.group(1)}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/api/overview") as response:
                assert response.status == 401
            async with session.get(f"{url}/api/overview", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                assert response.status == 200
                assert "counts" in await response.json()
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0


# --- mounted in the worker's HTTP server (RUNNER_DASHBOARD_MOUNT) ---------------------------------------
@pytest.fixture
async def http_server(runner_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Factory]:
    """http_server(host=..., **env): the worker's HTTP server (runner.http) on a free port, its App opened
    with the given RUNNER_* settings."""
    opened: list[tuple[App, HttpServer | None]] = []

    async def make(host: str = "127.0.0.1", **env: str) -> HttpServer:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        app = await App.open(load_settings())
        opened.append((app, None))
        server = await HttpServer(app, host=host, port=0).start()
        opened[-1] = (app, server)
        return server

    yield make
    for app, server in reversed(opened):
        if server is not None:
            await server.stop()
        await app.close()


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),  # cookies for 127.0.0.1 too
                                 timeout=aiohttp.ClientTimeout(30))


async def test_the_dashboard_mounted_in_the_worker_http_server(
    http_server: Factory, jobs: Jobs, conn: asyncpg.Connection
) -> None:
    server = await http_server(RUNNER_DASHBOARD_MOUNT="true")
    url = f"http://127.0.0.1:{server.port}"
    async with session() as client:
        async with client.get(f"{url}/dashboard/") as response:
            overview = await response.text()
            assert response.status == 200, overview[:2000]
            assert response.headers["Content-Security-Policy"] == CSP
            assert response.headers["X-Frame-Options"] == "DENY"
        assert 'src="/dashboard/static/dashboard.js"' in overview and 'data-api="/dashboard/api/overview"' in overview
        assert 'href="/jobs' not in overview and 'href="/dashboard/jobs"' in overview
        async with client.get(f"{url}/dashboard", allow_redirects=False) as response:
            assert response.status == 308 and response.headers["Location"] == "/dashboard/"
        # every link of the pages works under the prefix
        seen: set[str] = set()
        for page in ("/dashboard/", "/dashboard/jobs", f"/dashboard/jobs/{jobs.backfill}", "/dashboard/backfills",
                     "/dashboard/consensus", f"/dashboard/consensus/{TX_HASH}", "/dashboard/schedules"):
            async with client.get(f"{url}{page}") as response:
                body = await response.text()
                assert response.status == 200, (page, body[:2000])
            shown = re.sub(r"<template .*?</template>", "", body, flags=re.S)  # the polling script's blank rows
            links = set(re.findall(r'\s(?:href|src|action)="(/[^"]*)"', shown))
            assert links and all(link.startswith("/dashboard/") for link in links), (page, links)
            templates = set(re.findall(r'data-bind-href="([^"]*)"', body))  # the polling script's row links
            assert all(t.startswith("/dashboard/") for t in templates), (page, templates)
            posted = ("/cancel", "/retry", "/pause", "/resume", "/bulk", "/logout")  # forms: posted, not followed
            links = {link for link in links if not any(word in link for word in posted)}
            seen |= {link.replace("&amp;", "&") for link in links}
        for link in sorted(seen):
            async with client.get(f"{url}{link}") as response:
                assert response.status == 200, link
        async with client.get(f"{url}/dashboard/api/jobs/{jobs.pending}") as response:
            assert response.status == 200 and (await response.json())["job"]["id"] == jobs.pending
        # the same rules: a POST without the CSRF token is refused and changes nothing
        async with client.post(f"{url}/dashboard/jobs/{jobs.pending}/cancel", data={},
                               allow_redirects=False) as response:
            assert response.status == 403
        async with client.post(f"{url}/dashboard/api/jobs/{jobs.pending}/cancel") as response:
            assert response.status == 403
        assert await status_of(conn, jobs.pending) == "pending"
        csrf = CSRF_INPUT.search(await (await client.get(f"{url}/dashboard/jobs")).text())
        assert csrf
        async with client.post(f"{url}/dashboard/jobs/{jobs.pending}/cancel", data={"csrf": csrf.group(1)},
                               allow_redirects=False) as response:
            assert response.status == 303
            assert response.headers["Location"] == f"/dashboard/jobs/{jobs.pending}?notice=cancelled"
        assert await status_of(conn, jobs.pending) == "cancelled"
        async with client.post(f"{url}/dashboard/jobs/bulk", allow_redirects=False,
                               data={"csrf": csrf.group(1), "action": "cancel", "next": "/jobs",
                                     "ids": [str(jobs.delayed)]}) as response:
            assert response.headers["Location"] == "/dashboard/?notice=bulk"  # never out of the mount
        async with client.get(f"{url}/dashboard/", headers={"Host": "evil.example"}) as response:
            assert response.status == 403  # the loopback Host check (DNS rebinding) applies too
        async with client.get(f"{url}/healthz") as response:  # the worker's own endpoints as before
            assert response.status == 200 and "Content-Security-Policy" not in response.headers
        async with client.get(f"{url}/") as response:
            assert "/dashboard/" in (await response.json())["endpoints"]


async def test_the_mounted_dashboard_read_only_and_unmounted(http_server: Factory, jobs: Jobs,
                                                             conn: asyncpg.Connection) -> None:
    unmounted = await http_server()
    async with session() as client:
        for path in ("/dashboard/", "/dashboard", "/dashboard/jobs", "/dashboard/static/dashboard.js"):
            async with client.get(f"http://127.0.0.1:{unmounted.port}{path}", allow_redirects=False) as response:
                assert response.status == 404, path
    read_only = await http_server(RUNNER_DASHBOARD_MOUNT="true", RUNNER_DASHBOARD_READ_ONLY="true")
    url = f"http://127.0.0.1:{read_only.port}"
    async with session() as client:
        async with client.get(f"{url}/dashboard/jobs/{jobs.pending}") as response:
            page = await response.text()
            assert response.status == 200 and "read-only" in page and 'id="cancel"' not in page
        browser = next(c.value for c in client.cookie_jar if c.key == "runner_dashboard_csrf")
        valid = auth_from_settings(read_only.app.settings).csrf_for(browser)
        async with client.post(f"{url}/dashboard/jobs/{jobs.pending}/cancel", data={"csrf": valid},
                               allow_redirects=False) as response:
            assert response.status == 403 and "read-only" in await response.text()
    assert await status_of(conn, jobs.pending) == "pending"


async def test_the_mounted_dashboard_beyond_loopback_needs_auth(
    http_server: Factory, runner_env: dict[str, str], app: App, jobs: Jobs
) -> None:
    result = run_cli(runner_env, "worker", RUNNER_HTTP_ENABLED="true", RUNNER_HTTP_HOST="0.0.0.0",
                     RUNNER_HTTP_PORT="0", RUNNER_DASHBOARD_MOUNT="true", timeout=60)
    assert result.returncode == 2, result
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: the dashboard mounted in the worker's HTTP server (RUNNER_DASHBOARD_MOUNT, "
                           "RUNNER_HTTP_HOST) would listen on 0.0.0.0") and "RUNNER_DASHBOARD_TOKEN" in line, line
    assert (await app.queue.job_get(jobs.pending))["lease_epoch"] == 0  # nothing was claimed
    # not mounted, the worker's server binds there as before; mounted with a token, it does too
    with pytest.raises(DashboardBindError):
        await http_server("0.0.0.0", RUNNER_DASHBOARD_MOUNT="true")
    server = await http_server("0.0.0.0", RUNNER_DASHBOARD_MOUNT="true", RUNNER_DASHBOARD_TOKEN=TOKEN)
    async with session() as client:
        async with client.get(f"http://127.0.0.1:{server.port}/dashboard/api/overview") as response:
            assert response.status == 401
        async with client.get(f"http://127.0.0.1:{server.port}/dashboard/api/overview",
                              headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            assert response.status == 200 and "counts" in await response.json()
