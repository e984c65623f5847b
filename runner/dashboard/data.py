"""What the dashboard shows, read through the queue's own methods and the statements of ``queue_sql``'s
dashboard section. Every function returns plain JSON-able dicts: the pages render them and ``/api/...``
serves them as they are. Nothing here scans the jobs' history (see ``queue_sql``)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

from runner import queue_sql as sql
from runner.cli import count_rows, progress_rate, with_rates
from runner.logs import redact, redact_value
from runner.queue import FINISHED_EXACT_UP_TO, JobFilter, check_job_id

if TYPE_CHECKING:
    import asyncpg

    from runner.app import App

RECENT_JOBS = 15
PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
BACKFILL_KINDS = ("backfill",)  # top-level kinds; their chunks (backfill_chunk) are shown under them
RECENT_BACKFILLS = 20
CONSENSUS_RECENT = 10_000  # done transactions are counted among this many newest
CONSENSUS_STATUSES = (
    "PENDING", "ACTIVATED", "PROPOSING", "COMMITTING", "REVEALING", "ACCEPTED", "UNDETERMINED",
    "LEADER_TIMEOUT", "VALIDATORS_TIMEOUT", "FINALIZED", "CANCELED",
)
EVENTS = ("activated", "proposed", "committed", "revealed", "decided", "finalized")
MAX_ERROR_FILTER_CHARS = 200
# ids one page of a search no index serves looks at (about 30 ms of a primary-key walk; bench/dashboard.py)
SEARCH_WINDOW = 100_000


# a worker's pool as its heartbeat stores it (runner.db.Database.pool_use), flattened into its row
POOL_FIELDS = ("size", "max", "in_use", "waiters", "peak_in_use", "exhaustion_retries", "give_ups")


def _plain(row: asyncpg.Record | dict[str, Any]) -> dict[str, Any]:
    return dict(row)


def _decoded(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return {"undecodable": text[:200]}


def safe_job(job: dict[str, Any]) -> dict[str, Any]:
    """A job as the dashboard shows it: secrets in its error and JSON columns masked (runner.logs)."""
    shown = dict(job)
    if shown.get("last_error"):
        shown["last_error"] = redact(shown["last_error"])
    for column in ("payload", "checkpoint", "result"):
        if column in shown:
            value = shown[column]
            if isinstance(value, str):  # the list statements return JSON as text
                value = _decoded(value)
            shown[column] = redact_value(value)
    return shown


# --- overview -----------------------------------------------------------------------------------------
async def overview(app: App) -> dict[str, Any]:
    counts = count_rows(await app.queue.job_counts_by_queue())
    now = await app.queue.clock()
    return {
        "now": now,
        "counts": counts,
        "throughput": await throughput(app),
        "workers": await workers(app),
        "running": with_rates(await app.queue.job_list_running(), now),
        "recent": [safe_job(_plain(r)) for r in await app.db.fetch(sql.DASH_RECENT_JOBS, RECENT_JOBS)],
    }


async def throughput(app: App) -> list[dict[str, Any]]:
    return [_plain(r) for r in await app.db.fetch(sql.DASH_THROUGHPUT)]


async def workers(app: App) -> list[dict[str, Any]]:
    rows = [_plain(r) for r in await app.db.fetch(sql.DASH_WORKERS)]
    lease = app.settings.lease_timeout
    for row in rows:
        row["heartbeat_age_s"] = round(float(row["heartbeat_age_s"]), 1)
        row["live"] = row["heartbeat_age_s"] <= lease
        pool = row.pop("pool") or {}  # as of its last heartbeat (NULL until the first one)
        pool = _decoded(pool) if isinstance(pool, str) else pool
        for key in POOL_FIELDS:
            row[f"pool_{key}"] = pool.get(key) if isinstance(pool, dict) else None
    return rows


# --- jobs ---------------------------------------------------------------------------------------------
def page_size(raw: str | None) -> int:
    if not raw:
        return PAGE_SIZE
    try:
        value = int(raw)
    except ValueError:
        return PAGE_SIZE
    return max(1, min(MAX_PAGE_SIZE, value))


async def job_list(app: App, where: JobFilter, error: str | None, before_id: int | None,
                   limit: int = PAGE_SIZE) -> dict[str, Any]:
    """A page of jobs, newest first. A search no index serves (a kind, a finished status, error text) looks
    at SEARCH_WINDOW ids below ``before_id`` at most: a page that found fewer than ``limit`` says which ids
    it searched (``searched_from``) and its ``next_before_id`` goes on below them."""
    if before_id is not None:
        check_job_id(before_id)
    text = (error or "").strip()[:MAX_ERROR_FILTER_CHARS] or None
    lowest = await _window_floor(app, where, text, before_id)
    rows = await app.db.fetch(sql.DASH_LIST_JOBS, *where.arrays(), limit + 1, before_id, text, lowest)
    jobs = [safe_job(_plain(r)) for r in rows[:limit]]
    if len(rows) > limit:
        next_before_id: int | None = jobs[-1]["id"]
    else:
        next_before_id = lowest if lowest is not None and lowest > 1 else None
    return {"jobs": jobs, "next_before_id": next_before_id,
            "searched_from": lowest if len(rows) <= limit else None}


async def _window_floor(app: App, where: JobFilter, text: str | None, before_id: int | None) -> int | None:
    """The lowest id a search looks at, or None when an index bounds it (no filter, or only unfinished
    statuses: the partial index on unfinished jobs)."""
    unfinished_only = bool(where.statuses) and set(where.statuses) <= {"pending", "running"}
    if text is None and (unfinished_only or not (where.statuses or where.kinds or where.queues)):
        return None
    top = before_id if before_id is not None else int(await app.db.fetchval(sql.DASH_MAX_JOB_ID) or 0) + 1
    return max(1, top - SEARCH_WINDOW)


async def job_detail(app: App, job_id: int) -> dict[str, Any]:
    job = await app.queue.job_get(job_id)
    children = await app.queue.job_children(job_id)
    now = await app.queue.clock()
    rate = progress_rate(job, now)
    return {
        "job": safe_job(job),
        "rows_per_s": None if rate is None else round(rate[0], 1),
        "eta_s": None if rate is None or rate[1] is None else round(rate[1], 1),
        "children": [safe_job(child) for child in children],
        "timeline": timeline(job),
        "attempts": await attempts(app, job),
        "attempt_log_limit": sql.ATTEMPT_LOG_LIMIT,
        "now": now,
    }


ATTEMPT_FIELDS = ("attempt", "started_at", "finished_at", "outcome", "status", "worker", "lease_epoch", "error")


async def attempts(app: App, job: dict[str, Any]) -> list[dict[str, Any]]:
    """The job's attempts, oldest first: the ended ones from its attempt log (the newest
    ``ATTEMPT_LOG_LIMIT``), then the one running now, if any."""
    raw = _decoded(await app.db.fetchval(sql.DASH_JOB_ATTEMPTS, job["id"]))
    rows = [_attempt(entry) for entry in raw if isinstance(entry, dict)] if isinstance(raw, list) else []
    if not rows and job["status"] == "succeeded":  # succeeded at its first attempt: not logged (hot path)
        rows.append(_attempt({"attempt": job["attempts"] + 1, "started_at": job.get("started_at"),
                              "finished_at": job.get("finished_at"), "outcome": "succeeded",
                              "status": "succeeded", "lease_epoch": job.get("lease_epoch")}))
    if job["status"] == "running":
        rows.append(_attempt({"attempt": job["attempts"] + 1, "started_at": job.get("started_at"),
                              "outcome": "running", "status": "running", "worker": job.get("lease_owner"),
                              "lease_epoch": job.get("lease_epoch")}))
    return rows


def _attempt(entry: dict[str, Any]) -> dict[str, Any]:
    row = {key: entry.get(key) for key in ATTEMPT_FIELDS}
    for key in ("started_at", "finished_at"):
        row[key] = _when(row[key])
    started, finished = row["started_at"], row["finished_at"]
    row["duration_s"] = (round((finished - started).total_seconds(), 3)
                         if isinstance(started, datetime) and isinstance(finished, datetime) else None)
    row["error"] = redact(row["error"]) if isinstance(row["error"], str) and row["error"] else None
    for key in ("outcome", "status", "worker"):
        if row[key] is not None and not isinstance(row[key], str):
            row[key] = str(row[key])
    return row


def _when(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None
    return None


def timeline(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The row's own times of a job's life, in order (each attempt is in ``attempts``)."""
    events: list[tuple[str, datetime | None, str]] = [
        ("created", job.get("created_at"), ""),
        ("runnable from", job.get("run_at"), "" if job["status"] == "pending" else "of the latest attempt"),
        ("started", job.get("started_at"),
         f"attempt {job['attempts'] + (1 if job['status'] == 'running' else 0)} of {job['max_attempts']}"),
        ("lease expires", job.get("lease_expires_at"), f"epoch {job['lease_epoch']}, {job.get('lease_owner')}"),
        ("finished", job.get("finished_at"), job["status"]),
    ]
    return [{"event": name, "at": at, "note": note} for name, at, note in events if at is not None]


