"""Incremental backfills (``since_column``): the first run copies everything, later runs only the rows
changed or added past the stored watermark (upserted), a run with nothing new copies nothing; the watermark
moves only with a successful run."""

from __future__ import annotations

from typing import Any

import pytest

from runner.app import App
from runner.errors import PayloadError
from runner.jobs.backfill.spec import parse_spec
from tests import test_backfill
from tests.test_backfill import digest, execute, fetchval, run_backfill

other_url = test_backfill.other_url  # the fixture: a second database, the connection 'other'
DDL = "CREATE TABLE {table} (id bigint PRIMARY KEY, v text, updated_at timestamptz NOT NULL)"
ORDERED = "SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t.id), '')) FROM {table} t"


def payload(**extra: Any) -> dict[str, Any]:
    return {"source": "other", "source_table": "public.orders", "dest_table": "public.orders_copy",
            "create_table": True, "since_column": "updated_at", "batch_size": 300, **extra}


def window(job: dict[str, Any]) -> tuple[Any, ...]:
    r = job["result"]
    return r["rows"], r["since"], r["watermark"], r["inserted"], r["updated"]


async def same(source_url: str, dest_url: str) -> bool:
    return await digest(source_url, "public.orders") == await digest(dest_url, "public.orders_copy")


async def test_each_run_copies_only_what_changed_past_the_watermark(
        app: App, database_url: str, other_url: str) -> None:
    await execute(other_url, DDL.format(table="public.orders"))
    await execute(other_url, "INSERT INTO public.orders SELECT g, 'v' || g, "
                             "timestamptz '2026-01-01' + g * interval '1 second' FROM generate_series(1, 1000) g")
    first = await run_backfill(app, payload())
    assert first["status"] == "succeeded" and first["progress_done"] == 1000
    assert window(first) == (1000, None, "2026-01-01 00:16:40+00", 1000, 0)
    assert await same(other_url, database_url)

    # 20 rows changed (newer updated_at), 5 added; a change with an old timestamp is not seen, by design
    await execute(other_url, "UPDATE public.orders SET v = 'changed', updated_at = '2026-02-01' WHERE id % 50 = 0")
    await execute(other_url, "INSERT INTO public.orders SELECT g, 'new', timestamptz '2026-02-02' "
                             "FROM generate_series(1001, 1005) g")
    second = await run_backfill(app, payload())
    assert second["status"] == "succeeded" and second["progress_done"] == 25
    # the 20 changed rows updated, the 5 new ones inserted
    assert window(second) == (25, "2026-01-01 00:16:40+00", "2026-02-02 00:00:00+00", 5, 20)
    assert await same(other_url, database_url)

    third = await run_backfill(app, payload())  # nothing new: nothing copied, the watermark stays
    assert (third["status"], third["progress_done"]) == ("succeeded", 0)
    assert third["result"] == {"rows": 0, "since": "2026-02-02 00:00:00+00", "watermark": "2026-02-02 00:00:00+00"}
    stored = await fetchval(database_url, "SELECT watermark FROM runner_backfill_watermarks")
    assert stored == "2026-02-02 00:00:00+00"


async def test_a_failed_run_does_not_move_the_watermark(app: App, database_url: str, other_url: str) -> None:
    await execute(other_url, DDL.format(table="public.orders"))
    await execute(other_url, "INSERT INTO public.orders SELECT g, 'v', timestamptz '2026-01-01' + g * interval '1 s' "
                             "FROM generate_series(1, 100) g")
    await execute(database_url, "CREATE TABLE public.orders_copy (id bigint PRIMARY KEY, v varchar(1), "
                                "updated_at timestamptz NOT NULL)")
    await execute(other_url, "UPDATE public.orders SET v = 'too long' WHERE id = 60")
    failed = await run_backfill(app, payload(create_table=False, allow_narrowing=True), max_attempts=1)
    assert failed["status"] == "failed" and "id=60" in failed["last_error"]
    assert await fetchval(database_url, "SELECT count(*) FROM runner_backfill_watermarks") == 0


async def test_since_column_is_checked_and_implies_upsert(app: App, other_url: str) -> None:
    await execute(other_url, DDL.format(table="public.orders") + "; ALTER TABLE public.orders ADD COLUMN j json")
    assert parse_spec(payload()).mode == "upsert"
    kind = app.registry.get("backfill")
    assert kind.validate is not None
    with pytest.raises(PayloadError, match=r"since_column 'nope' does not exist in public\.orders"):
        await kind.validate(payload(since_column="nope"), app)
    with pytest.raises(PayloadError, match="since_column 'j'"):  # json has no ordering: no max()
        await kind.validate(payload(since_column="j"), app)


async def test_a_scheduled_incremental_backfill_keeps_a_copy_fresh(
        app: App, database_url: str, other_url: str) -> None:
    from runner.worker import Worker

    await execute(other_url, DDL.format(table="public.orders"))
    await execute(other_url, "INSERT INTO public.orders SELECT g, 'v', now() FROM generate_series(1, 50) g")
    # as `runner schedule add orders-nightly backfill --every 86400 --payload '{…, "since_column": …}'`
    await app.add_schedule("orders-nightly", "backfill", every=86400, payload=payload())
    for changed in (None, "UPDATE public.orders SET v = 'w', updated_at = now() WHERE id <= 10"):
        if changed:
            await execute(other_url, changed)
        await app.db.execute("UPDATE runner_schedules SET next_tick = clock_timestamp() - interval '1 second'")
        [fired] = await app.schedule_store.fire_due(grace_s=60)  # the night's tick, come due
        await Worker(app, drain=True, install_signal_handlers=False).run()
        [job_id] = fired.job_ids
        job = await app.queue.job_get(job_id)
        assert job["status"] == "succeeded" and job["progress_done"] == (10 if changed else 50)
        assert await same(other_url, database_url)
