"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright's Python package with
``executable_path``; ``./dev`` installs both): the overview follows a job's status without a reload (and
draws the last hour), the jobs list filters, a job is cancelled through its button (and is cancelled in the
database), a backfill's progress moves live (a row written to, then a real backfill run by an in-process
worker, to the end), and no page logs an error or a CSP violation. Screenshots go to
``$RUNNER_TEST_ARTIFACTS`` (else the test's temporary folder).

A missing chromium fails the test: it is a set-up error, not a reason to skip."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from aiohttp import web
from playwright.async_api import ConsoleMessage, Page, async_playwright, expect

from runner.app import App
from runner.dashboard import Auth, build
from runner.queue import NewJob
from runner.worker import Worker
from tests.pg import wait_until
from tests.test_backfill import make_table

LIVE_TIMEOUT_MS = 20_000  # polls every 2 s; generous for a loaded machine, met as soon as the page shows it
# The real backfill: capped at ROWS_PER_S, so it copies for ROWS / ROWS_PER_S seconds at least (5 polls of
# the page) however fast the machine; a slow one only copies longer.
ROWS = 30_000
ROWS_PER_S = 3_000


@pytest.fixture
async def dashboard_url(app: App) -> AsyncIterator[str]:
    runner = web.AppRunner(build(app, Auth()), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("RUNNER_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def seed_history(conn: asyncpg.Connection) -> None:
    """An hour of finished jobs (some failed) and a worker: what the overview's chart and tables show."""
    await conn.execute(
        "INSERT INTO runner_jobs (kind, queue, status, attempts, created_at, started_at, finished_at, last_error) "
        "SELECT 'noop', CASE WHEN g % 4 = 0 THEN 'bulk' ELSE 'default' END, "
        "       CASE WHEN g % 9 = 0 THEN 'failed' ELSE 'succeeded' END, 1, f - interval '2 s', f - interval '1 s', f, "
        "       CASE WHEN g % 9 = 0 THEN 'RuntimeError: upstream timed out' END "
        "FROM (SELECT g, now() - (g * 17 % 3500) * interval '1 second' AS f FROM generate_series(1, 400) g) s")
    await conn.execute("INSERT INTO runner_workers (id, host, pid, queues, concurrency) "
                       "VALUES ('browser-worker', 'host-1', 4242, 'default,bulk', 50)")


async def make_backfill(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval(
        "INSERT INTO runner_jobs (kind, queue, payload, status, lease_owner, lease_epoch, lease_expires_at, "
        "started_at, progress_done, progress_total) VALUES ('backfill', 'backfill', $1::text::jsonb, 'running', "
        "'browser-worker', 1, now() + interval '1 hour', now() - interval '5 seconds', 1000, 10000) RETURNING id",
        '{"source": "default", "source_table": "public.src", "dest": "default", "dest_table": "public.dst"}'))


async def test_the_dashboard_in_a_real_browser(
    app: App, conn: asyncpg.Connection, database_url: str, dashboard_url: str, tmp_path: Path
) -> None:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is not installed: ./dev test installs it (apt-get install chromium)"
    shots = artifacts(tmp_path)
    await seed_history(conn)
    watched = await app.enqueue("noop", {"watched": True})
    victim = await app.enqueue("sleep", {"seconds": 600})
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            problems.append(f"console {message.type}: {message.text}")

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", on_console)
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("requestfailed", lambda request: problems.append(f"request failed: {request.url}"))
            page.on("response", lambda response: response.status >= 400 and problems.append(
                f"HTTP {response.status}: {response.url}"))

            await overview_follows_a_job(page, app, dashboard_url, watched, shots)
            await jobs_filter_and_cancel(page, app, dashboard_url, victim, shots)
            await backfill_progress_moves(page, conn, dashboard_url)
            await real_backfill_moves(page, app, database_url, dashboard_url, shots)
        finally:
            await browser.close()
    assert problems == [], problems


async def overview_follows_a_job(page: Page, app: App, url: str, job_id: int, shots: Path) -> None:
    await page.goto(f"{url}/")
    status = page.locator(f'#recent tr[data-id="{job_id}"] [data-bind="status"]')
    await expect(status).to_have_text("pending")
    bars = page.locator("svg.chart rect.ok")
    await expect(bars).to_have_count(60)
    heights = await bars.evaluate_all("rects => rects.map(r => Number(r.getAttribute('height')))")
    assert sum(1 for h in heights if h > 0) >= 30, heights  # 400 jobs over the hour: most minutes have some
    await expect(page.locator('#workers tr[data-id="browser-worker"]')).to_be_visible()
    await expect(page.locator("#live-status")).to_contain_text("live ·", timeout=LIVE_TIMEOUT_MS)  # polling works
    await page.evaluate("window.__notReloaded = true")
    (claimed,) = await app.queue.job_claim(["default"], 1, "browser-worker", 60, ["noop"])
    assert claimed.id == job_id
    await expect(status).to_have_text("running", timeout=LIVE_TIMEOUT_MS)
    await expect(status).to_have_class(re.compile(r"\bstatus-running\b"))
    await expect(page.locator("#total-running")).to_have_text("1", timeout=LIVE_TIMEOUT_MS)
    assert await page.evaluate("window.__notReloaded === true"), "the page was reloaded"
    await page.screenshot(path=str(shots / "dashboard-overview.png"), full_page=True)


async def jobs_filter_and_cancel(page: Page, app: App, url: str, job_id: int, shots: Path) -> None:
    await page.goto(f"{url}/jobs")
    await page.select_option("select[name=status]", "pending")
    await page.fill("input[name=kind]", "sleep")
    await page.click("form.filters button[type=submit]")
    await page.wait_for_url(re.compile(r"/jobs\?status=pending&kind=sleep"))
    rows = page.locator("#jobs tbody tr")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_have_attribute("data-id", str(job_id))
    await rows.first.locator(f'a[href="/jobs/{job_id}"]').click()
    await page.wait_for_url(f"{url}/jobs/{job_id}")
    await page.screenshot(path=str(shots / "dashboard-job.png"), full_page=True)
    await page.click("#cancel")
    await page.wait_for_url(f"{url}/jobs/{job_id}?notice=cancelled")
    await expect(page.locator('#job-status [data-live="job.status"]')).to_have_text("cancelled")
    await expect(page.locator("#cancel")).to_be_hidden()
    await expect(page.locator("#retry")).to_be_visible()

    async def cancelled() -> bool:
        return (await app.queue.job_get(job_id))["status"] == "cancelled"

    await wait_until(cancelled, timeout_s=10)


async def backfill_progress_moves(page: Page, conn: asyncpg.Connection, url: str) -> None:
    job_id = await make_backfill(conn)
    await page.goto(f"{url}/backfills")
    row = page.locator(f'#running tr[data-id="{job_id}"]')
    done = row.locator('[data-bind="progress_done"]')
    await expect(done).to_have_text("1,000")
    await page.evaluate("window.__notReloaded = true")
    await conn.execute("UPDATE runner_jobs SET progress_done = 6500 WHERE id = $1", job_id)
    await expect(done).to_have_text("6,500", timeout=LIVE_TIMEOUT_MS)
    bar = row.locator("progress")
    assert await bar.evaluate("bar => [bar.value, bar.max, bar.hidden]") == [6500, 10000, False]
    await expect(row.locator('[data-bind="rows_per_s"]')).not_to_have_text("")
    assert await page.evaluate("window.__notReloaded === true"), "the page was reloaded"


async def real_backfill_moves(page: Page, app: App, database_url: str, url: str, shots: Path) -> None:
    """A real backfill run by a real worker (in-process): its rows move on the open page, then it is done."""
    await make_table(database_url, "src", ROWS)
    payload = {"source": "default", "source_table": "public.src", "dest": "default", "dest_table": "public.dst",
               "create_table": True, "batch_size": 500, "max_rows_per_second": ROWS_PER_S}
    kind = app.registry.get("backfill")
    assert kind.validate is not None
    await kind.validate(payload, app)
    job_id, _ = await app.queue.job_enqueue(NewJob("backfill", payload, queue="default"))
    await page.goto(f"{url}/backfills")
    await page.evaluate("window.__notReloaded = true")
    worker = Worker(app, queues=["default"], install_signal_handlers=False, serve_http=False)
    running = asyncio.create_task(worker.run())
    try:
        row = page.locator(f'#running tr[data-id="{job_id}"]')
        done = row.locator('[data-bind="progress_done"]')
        await expect(done).to_have_text(re.compile(r"^[1-9][0-9,]*$"), timeout=LIVE_TIMEOUT_MS)  # it appeared
        first = int((await done.text_content() or "0").replace(",", ""))
        assert 0 < first < ROWS, first
        await expect(done).not_to_have_text(f"{first:,}", timeout=LIVE_TIMEOUT_MS)  # and moved on
        await expect(row.locator('[data-bind="progress_total"]')).to_have_text(f" / {ROWS:,}")
        await expect(row.locator('[data-bind="rows_per_s"]')).not_to_have_text("")
        await page.screenshot(path=str(shots / "dashboard-backfill.png"), full_page=True)
        finished = page.locator(f'#recent tr[data-id="{job_id}"]')
        await expect(finished.locator('[data-bind="status"]')).to_have_text("succeeded", timeout=120_000)
        await expect(finished.locator('[data-bind="progress_done"]')).to_have_text(f"{ROWS:,}")
        await expect(row).to_have_count(0)
        assert await page.evaluate("window.__notReloaded === true"), "the page was reloaded"
    finally:
        worker.request_stop()
        await running