# --- backfills ----------------------------------------------------------------------------------------
async def backfills(app: App) -> dict[str, Any]:
    kinds = list(BACKFILL_KINDS)
    live = [_plain(r) for r in await app.db.fetch(sql.DASH_UNFINISHED_OF_KINDS, kinds, 100)]
    recent = [_plain(r) for r in await app.db.fetch(sql.DASH_RECENT_FINISHED_OF_KINDS, kinds,
                                                    FINISHED_EXACT_UP_TO, RECENT_BACKFILLS)]
    parents = [row["id"] for row in live + recent]
    chunks: dict[int, list[dict[str, Any]]] = {}
    for row in await app.db.fetch(sql.DASH_CHILDREN_OF, parents):
        chunks.setdefault(row["parent_id"], []).append(_plain(row))
    now = await app.queue.clock()
    return {"now": now, "running": [_backfill(row, chunks.get(row["id"], []), now) for row in live],
            "recent": [_backfill(row, chunks.get(row["id"], []), now) for row in recent],
            "recent_among": FINISHED_EXACT_UP_TO}


def _backfill(row: dict[str, Any], chunks: list[dict[str, Any]], now: datetime) -> dict[str, Any]:
    job = safe_job(row)
    raw = job.get("payload")
    payload: dict[str, Any] = raw if isinstance(raw, dict) else {}
    shown_chunks = []
    for chunk in chunks:
        shown = safe_job(chunk)
        bounds = (shown.get("payload") or {}).get("chunk") if isinstance(shown.get("payload"), dict) else None
        shown["chunk"] = bounds if isinstance(bounds, dict) else None
        shown.pop("payload", None)
        shown.update(_rate(chunk, now))
        shown_chunks.append(shown)
    done = job["progress_done"]
    total = job["progress_total"]
    if chunks and not done:  # a parent whose handler has not summed its chunks yet
        done = sum(c["progress_done"] for c in chunks)
        totals = [c["progress_total"] for c in chunks]
        total = sum(totals) if all(t is not None for t in totals) else total
    summary = {k: job[k] for k in ("id", "kind", "queue", "status", "attempts", "max_attempts", "recoveries",
                                   "cancel_requested", "last_error", "lease_owner", "created_at", "started_at",
                                   "finished_at")}
    progress = {"progress_done": done, "progress_total": total}
    return {**summary, **progress, "source": _table(payload, "source"), "dest": _table(payload, "dest"),
            "parallel": payload.get("parallel"), **_rate({**job, **progress}, now), "chunks": shown_chunks}


