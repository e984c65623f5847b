"""``runner backfill verify SRC DST``: equal copies pass; a deleted, a changed and an extra row fail with
exit 1 and the small key ranges that hold them; bad input is exit 2; ``--verify`` checks after a copy."""

from __future__ import annotations

import json

from runner.app import App
from runner.jobs.backfill.plan import build_plan
from runner.jobs.backfill.pools import named_pools
from runner.jobs.backfill.spec import parse_spec
from runner.jobs.backfill.verify import Verifier
from tests import test_backfill
from tests.conftest import run_cli
from tests.test_backfill import execute, make_table
from tests.test_cli import one_error_line

ROWS = 20_000
other_url = test_backfill.other_url  # the fixture: a second database, the connection 'other'


def verify(runner_env: dict[str, str], *args: str) -> tuple[int, dict[str, object], str]:
    result = run_cli(runner_env, "backfill", "verify", *args, "--json")
    report = json.loads(result.stdout) if result.stdout.strip() else {}
    return result.returncode, report, result.stderr


async def test_an_exact_copy_is_equal_across_databases(
        runner_env: dict[str, str], database_url: str, other_url: str) -> None:
    await make_table(other_url, "public.src", ROWS)
    await make_table(database_url, "public.dst", ROWS)  # the same seed: the same rows
    code, report, stderr = verify(runner_env, "public.src", "public.dst", "--source", "other",
                                  "--chunk-rows", "3000")
    assert code == 0, stderr
    # 7 steps of 3,000 keys, and the range past the last key
    assert (report["equal"], report["source_rows"], report["dest_rows"], report["ranges"]) == (True, ROWS, ROWS, 8)
    text = run_cli(runner_env, "backfill", "verify", "public.src", "public.dst", "--source", "other")
    assert text.returncode == 0 and text.stdout.startswith(f"equal: public.src ({ROWS:,} rows) and public.dst")


async def test_a_deleted_a_changed_and_an_extra_row_are_found_in_small_ranges(
        runner_env: dict[str, str], database_url: str) -> None:
    await make_table(database_url, "public.src", ROWS)
    await make_table(database_url, "public.dst", ROWS)
    await execute(database_url, "DELETE FROM public.dst WHERE id = 4321")
    await execute(database_url, "UPDATE public.dst SET qty = qty + 1 WHERE id = 15000")
    await execute(database_url, "INSERT INTO public.dst SELECT id + 100000, qty, name, created_at, amount, doc, note "
                                "FROM public.dst WHERE id = 1")  # past the source's last key
    code, report, _ = verify(runner_env, "public.src", "public.dst")
    assert code == 1
    assert (report["equal"], report["source_rows"], report["dest_rows"]) == (False, ROWS, ROWS)
    differing = report["differing"]
    assert isinstance(differing, list) and len(differing) == 3
    deleted, changed, extra = differing
    assert deleted["source_rows"] - deleted["dest_rows"] == 1 and deleted["source_rows"] <= 100
    assert int(deleted["lower"] or 0) < 4321 <= int(deleted["upper"])
    assert int(changed["lower"]) < 15000 <= int(changed["upper"]) and changed["source_rows"] <= 100
    assert changed["source_rows"] == changed["dest_rows"]  # same count, other contents
    assert (extra["upper"], extra["source_rows"], extra["dest_rows"]) == (None, 0, 1)
    text = run_cli(runner_env, "backfill", "verify", "public.src", "public.dst")
    assert text.returncode == 1 and text.stdout.startswith("differ: ")
    assert "3 key ranges differ" in text.stdout and "id > " in text.stdout


async def test_types_that_print_differently_compare_by_the_sources_types(app: App, database_url: str) -> None:
    # json has no hash function (hashed as its text); the destination's extra column is not compared
    await execute(database_url, "CREATE TABLE public.a (id int PRIMARY KEY, v numeric, t varchar(10), j json)")
    await execute(database_url, "CREATE TABLE public.b (id bigint PRIMARY KEY, v numeric(12, 4), t text, j json, "
                                "extra int DEFAULT 7)")
    await execute(database_url, "INSERT INTO public.a SELECT g, g / 4.0, 't' || g, json_build_object('g', g) "
                                "FROM generate_series(1, 500) g")
    await execute(database_url, "INSERT INTO public.b (id, v, t, j) SELECT id, v, t, j FROM public.a")
    spec = parse_spec({"source_table": "public.a", "dest_table": "public.b", "allow_narrowing": True})
    pools = named_pools(app)
    async with pools.use("default") as db:
        plan = await build_plan(spec, db, db)
        report = await Verifier(plan, db, db, chunk_rows=1000).run()
        assert report.equal and (report.source_rows, report.dest_rows) == (500, 500)
        await execute(database_url, "UPDATE public.b SET j = json_build_object('g', -1) WHERE id = 250")
        changed = await Verifier(plan, db, db, chunk_rows=1000).run()
    [diff] = changed.differing
    assert int(diff.range.lower or 0) < 250 <= int(diff.range.upper or 0) and diff.source_rows <= 100


async def test_filters_apply_to_both_sides(runner_env: dict[str, str], database_url: str) -> None:
    await make_table(database_url, "public.src", 2000)
    await make_table(database_url, "public.dst", 2000)
    await execute(database_url, "UPDATE public.dst SET qty = -1 WHERE id <= 100")
    code, report, _ = verify(runner_env, "public.src", "public.dst", "--where", "id > 100")
    assert code == 0 and report["source_rows"] == 1900
    code, _, _ = verify(runner_env, "public.src", "public.dst")
    assert code == 1


async def test_bad_input_is_one_line_exit_2(runner_env: dict[str, str], database_url: str) -> None:
    await make_table(database_url, "public.src", 10)
    await make_table(database_url, "public.dst", 10)
    for args, message in [
        (["public.src", "public.nope"], "public.nope"),
        (["public.src", "public.dst", "--where", "id >> 3"], "invalid input syntax for type bigint"),
        (["public.src", "public.dst", "--parallel", "0"], "--parallel must be 1 to 64"),
        (["public.src", "public.src"], "source and destination are the same table"),
    ]:
        result = run_cli(runner_env, "backfill", "verify", *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert message in one_error_line(result.stderr)
    wrong = run_cli(runner_env, "backfill", "public.src")
    assert wrong.returncode == 2 and "give SRC_TABLE DEST_TABLE" in one_error_line(wrong.stderr)


async def test_a_copy_with_verify_checks_it_after(runner_env: dict[str, str], database_url: str) -> None:
    from tests.conftest import start_worker, wait_exit

    await make_table(database_url, "public.src", 5000)
    worker = start_worker(runner_env)
    try:
        result = run_cli(runner_env, "backfill", "public.src", "public.copy", "--create-table", "--verify")
    finally:
        worker.terminate()
        await wait_exit(worker, 60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert int(lines[0]) > 0 and lines[-1].startswith("equal: public.src (5,000 rows) and public.copy")
    assert "succeeded: 5,000 rows (5,000 inserted, 0 updated, 0 skipped)" in result.stderr
