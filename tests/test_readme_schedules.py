"""The README's nightly incremental copy (under "Periodic jobs") runs as written: the schedule is stored by
the worker from the code, `runner schedule run` fires it, and the backfill it enqueues copies exactly the
rows changed in the window."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg

from tests import pg
from tests.conftest import cli_env, wait_exit

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Periodic jobs"


def section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    return text[start:text.index("\n## ", start + len(SECTION))]


async def test_the_readme_nightly_incremental_copy_runs_as_written(
    runner_env: dict[str, str], tmp_path: Path, pg_server: pg.TestServer
) -> None:
    [source] = re.findall(r"```python\n(.*?)```", section(), re.S)
    assert source.startswith("# nightly_copy.py\n")
    (tmp_path / "nightly_copy.py").write_text(source)
    commands = [line[2:] for block in re.findall(r"```console\n(.*?)```", section(), re.S)
                for line in block.splitlines() if line.startswith("$ ")]
    assert commands == ["runner worker --app nightly_copy:app &", "runner schedule run orders-nightly"]

    database, shop = await pg_server.create_empty_database("readme"), await pg_server.create_empty_database("shop")
    seller = await asyncpg.connect(pg_server.url(shop))
    try:  # 30 rows changed within the last day, 20 older ones the nightly copy must leave alone
        await seller.execute("""
            CREATE TABLE public.orders (id bigint PRIMARY KEY, amount int NOT NULL, updated_at timestamptz NOT NULL);
            INSERT INTO public.orders
            SELECT g, g * 10, CASE WHEN g <= 30 THEN now() - g * interval '30 minutes'
                                   ELSE now() - interval '3 days' - g * interval '1 minute' END
            FROM generate_series(1, 50) g""")
    finally:
        await seller.close()
    env = {k: v for k, v in cli_env(runner_env).items() if k != "RUNNER_APP"}
    env.update(RUNNER_DATABASE_URL=pg_server.url(database), RUNNER_SOURCE_SHOP_URL=pg_server.url(shop))
    runner = [sys.executable, "-m", "runner"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*runner, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)

    assert run("migrate").returncode == 0
    log = tmp_path / "worker.log"
    with open(log, "w") as sink:
        worker = subprocess.Popen([*runner, "worker", "--app", "nightly_copy:app"], cwd=tmp_path, env=env,
                                  stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    copy = await asyncpg.connect(pg_server.url(database))
    try:
        async def stored() -> bool:  # the worker stores the schedule declared in the code when it starts
            return bool(await copy.fetchval("SELECT count(*) FROM runner_schedules WHERE name = 'orders-nightly'"))

        await pg.wait_until(stored, timeout_s=60)
        listed = json.loads(run("schedule", "list", "--json").stdout)
        assert [(s["name"], s["rule"], s["source"]) for s in listed] == [
            ("orders-nightly", "cron '0 3 * * *' (Europe/Berlin)", "code")]
        fired = run("schedule", "run", "orders-nightly")
        assert fired.returncode == 0, fired.stderr
        nightly_id = int(fired.stdout)

        async def copied() -> bool:
            rows = await copy.fetch("SELECT kind, status FROM runner_jobs")
            return len(rows) == 2 and all(r["status"] == "succeeded" for r in rows)

        await pg.wait_until(copied, timeout_s=120)
        result = json.loads(await copy.fetchval("SELECT result::text FROM runner_jobs WHERE id = $1", nightly_id))
        ids = [r["id"] for r in await copy.fetch("SELECT id FROM public.orders_copy ORDER BY id")]
        assert ids == list(range(1, 31)), log.read_text()[-3000:]  # the window's rows, and only those
        assert await copy.fetchval("SELECT kind FROM runner_jobs WHERE id = $1", result["backfill"]) == "backfill"
    finally:
        await copy.close()
        worker.send_signal(signal.SIGTERM)
        assert await wait_exit(worker, 60) == 0, log.read_text()[-3000:]
        await pg_server.drop(database)
        await pg_server.drop(shop)