def _table(payload: dict[str, Any], side: str) -> str | None:
    """``connection:schema.table`` of a backfill's source or destination, from its payload."""
    table = payload.get(f"{side}_table")
    return None if table is None else f"{payload.get(side, 'default')}:{table}"


def _rate(job: dict[str, Any], now: datetime) -> dict[str, Any]:
    rate = progress_rate(job, now)
    return {"rows_per_s": None if rate is None else round(rate[0], 1),
            "eta_s": None if rate is None or rate[1] is None else round(rate[1], 1)}


# --- schedules ----------------------------------------------------------------------------------------
async def schedules(app: App) -> dict[str, Any]:
    rows = await app.list_schedules()
    return {"now": await app.queue.clock(), "schedules": [_schedule(row) for row in rows]}


def _schedule(row: dict[str, Any]) -> dict[str, Any]:
    shown = dict(row)
    shown["payload"] = redact_value(shown.get("payload"))
    shown["rule"] = f"cron {row['cron']} ({row['timezone']})" if row.get("cron") else f"every {row['every_s']:g}s"
    return shown


# --- consensus ----------------------------------------------------------------------------------------
async def consensus_present(app: App) -> bool:
    return bool(await app.db.fetchval(sql.DASH_CONSENSUS_PRESENT))


async def consensus(app: App, status: str | None = None, contract: str | None = None,
                    before_seq: int | None = None, limit: int = PAGE_SIZE) -> dict[str, Any]:
    found = await app.db.fetchrow(sql.DASH_CONSENSUS_COLUMNS)
    if found is None or not found["present"]:
        return {"present": False}
    columns = set(found["columns"])
    counts: dict[str, dict[str, int]] = {}
    for statement, args in ((sql.DASH_CONSENSUS_UNFINISHED, ()), (sql.DASH_CONSENSUS_RECENT_DONE,
                                                                 (CONSENSUS_RECENT,))):
        for row in await app.db.fetch(statement, *args):
            counts.setdefault(row["to_address"], {})[row["status"]] = int(row["n"])
    statement = sql.dash_consensus_list("round" in columns, "appeals" in columns)
    rows = await app.db.fetch(statement, status, contract, before_seq, limit + 1)
    transactions = [_plain(r) for r in rows[:limit]]
    return {"present": True, "statuses": CONSENSUS_STATUSES, "by_contract": counts,
            "round_column": "round" in columns, "appeals_column": "appeals" in columns,
            "done_among": CONSENSUS_RECENT, "transactions": transactions,
            "next_before_seq": transactions[-1]["seq"] if len(rows) > limit else None}


async def consensus_transaction(app: App, tx_hash: str) -> dict[str, Any] | None:
    if not await consensus_present(app):
        return {"present": False}
    row = await app.db.fetchrow(sql.DASH_CONSENSUS_GET, tx_hash)
    if row is None:
        return None
    tx = _plain(row)
    whole = _decoded(tx.pop("whole_row"))
    whole = whole if isinstance(whole, dict) else {}
    for column in ("input", "votes", "result", "state_patch"):
        tx[column] = redact_value(_decoded(tx[column]))
    # Columns of later revisions (rounds: 0009; appeals: 0011), named when the table has them, None when not.
    for column in ROUND_COLUMNS:
        value = whole.get(column)
        tx[column] = value if isinstance(value, int | str) and not isinstance(value, bool) else None
    if isinstance(tx["appeal_requested"], str):
        tx["appeal_requested"] = redact(tx["appeal_requested"])
    raw_appeals = whole.get("appeals")
    appeals = [_appeal(n, entry) for n, entry in enumerate(raw_appeals, 1)] if isinstance(raw_appeals, list) else []
    more = {k: v for k, v in whole.items() if k not in tx and k not in ("appeals", *ROUND_COLUMNS)}
    if "appeals" in whole and not isinstance(raw_appeals, list):
        more["appeals"] = raw_appeals  # not the list a revision writes: shown as it is
    tx["other_columns"] = redact_value(more)
    if tx.get("reason"):
        tx["reason"] = redact(tx["reason"])
    return {"present": True, "transaction": tx, "timeline": _tx_timeline(tx), "appeals": appeals,
            "appeals_column": "appeals" in whole}


ROUND_COLUMNS = ("round", "rotation_count", "appeal_requested", "appeal_failed")
APPEAL_EVENTS = ("started", "committed", "revealed")


def _appeal(number: int, entry: Any) -> dict[str, Any]:
    """One appeal as the page shows it: its kind, round, how many validators and votes, outcome, why the
    merged votes decided so, and the chain transaction of each of its events (AppealStarted, commit, reveal)."""
    item: dict[str, Any] = entry if isinstance(entry, dict) else {}
    validators, votes = item.get("validators"), item.get("votes")

    def text(key: str) -> str | None:
        value = item.get(key)
        return redact(value)[:300] if isinstance(value, str) else None

    round_ = item.get("round")
    shown: dict[str, Any] = {
        "number": number,
        "kind": text("kind"),
        "round": round_ if isinstance(round_, int) and not isinstance(round_, bool) else None,
        "validators": len(validators) if isinstance(validators, list) else None,
        "votes": len(votes) if isinstance(votes, list) else None,
        "outcome": text("outcome"),
        "merged": text("merged"),
    }
    for event in APPEAL_EVENTS:  # chain transaction hashes, shown whole (as the *_event_tx columns)
        value = item.get(f"{event}_event_tx")
        shown[f"{event}_event_tx"] = value[:200] if isinstance(value, str) else None
    if not isinstance(entry, dict):
        shown["merged"] = redact(json.dumps(redact_value(entry), default=str))[:300]  # not an object: said as is
    return shown


def _tx_timeline(tx: dict[str, Any]) -> list[dict[str, Any]]:
    """The stored times and, for each ConsensusMain event, the chain transaction that carried it."""
    times = [("created", tx["created_at"]), ("activated", tx["activated_at"]),
             ("awaiting finalization", tx["timestamp_awaiting_finalization"]), ("finalized", tx["finalized_at"])]
    rows: list[dict[str, Any]] = [{"event": name, "at": at, "chain_tx": None} for name, at in times
                                  if at is not None]
    rows += [{"event": f"{name} event", "at": None, "chain_tx": tx[f"{name}_event_tx"]} for name in EVENTS
             if tx[f"{name}_event_tx"]]
    return rows
