"""Every SQL statement of the job queue, in one place. Values are always bind parameters.

Fencing: every write for a claimed job matches ``lease_epoch`` (bumped on every claim) and
``status = 'running'``; after a rescue the old owner's writes match no row and change nothing.
"""

from __future__ import annotations

JOBS_CHANNEL = "runner_jobs"
CANCEL_CHANNEL = "runner_cancel"

# --- the attempt log (runner_jobs.attempt_log, revision 0012)
# Every statement that ends an attempt appends one object to the job's attempt_log in the same UPDATE (no
# statement or round trip of its own): the attempt's number, its start (the claim's started_at) and end,
# how it ended (succeeded, error, fatal, cancelled, recovered: its lease expired, handed back: released
# without using an attempt), the status the job went to, the worker (lease owner), the lease epoch and the
# error's first line. Only the newest ATTEMPT_LOG_LIMIT are kept, so a job retried for ever stays small.
ATTEMPT_LOG_LIMIT = 25
ATTEMPT_ERROR_CHARS = 200


def _append_success(j: str, succeeded: str) -> str:
    """``attempt_log`` for a completion: a job that succeeds with an empty log (its first attempt, the
    common case) keeps it empty; the dashboard derives that attempt from the row's own times. The hot
    path writes no jsonb (appending on every success cost 22% of drain throughput: 7,249 -> 5,641 jobs/s)."""
    return (f"CASE WHEN {succeeded} AND jsonb_array_length({j}.attempt_log) = 0 THEN {j}.attempt_log "
            f"ELSE {{append}} END")


def _append_attempt(j: str, outcome: str, status: str, error: str) -> str:
    """SQL for ``{j}.attempt_log`` with this attempt appended, the oldest dropped past the limit (the row's
    values are the ones before the UPDATE's own assignments: the attempt's owner, epoch and start)."""
    kept = (f"CASE WHEN jsonb_array_length({j}.attempt_log) < {ATTEMPT_LOG_LIMIT} THEN {j}.attempt_log "
            f"ELSE jsonb_path_query_array({j}.attempt_log, '$[last - {ATTEMPT_LOG_LIMIT - 2} to last]') END")
    return (f"({kept}) || jsonb_build_array(jsonb_build_object("
            f"'attempt', {j}.attempts + 1, 'started_at', {j}.started_at, 'finished_at', now(), "
            f"'outcome', {outcome}, 'status', {status}, 'worker', {j}.lease_owner, 'lease_epoch', {j}.lease_epoch, "
            f"'error', left(split_part({error}, E'\\n', 1), {ATTEMPT_ERROR_CHARS})))")


ENQUEUE = """
WITH inserted AS (
    INSERT INTO runner_jobs (kind, queue, payload, priority, run_at, max_attempts, dedupe_key, parent_id, fifo_key)
    SELECT t.kind, t.queue, t.payload::jsonb, t.priority,
           now() + t.delay * interval '1 second', t.max_attempts, t.dedupe_key, t.parent_id, t.fifo_key
    FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::float8[], $6::int[], $7::text[], $8::bigint[],
                $9::text[])
         WITH ORDINALITY AS t(kind, queue, payload, priority, delay, max_attempts, dedupe_key, parent_id, fifo_key,
                              ord)
    ORDER BY t.ord
    ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL AND status IN ('pending', 'running') DO NOTHING
    RETURNING id, queue
)
SELECT i.id
FROM inserted i,
     (SELECT count(pg_notify('runner_jobs', d.queue)) FROM (SELECT DISTINCT queue FROM inserted) d) n
ORDER BY i.id
"""

# A coalesced enqueue (NewJob.coalesce): the key's first waiting job of the kind, locked until the caller
# commits, so that a claim skips it meanwhile and, once it runs, sees what the caller wrote with it; it runs
# no later than the joining job would have ($3: its delay). A claim that locked it first is waited for; it
# is then running, no longer matches, and the caller adds a job. Its queue is NOTIFYed at that commit: a
# claim that skipped it may have come back short and gone to sleep.
JOIN_WAITING_OF_KEY = """
WITH waiting AS (
    SELECT id FROM runner_jobs
    WHERE fifo_key = $1 AND kind = $2 AND status = 'pending'
    ORDER BY id LIMIT 1
    FOR UPDATE
), joined AS (
    UPDATE runner_jobs j SET run_at = LEAST(j.run_at, now() + $3 * interval '1 second')
    FROM waiting w WHERE j.id = w.id
    RETURNING j.id, j.queue
)
SELECT j.id FROM joined j, (SELECT count(pg_notify('runner_jobs', q.queue)) FROM joined q) n
"""

FIND_UNFINISHED_BY_DEDUPE_KEY = """
SELECT id FROM runner_jobs WHERE dedupe_key = $1 AND status IN ('pending', 'running')
"""

# The claim: one statement, walking runner_jobs_claim_idx in claim order, skipping rows others hold, and
# only kinds this worker can run (the rest wait for a worker that has them). cancel_requested is kept:
# a cancel asked for while nobody ran the job still holds when it is claimed. Payloads come back as text,
# decoded per job: one that Python cannot decode fails alone instead of breaking the committed batch.
# A keyed job (fifo_key) is taken only while no job of its key is running and none older is pending: one
# at a time per key, in id order (a retry keeps its place, a failed or cancelled one lets the next go).
# Two claims at once cannot take two of one key: each sees the older one pending (or running) and only it
# qualifies, and its row lock makes one of them skip it. The test reads runner_jobs_fifo_idx (unfinished
# keyed jobs only): the running keys once per claim, and per keyed row the first pending id of its key
# (min(): NOT EXISTS (... id < j.id) was planned as a sequential scan per row, 20 s behind a 10,000-job
# key; measured by bench/fifo.py). A row without a key pays one IS NULL.
_CLAIMABLE = """status = 'pending' AND run_at <= now() AND queue = ANY($1::text[]) AND kind = ANY($5::text[])
      AND (fifo_key IS NULL OR (
          NOT EXISTS (SELECT 1 FROM runner_jobs b WHERE b.fifo_key = j.fifo_key AND b.status = 'running')
          AND j.id = (SELECT min(b.id) FROM runner_jobs b WHERE b.fifo_key = j.fifo_key AND b.status = 'pending')))"""
_CLAIM_SET = """status = 'running', lease_owner = $3, lease_expires_at = now() + $4 * interval '1 second',
    lease_epoch = j.lease_epoch + 1, started_at = now()"""
_CLAIM_RETURNING = """j.id, j.kind, j.queue, j.payload::text, j.attempts, j.max_attempts, j.recoveries, j.lease_epoch,
          j.progress_done, j.progress_total, j.checkpoint::text, j.cancel_requested, j.schedule_tick"""
CLAIM = f"""
WITH candidates AS (
    SELECT id FROM runner_jobs j
    WHERE {_CLAIMABLE}
    ORDER BY priority DESC, run_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE runner_jobs j
SET {_CLAIM_SET}
FROM candidates c
WHERE j.id = c.id
RETURNING {_CLAIM_RETURNING}
"""

# The claim of a worker running kinds with a cap (JobKind.max_running): the same walk, but it takes no more
# of a capped kind than its room ($6 kinds, $7 rooms), and locks only what it takes: the walk reads, then
# the rows within the caps are locked (SKIP LOCKED: one another claim took meanwhile is skipped, and its
# status is checked again on the locked row). Locking the whole walk cost a row lock and its WAL record per
# waiting job per claim (one taken of 136 walked: 8,000 bytes of WAL, 416 now); taking them and handing them
# back, two row writes and an attempt_log entry each. `seen`: how many rows the walk read, so that a claim
# cut short by caps still tells the worker that more is waiting.
CLAIM_CAPPED = f"""
WITH candidates AS (
    SELECT id, kind, priority, run_at FROM runner_jobs j
    WHERE {_CLAIMABLE}
    ORDER BY priority DESC, run_at, id
    LIMIT $2
), within_caps AS (
    SELECT r.id FROM (
        SELECT id, kind, row_number() OVER (PARTITION BY kind ORDER BY priority DESC, run_at, id) AS n
        FROM candidates
    ) r
    LEFT JOIN unnest($6::text[], $7::int[]) AS cap(kind, room) ON cap.kind = r.kind
    WHERE cap.room IS NULL OR r.n <= cap.room
), taken AS (
    SELECT j.id FROM runner_jobs j
    WHERE j.id IN (SELECT id FROM within_caps) AND j.status = 'pending'
    FOR UPDATE SKIP LOCKED
)
UPDATE runner_jobs j
SET {_CLAIM_SET}
FROM taken c
WHERE j.id = c.id
RETURNING {_CLAIM_RETURNING},
          (SELECT count(*) FROM candidates) AS seen
"""

# Renews the leases of every job this worker runs and its worker row, in one round trip, never waiting on
# a row lock: a row someone holds locked (an operator's SELECT FOR UPDATE, a handler's complete_in) is
# skipped, not lost, and reported as held. Jobs missing from `held` have been rescued: the caller drops them.
# Each lease is looked up by primary key in a LATERAL subquery, its status tested outside it (OFFSET 0 and
# FOR UPDATE keep that test from being pushed down): only the primary key can serve the lookup, never the
# partial index on unfinished jobs, which the planner favours when its statistics are stale (every claim and
# completion moves rows in and out of it) and which it would then scan once per lease. Linear in the
# leases whatever the plan, generic plans (which guess ten rows for unnest) included.
HEARTBEAT = """
WITH wanted AS MATERIALIZED (
    SELECT * FROM unnest($1::bigint[], $2::bigint[]) AS t(id, epoch)
), held AS MATERIALIZED (
    SELECT j.id FROM wanted w, LATERAL (
        SELECT id, status FROM runner_jobs WHERE id = w.id AND lease_epoch = w.epoch OFFSET 0
    ) j
    WHERE j.status = 'running'
), lockable AS (
    SELECT j.id FROM wanted w, LATERAL (
        SELECT id, status FROM runner_jobs WHERE id = w.id AND lease_epoch = w.epoch
        OFFSET 0 FOR UPDATE SKIP LOCKED
    ) j
    WHERE j.status = 'running'
), renewed AS (
    UPDATE runner_jobs j SET lease_expires_at = now() + $3 * interval '1 second'
    FROM lockable l WHERE j.id = l.id
    RETURNING j.id
), worker AS (
    INSERT INTO runner_workers (id, host, pid, queues, concurrency, pool) VALUES ($4, $5, $6, $7, $8, $9::jsonb)
    ON CONFLICT (id) DO UPDATE SET last_heartbeat_at = now(), pool = EXCLUDED.pool
    RETURNING id
)
SELECT coalesce((SELECT array_agg(id) FROM held), '{}'::bigint[]) AS held,
       coalesce((SELECT array_agg(id) FROM renewed), '{}'::bigint[]) AS renewed,
       (SELECT count(*) FROM worker) AS worker_rows
"""

UNREGISTER_WORKER = "DELETE FROM runner_workers WHERE id = $1"

# Another live process with this worker id: leases are owned by worker id, so two would take each other's.
WORKER_ID_IN_USE = """
SELECT host, pid, extract(epoch FROM now() - last_heartbeat_at) AS age_s FROM runner_workers
WHERE id = $1 AND (host, pid) <> ($2, $3) AND last_heartbeat_at > now() - $4 * interval '1 second'
"""

# Stale-job recovery. SKIP LOCKED plus the re-checked WHERE make it safe when every worker runs it. A job
# whose cancel was asked for ends cancelled rather than running again. The running jobs are read through
# runner_jobs_unfinished_idx (status = 'running' is its leading index condition) and sorted: no index covers
# lease_expires_at, so a heartbeat (which writes only that column) is a HOT update.
_RESCUE_MESSAGE = """'lease of ' || coalesce(j.lease_owner, '?') || ' expired at '
                 || to_char(j.lease_expires_at, 'YYYY-MM-DD"T"HH24:MI:SS.MSOF')
                 || CASE WHEN d.new_status = 'cancelled' THEN '; cancelled by request'
                         WHEN d.new_status = 'failed' AND j.recoveries >= $1
                         THEN '; recovery limit ' || $1 || ' reached'
                         WHEN d.new_status = 'failed' THEN '; max_attempts ' || j.max_attempts || ' reached'
                         ELSE '' END"""
RESCUE_STALE = f"""
WITH stale AS (
    SELECT id FROM runner_jobs
    WHERE status = 'running' AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), decided AS (
    SELECT j.id, j.lease_epoch,
           CASE WHEN j.cancel_requested THEN 'cancelled'
                WHEN j.recoveries >= $1 OR j.attempts + 1 >= j.max_attempts THEN 'failed'
                ELSE 'pending' END AS new_status
    FROM runner_jobs j JOIN stale s ON s.id = j.id
)
UPDATE runner_jobs j
SET status = d.new_status,
    recoveries = j.recoveries + 1,
    attempts = j.attempts + 1,
    last_error = {_RESCUE_MESSAGE},
    attempt_log = {_append_attempt('j', "'recovered'", 'd.new_status', _RESCUE_MESSAGE)},
    lease_owner = NULL, lease_expires_at = NULL, run_at = now(),
    finished_at = CASE WHEN d.new_status <> 'pending' THEN now() END
FROM decided d
WHERE j.id = d.id AND j.lease_epoch = d.lease_epoch AND j.status = 'running'
RETURNING j.id, j.kind, j.status
"""

# Hands back, without using an attempt, the running jobs this worker owns but does not run: after a claim
# whose result was lost (a timeout, a dropped connection) and at shutdown. The claim's epochs never reached
# us, so the fence here is the owner (worker ids are unique per process) plus the ids still running here.
RELEASE_OWNED_EXCEPT = f"""
UPDATE runner_jobs j
SET status = CASE WHEN j.cancel_requested THEN 'cancelled' ELSE 'pending' END,
    finished_at = CASE WHEN j.cancel_requested THEN now() END,
    last_error = CASE WHEN j.cancel_requested THEN 'cancelled by request' ELSE j.last_error END,
    attempt_log = {_append_attempt("j", "'handed back'",
                                   "CASE WHEN j.cancel_requested THEN 'cancelled' ELSE 'pending' END",
                                   "CASE WHEN j.cancel_requested THEN 'cancelled by request' END")},
    lease_owner = NULL, lease_expires_at = NULL, run_at = now()
WHERE j.status = 'running' AND j.lease_owner = $1 AND NOT (j.id = ANY($2::bigint[]))
RETURNING j.id, j.kind, j.status
"""

# Retention: finished jobs older than the retention window go, in bounded batches.
DELETE_FINISHED_BEFORE = """
DELETE FROM runner_jobs WHERE id IN (
    SELECT id FROM runner_jobs
    WHERE status IN ('succeeded', 'failed', 'cancelled') AND finished_at < now() - $1 * interval '1 second'
    LIMIT $2
)
"""

# Vacuum of the jobs table between autovacuum's rounds (runner.loops.vacuum). Every claim leaves a dead
# entry at the front of the claim index that later claims step over until a vacuum removes it.
JOBS_DEAD_ROWS = """
SELECT coalesce(n_dead_tup, 0) FROM pg_stat_user_tables WHERE relid = 'runner_jobs'::regclass
"""
# Owner (or PG 17's MAINTAIN privilege): anyone else's VACUUM is skipped with a warning.
MAY_VACUUM_JOBS = """
SELECT pg_has_role(current_user, relowner, 'USAGE')
       OR coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = current_user), false)
FROM pg_class WHERE oid = 'runner_jobs'::regclass
"""
# One vacuuming worker at a time across replicas; the lock is the session's, released right after.
TRY_VACUUM_LOCK = "SELECT pg_try_advisory_lock(hashtext('runner_jobs vacuum'))"
VACUUM_UNLOCK = "SELECT pg_advisory_unlock(hashtext('runner_jobs vacuum'))"
# SKIP_LOCKED: when autovacuum (or anyone) is at it already, do nothing rather than queue behind it.
# INDEX_CLEANUP ON: the dead index entries are the point, even when few heap pages have dead rows.
VACUUM_JOBS = "VACUUM (SKIP_LOCKED, INDEX_CLEANUP ON) runner_jobs"

DELETE_DEAD_WORKERS = """
DELETE FROM runner_workers WHERE last_heartbeat_at < now() - $1 * interval '1 second'
"""

# All outcomes of a batch in one statement. outcome: succeeded | cancelled | released | error | fatal.
# Each written row gets its attempt appended to attempt_log (released: 'handed back').
# delay: seconds until a job going back to pending may run again (the caller's retry policy).
# A row someone holds locked is skipped (SKIP LOCKED) and reported `busy`: still ours, written next flush.
# A job whose cancel was asked for does not go back to pending: it ends cancelled. Rows are looked up by
# primary key in LATERAL subqueries, as in HEARTBEAT: linear in the batch whatever the plan.
COMPLETE = f"""
WITH outcome AS MATERIALIZED (
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::float8[], $6::text[])
             AS t(id, epoch, outcome, error, delay, result)
), decided AS (
    SELECT l.id, o.outcome, o.error, o.delay, o.result,
           CASE
               WHEN o.outcome = 'succeeded' THEN 'succeeded'
               WHEN o.outcome = 'cancelled' THEN 'cancelled'
               WHEN o.outcome = 'fatal' THEN 'failed'
               WHEN o.outcome = 'error' AND l.attempts + 1 >= l.max_attempts THEN 'failed'
               WHEN l.cancel_requested THEN 'cancelled'
               ELSE 'pending'
           END AS new_status
    FROM outcome o, LATERAL (
        SELECT id, status, attempts, max_attempts, cancel_requested FROM runner_jobs
        WHERE id = o.id AND lease_epoch = o.epoch
        OFFSET 0 FOR UPDATE SKIP LOCKED
    ) l
    WHERE l.status = 'running'
), written AS (
    UPDATE runner_jobs j
    SET status = d.new_status,
        attempts = CASE WHEN d.outcome IN ('error', 'fatal') THEN j.attempts + 1 ELSE j.attempts END,
        run_at = CASE WHEN d.new_status = 'pending' THEN now() + d.delay * interval '1 second' ELSE j.run_at END,
        last_error = CASE WHEN d.outcome IN ('error', 'fatal', 'cancelled') THEN d.error
                          WHEN d.new_status = 'cancelled' THEN 'cancelled by request'
                          ELSE j.last_error END,
        result = CASE WHEN d.new_status = 'succeeded' THEN d.result::jsonb ELSE j.result END,
        attempt_log = {_append_success("j", "d.new_status = 'succeeded'").format(append=_append_attempt(
            "j", "CASE WHEN d.outcome = 'released' THEN 'handed back' ELSE d.outcome END", "d.new_status", "d.error"))},
        lease_owner = NULL, lease_expires_at = NULL,
        finished_at = CASE WHEN d.new_status = 'pending' THEN NULL ELSE now() END
    FROM decided d
    WHERE j.id = d.id
    RETURNING j.id, j.kind, j.status, d.outcome, j.queue, j.fifo_key
), key_freed AS (  -- the next job of a key may run now: wake the workers of its queue (one per queue)
    SELECT count(pg_notify('runner_jobs', q.queue)) AS n
    FROM (SELECT DISTINCT queue FROM written WHERE fifo_key IS NOT NULL) q
)
SELECT id, kind, status, outcome, false AS busy FROM written, key_freed
UNION ALL
SELECT o.id, b.kind, b.status, o.outcome, true AS busy
FROM outcome o, LATERAL (
    SELECT kind, status FROM runner_jobs WHERE id = o.id AND lease_epoch = o.epoch OFFSET 0
) b
WHERE b.status = 'running' AND o.id NOT IN (SELECT id FROM written)
"""

# A handler's own transaction marks its job succeeded (ctx.complete_in): the effect and the completion
# commit together. Fenced like every write; n = 0 means the lease is gone and the caller rolls back.
# A keyed job's NOTIFY is delivered at that commit, when the next job of its key may run.
COMPLETE_IN_TRANSACTION = f"""
WITH done AS (
    UPDATE runner_jobs j
    SET status = 'succeeded', result = $3::text::jsonb,
        attempt_log = {_append_success("j", "true").format(
            append=_append_attempt("j", "'succeeded'", "'succeeded'", "NULL::text"))},
        lease_owner = NULL, lease_expires_at = NULL, finished_at = now()
    WHERE j.id = $1 AND j.lease_epoch = $2 AND j.status = 'running'
    RETURNING j.queue, j.fifo_key
)
SELECT count(*) AS n, count(pg_notify('runner_jobs', queue)) FILTER (WHERE fifo_key IS NOT NULL) AS notified
FROM done
"""

SAVE_PROGRESS = """
UPDATE runner_jobs
SET progress_done = coalesce($3, progress_done), progress_total = coalesce($4, progress_total),
    checkpoint = coalesce($5::jsonb, checkpoint)
WHERE id = $1 AND lease_epoch = $2 AND status = 'running'
"""

CANCEL_REQUESTED_AMONG = """
SELECT id FROM runner_jobs WHERE id = ANY($1::bigint[]) AND cancel_requested AND status = 'running'
"""

LOCK_JOB = "SELECT id, status FROM runner_jobs WHERE id = $1 FOR UPDATE"

REQUEST_CANCEL = """
UPDATE runner_jobs
SET cancel_requested = true,
    status = CASE WHEN status = 'pending' THEN 'cancelled' ELSE status END,
    finished_at = CASE WHEN status = 'pending' THEN now() ELSE finished_at END,
    last_error = CASE WHEN status = 'pending' THEN 'cancelled before it ran' ELSE last_error END
WHERE id = $1
RETURNING status
"""

NOTIFY_CANCEL = "SELECT pg_notify('runner_cancel', $1::text)"

# A parent's cancel reaches its children (a parallel backfill's chunks), as REQUEST_CANCEL does for one
# job: pending ones end cancelled, running ones are asked to stop (NOTIFY runner_cancel). Returns how many.
CANCEL_CHILDREN = """
WITH written AS (
    UPDATE runner_jobs
    SET cancel_requested = true,
        status = CASE WHEN status = 'pending' THEN 'cancelled' ELSE status END,
        finished_at = CASE WHEN status = 'pending' THEN now() ELSE finished_at END,
        last_error = CASE WHEN status = 'pending' THEN 'cancelled with its parent job ' || $1::text
                          ELSE last_error END
    WHERE parent_id = $1 AND status IN ('pending', 'running') AND NOT cancel_requested
    RETURNING id, status
)
SELECT count(*) AS n, count(pg_notify('runner_cancel', id::text)) FILTER (WHERE status = 'running') AS notified
FROM written
"""

RETRY = """
UPDATE runner_jobs
SET status = 'pending', attempts = 0, recoveries = 0, run_at = now(), cancel_requested = false,
    finished_at = NULL, lease_owner = NULL, lease_expires_at = NULL
WHERE id = $1 AND status IN ('failed', 'cancelled')
RETURNING queue
"""

NOTIFY_JOBS = "SELECT pg_notify('runner_jobs', $1::text)"
NOTIFY_JOBS_MANY = "SELECT count(pg_notify('runner_jobs', q)) FROM unnest($1::text[]) AS q"

# A parent's retry reaches its failed and cancelled children (as RETRY does); the succeeded ones keep
# their work. One NOTIFY per queue they are in.
RETRY_CHILDREN = """
WITH written AS (
    UPDATE runner_jobs
    SET status = 'pending', attempts = 0, recoveries = 0, run_at = now(), cancel_requested = false,
        finished_at = NULL, lease_owner = NULL, lease_expires_at = NULL
    WHERE parent_id = $1 AND status IN ('failed', 'cancelled')
    RETURNING queue
)
SELECT count(*) AS n, (SELECT count(pg_notify('runner_jobs', q.queue)) FROM (SELECT DISTINCT queue FROM written) q)
FROM written
"""

# A parent's children, through the partial index on parent_id: what a parallel backfill watches.
CHILDREN = """
SELECT id, kind, status, attempts, recoveries, progress_done, progress_total, payload::text AS payload,
       checkpoint::text AS checkpoint, result::text AS result, last_error, lease_owner, started_at, finished_at
FROM runner_jobs WHERE parent_id = $1 ORDER BY id
"""

# JSON columns come back as text and are decoded per row (runner.queue.job_row): a payload another
# producer wrote that Python cannot decode is shown as such instead of failing the read.
GET_JOB = """
SELECT id, kind, queue, payload::text AS payload, status, priority, run_at, attempts, max_attempts, recoveries,
       lease_owner, lease_expires_at, lease_epoch, progress_done, progress_total, checkpoint::text AS checkpoint,
       cancel_requested, last_error, dedupe_key, result::text AS result, created_at, started_at, finished_at,
       schedule_name, schedule_tick, parent_id, fifo_key
FROM runner_jobs WHERE id = $1
"""

# Exact, scanning the whole table (history included): tests and one-off checks, never a loop. The depth
# sampler uses COUNT_UNFINISHED_BY_STATUS and COUNT_RECENT_FINISHED_BY_STATUS below.
COUNT_BY_STATUS = "SELECT status, count(*) AS n FROM runner_jobs GROUP BY status"

RUNNING_JOBS = """
SELECT id, kind, lease_owner, progress_done, progress_total, started_at, attempts
FROM runner_jobs WHERE status = 'running' ORDER BY id LIMIT $1
"""

# Work a draining worker still waits for, of the kinds it has: runnable jobs, running ones, and jobs that
# ran before and wait to run again (a retry in its backoff, a release after PoolExhausted). Jobs only
# delayed at enqueue are not waited for. Run on every short claim and completer flush: it reads
# runner_jobs_unfinished_idx (unfinished jobs only), never the history (a seq scan of 2 M finished rows
# took 335-625 ms; this is an index scan of a few buffers at any history size).
HAS_RUNNABLE_OR_RUNNING = """
SELECT EXISTS (
    SELECT 1 FROM runner_jobs
    WHERE status IN ('pending', 'running') AND queue = ANY($1::text[]) AND kind = ANY($2::text[])
      AND (status = 'running' OR run_at <= now() OR started_at IS NOT NULL)
)
"""

# --- counts that never scan history
# Pending and running jobs are counted exactly, through runner_jobs_unfinished_idx (bounded by live work).
# Finished jobs are counted exactly through runner_jobs_finished_idx up to $1 rows (the newest ones); past
# that the caller estimates them: ESTIMATE_FINISHED_BY_STATUS (the planner's own numbers: reltuples scaled
# to the table's current size, times the frequency of each status in pg_stats), split by queue and kind in
# the proportions of the newest $1.
COUNT_UNFINISHED_BY_STATUS = """
SELECT status, count(*) AS n FROM runner_jobs WHERE status IN ('pending', 'running') GROUP BY status
"""

COUNT_RECENT_FINISHED_BY_STATUS = """
SELECT status, count(*) AS n FROM (
    SELECT status FROM runner_jobs WHERE status IN ('succeeded', 'failed', 'cancelled')
    ORDER BY finished_at DESC LIMIT $1
) recent GROUP BY status
"""

COUNT_UNFINISHED_BY_QUEUE = """
SELECT queue, kind, status, (status = 'pending' AND run_at > now()) AS delayed, count(*) AS n
FROM runner_jobs
WHERE status IN ('pending', 'running')
GROUP BY queue, kind, status, delayed
"""

COUNT_RECENT_FINISHED_BY_QUEUE = """
SELECT queue, kind, status, false AS delayed, count(*) AS n FROM (
    SELECT queue, kind, status FROM runner_jobs WHERE status IN ('succeeded', 'failed', 'cancelled')
    ORDER BY finished_at DESC LIMIT $1
) recent GROUP BY queue, kind, status
"""

ESTIMATE_FINISHED_BY_STATUS = """
SELECT v.status, round(v.freq * greatest(c.reltuples, 0) / greatest(c.relpages, 1)
                       * (pg_relation_size(c.oid) / current_setting('block_size')::int))::bigint AS n
FROM pg_class c
JOIN pg_stats s ON s.schemaname = c.relnamespace::regnamespace::text AND s.tablename = c.relname
                AND s.attname = 'status'
CROSS JOIN LATERAL unnest(s.most_common_vals::text::text[], s.most_common_freqs) AS v(status, freq)
WHERE c.oid = 'runner_jobs'::regclass AND v.status IN ('succeeded', 'failed', 'cancelled')
"""


# --- operations: list and bulk by filter
# Filters are three text arrays, $1 statuses, $2 kinds, $3 queues; an empty array means "any". Bulk writes
# work in batches of at most $4 rows, each batch one statement: rows are taken in id order with
# FOR UPDATE SKIP LOCKED (a row a worker holds is never waited for, so no deadlock), and `more` says whether
# rows still match outside this batch (past the limit, or skipped because someone holds them), so the
# caller goes on. $5 is a cutoff on the database clock taken once before the first batch: jobs created
# (cancel) or finished (retry, purge) after it are not touched, so a busy queue cannot keep a bulk
# operation going for ever.
CLOCK = "SELECT now()"

_FILTER = """(cardinality($1::text[]) = 0 OR status = ANY($1::text[]))
      AND (cardinality($2::text[]) = 0 OR kind = ANY($2::text[]))
      AND (cardinality($3::text[]) = 0 OR queue = ANY($3::text[]))"""

# The same columns as GET_JOB, newest first, keyset paging by id ($5: only ids below it; NULL: from the top).
_JOB_COLUMNS = GET_JOB[: GET_JOB.index("FROM runner_jobs")]
LIST_JOBS = f"""
{_JOB_COLUMNS}FROM runner_jobs
WHERE {_FILTER}
  AND ($5::bigint IS NULL OR id < $5::bigint)
ORDER BY id DESC
LIMIT $4
"""


def _bulk(condition: str, write: str, notify: str) -> str:
    return f"""
WITH locked AS (
    SELECT id FROM runner_jobs
    WHERE {_FILTER}
      AND {condition}
    ORDER BY id
    LIMIT $4
    FOR UPDATE SKIP LOCKED
), written AS (
    {write}
), notified AS (
    {notify}
)
SELECT (SELECT count(*) FROM written) AS n,
       (SELECT n FROM notified) AS notified,
       EXISTS (SELECT 1 FROM runner_jobs
               WHERE {_FILTER}
                 AND {condition}
                 AND id NOT IN (SELECT id FROM locked)) AS more
"""


# Pending jobs end cancelled at once; running ones get cancel_requested and a NOTIFY on runner_cancel (as
# REQUEST_CANCEL + NOTIFY_CANCEL do for one job), which stops their handlers.
CANCEL_WHERE = _bulk(
    "status IN ('pending', 'running') AND NOT cancel_requested AND created_at <= $5::timestamptz",
    """UPDATE runner_jobs j
    SET cancel_requested = true,
        status = CASE WHEN j.status = 'pending' THEN 'cancelled' ELSE j.status END,
        finished_at = CASE WHEN j.status = 'pending' THEN now() ELSE j.finished_at END,
        last_error = CASE WHEN j.status = 'pending' THEN 'cancelled before it ran' ELSE j.last_error END
    FROM locked l WHERE j.id = l.id
    RETURNING j.id, j.status""",
    "SELECT count(pg_notify('runner_cancel', id::text)) AS n FROM written WHERE status = 'running'",
)

# As RETRY for one job: failed or cancelled jobs back to pending with their attempts reset, and one NOTIFY
# on runner_jobs per queue they are in.
RETRY_WHERE = _bulk(
    "status IN ('failed', 'cancelled') AND (finished_at IS NULL OR finished_at <= $5::timestamptz)",
    """UPDATE runner_jobs j
    SET status = 'pending', attempts = 0, recoveries = 0, run_at = now(), cancel_requested = false,
        finished_at = NULL, lease_owner = NULL, lease_expires_at = NULL
    FROM locked l WHERE j.id = l.id
    RETURNING j.id, j.queue""",
    "SELECT count(pg_notify('runner_jobs', q.queue)) AS n FROM (SELECT DISTINCT queue FROM written) q",
)

# Finished jobs only, never pending or running ones (the status test is in the statement, whatever the
# filter says); $5 is the newest finished_at that goes (now() - older_than at the start).
PURGE_WHERE = _bulk(
    "status IN ('succeeded', 'failed', 'cancelled') AND finished_at < $5::timestamptz",
    "DELETE FROM runner_jobs j USING locked l WHERE j.id = l.id RETURNING j.id",
    "SELECT 0 AS n",
)

# Exact counts by queue, kind and status, scanning the whole table: for tests and small tables only
# (`runner status` uses COUNT_UNFINISHED_BY_QUEUE and COUNT_RECENT_FINISHED_BY_QUEUE).
COUNT_BY_QUEUE = """
SELECT queue, kind, status, (status = 'pending' AND run_at > now()) AS delayed, count(*) AS n
FROM runner_jobs
GROUP BY queue, kind, status, delayed
ORDER BY queue, kind, status, delayed
"""

# Workers whose heartbeat is recent and whose `queues` (comma-separated) include $1.
LIVE_WORKERS_FOR_QUEUE = """
SELECT count(*) FROM runner_workers
WHERE last_heartbeat_at > now() - $2 * interval '1 second' AND $1::text = ANY(string_to_array(queues, ','))
"""

# --- periodic jobs (runner.schedules, runner.loops.scheduler) ----------------------------------------
SCHEDULES_CHANNEL = "runner_schedules"
_SCHEDULE_COLUMNS = """name, kind, payload::text AS payload, queue, priority, cron, every_s, timezone, missed,
       missed_limit, paused, source, next_tick, last_tick, last_job_id, created_at, updated_at"""

# A code-declared schedule, upserted at worker start: a changed definition replaces the stored one (its
# next tick recomputed only when the rule itself changed); a pause an operator set is kept.
SCHEDULE_UPSERT_CODE = """
INSERT INTO runner_schedules (name, kind, payload, queue, priority, cron, every_s, timezone, missed,
                              missed_limit, source, next_tick)
VALUES ($1, $2, $3::text::jsonb, $4, $5, $6, $7, $8, $9, $10, 'code', $11)
ON CONFLICT (name) DO UPDATE
SET kind = EXCLUDED.kind, payload = EXCLUDED.payload, queue = EXCLUDED.queue, priority = EXCLUDED.priority,
    cron = EXCLUDED.cron, every_s = EXCLUDED.every_s, timezone = EXCLUDED.timezone, missed = EXCLUDED.missed,
    missed_limit = EXCLUDED.missed_limit, source = 'code', updated_at = now(),
    next_tick = CASE WHEN (runner_schedules.cron, runner_schedules.every_s, runner_schedules.timezone)
                          IS DISTINCT FROM (EXCLUDED.cron, EXCLUDED.every_s, EXCLUDED.timezone)
                     THEN EXCLUDED.next_tick ELSE runner_schedules.next_tick END
WHERE (runner_schedules.kind, runner_schedules.payload, runner_schedules.queue, runner_schedules.priority,
       runner_schedules.cron, runner_schedules.every_s, runner_schedules.timezone, runner_schedules.missed,
       runner_schedules.missed_limit, runner_schedules.source)
      IS DISTINCT FROM (EXCLUDED.kind, EXCLUDED.payload, EXCLUDED.queue, EXCLUDED.priority, EXCLUDED.cron,
                        EXCLUDED.every_s, EXCLUDED.timezone, EXCLUDED.missed, EXCLUDED.missed_limit, 'code')
RETURNING name
"""

SCHEDULE_INSERT = """
INSERT INTO runner_schedules (name, kind, payload, queue, priority, cron, every_s, timezone, missed,
                              missed_limit, source, next_tick)
VALUES ($1, $2, $3::text::jsonb, $4, $5, $6, $7, $8, $9, $10, 'cli', $11)
ON CONFLICT (name) DO NOTHING
RETURNING name
"""

SCHEDULE_LIST = f"SELECT {_SCHEDULE_COLUMNS} FROM runner_schedules ORDER BY name"
SCHEDULE_GET = f"SELECT {_SCHEDULE_COLUMNS} FROM runner_schedules WHERE name = $1"
SCHEDULE_CLOCK = "SELECT clock_timestamp()"

# Resuming recomputes the next tick from now ($3): the ticks of the pause are not owed.
SCHEDULE_SET_PAUSED = """
UPDATE runner_schedules SET paused = $2, updated_at = now(), next_tick = coalesce($3, next_tick)
WHERE name = $1
RETURNING name
"""
SCHEDULE_DELETE = "DELETE FROM runner_schedules WHERE name = $1 RETURNING name"
NOTIFY_SCHEDULES = "SELECT pg_notify('runner_schedules', $1::text)"

# The due schedules, locked: a schedule another worker is firing is skipped (it fires it), so each tick is
# looked at by one worker; the unique (schedule_name, schedule_tick) index makes a second insert a no-op.
SCHEDULE_DUE = f"""
SELECT {_SCHEDULE_COLUMNS}, clock_timestamp() AS now
FROM runner_schedules
WHERE NOT paused AND next_tick <= clock_timestamp()
ORDER BY next_tick
LIMIT $1
FOR UPDATE SKIP LOCKED
"""

SCHEDULE_ENQUEUE = """
WITH inserted AS (
    INSERT INTO runner_jobs (kind, queue, payload, priority, max_attempts, schedule_name, schedule_tick)
    SELECT $1, $2, $3::text::jsonb, $4, $5, $6, t.tick
    FROM unnest($7::timestamptz[]) AS t(tick)
    ORDER BY t.tick
    ON CONFLICT (schedule_name, schedule_tick) WHERE schedule_name IS NOT NULL DO NOTHING
    RETURNING id, schedule_tick
)
SELECT i.id, i.schedule_tick, (SELECT pg_notify('runner_jobs', $2)) IS NULL AS notified
FROM inserted i
ORDER BY i.schedule_tick
"""

SCHEDULE_ADVANCE = """
UPDATE runner_schedules
SET next_tick = $2, last_tick = coalesce($3, last_tick), last_job_id = coalesce($4, last_job_id)
WHERE name = $1
"""

# Seconds until the next active schedule's tick (NULL: none), by the database's clock.
SCHEDULE_SECONDS_TO_NEXT = """
SELECT extract(epoch FROM min(next_tick) - clock_timestamp())::float8 FROM runner_schedules WHERE NOT paused
"""


# --- the dashboard (runner.dashboard) ------------------------------------------------------------------
# Read-mostly statements for the web dashboard. None scans the history: finished jobs are read through
# runner_jobs_finished_idx (the last hour, or the newest $n), unfinished ones through
# runner_jobs_unfinished_idx, single jobs and pages by primary key. Counts reuse COUNT_UNFINISHED_BY_QUEUE,
# COUNT_RECENT_FINISHED_BY_QUEUE and ESTIMATE_FINISHED_BY_STATUS (through JobQueue.job_counts_by_queue).
# Its actions (cancel, retry, pause) go through JobQueue and ScheduleStore, never through statements here.

# Jobs finished per minute over the last hour (60 buckets, empty ones included), through the finished index.
DASH_THROUGHPUT = """
WITH buckets AS (
    SELECT generate_series(date_trunc('minute', now()) - interval '59 minutes', date_trunc('minute', now()),
                           interval '1 minute') AS minute
), finished AS (
    SELECT date_trunc('minute', finished_at) AS minute, status FROM runner_jobs
    WHERE status IN ('succeeded', 'failed', 'cancelled')
      AND finished_at >= date_trunc('minute', now()) - interval '59 minutes'
)
SELECT b.minute,
       count(f.status) FILTER (WHERE f.status = 'succeeded') AS succeeded,
       count(f.status) FILTER (WHERE f.status = 'failed') AS failed,
       count(f.status) FILTER (WHERE f.status = 'cancelled') AS cancelled
FROM buckets b LEFT JOIN finished f ON f.minute = b.minute
GROUP BY b.minute
ORDER BY b.minute
"""

# Every registered worker with its heartbeat age and the jobs it holds (running jobs: the unfinished index).
DASH_WORKERS = """
SELECT w.id, w.host, w.pid, w.queues, w.concurrency, w.started_at, w.last_heartbeat_at, w.pool,
       extract(epoch FROM now() - w.last_heartbeat_at)::float8 AS heartbeat_age_s,
       coalesce(r.running, 0) AS running
FROM runner_workers w
LEFT JOIN (
    SELECT lease_owner, count(*) AS running FROM runner_jobs
    WHERE status = 'running' AND lease_owner IS NOT NULL GROUP BY lease_owner
) r ON r.lease_owner = w.id
ORDER BY w.id
"""

# A job list's columns: no payload, checkpoint or result (up to a megabyte each), the error's first 300
# characters. The newest first by primary key, keyset paging on id ($5: only ids below it).
_DASH_LIST_COLUMNS = """id, kind, queue, status, priority, attempts, max_attempts, recoveries, progress_done,
       progress_total, cancel_requested, left(last_error, 300) AS last_error, lease_owner, created_at,
       started_at, finished_at, parent_id"""

# As LIST_JOBS, plus $6: text the last error contains (case-insensitive; NULL: any; strpos, not LIKE, so an
# operator's % or _ is matched literally) and $7: the lowest id to look at (NULL: none). No index serves a
# kind, a finished status or an error text, so the caller bounds those searches to a window of ids below
# $5 (runner.dashboard.data.SEARCH_WINDOW) and pages on through older windows.
DASH_LIST_JOBS = f"""
SELECT {_DASH_LIST_COLUMNS} FROM runner_jobs
WHERE {_FILTER}
  AND ($5::bigint IS NULL OR id < $5::bigint)
  AND ($6::text IS NULL OR strpos(lower(last_error), lower($6::text)) > 0)
  AND ($7::bigint IS NULL OR id >= $7::bigint)
ORDER BY id DESC
LIMIT $4
"""

DASH_MAX_JOB_ID = "SELECT max(id) FROM runner_jobs"

# A job's ended attempts (the attempt log, at most ATTEMPT_LOG_LIMIT objects), by primary key.
DASH_JOB_ATTEMPTS = "SELECT attempt_log::text FROM runner_jobs WHERE id = $1"

# The newest jobs (primary key, backwards).
DASH_RECENT_JOBS = f"SELECT {_DASH_LIST_COLUMNS} FROM runner_jobs ORDER BY id DESC LIMIT $1"

# Live ones (the unfinished index) of the given kinds: the backfills' page. Top-level jobs only: a parallel
# backfill's chunks are shown under their parent.
DASH_UNFINISHED_OF_KINDS = f"""
SELECT {_DASH_LIST_COLUMNS}, payload::text AS payload FROM runner_jobs
WHERE status IN ('pending', 'running') AND kind = ANY($1::text[]) AND parent_id IS NULL
ORDER BY id DESC
LIMIT $2
"""

# Finished ones of the given kinds among the newest $2 finished jobs (the finished index, bounded).
DASH_RECENT_FINISHED_OF_KINDS = f"""
SELECT {_DASH_LIST_COLUMNS}, payload::text AS payload FROM (
    SELECT * FROM runner_jobs WHERE status IN ('succeeded', 'failed', 'cancelled')
    ORDER BY finished_at DESC LIMIT $2
) recent
WHERE kind = ANY($1::text[]) AND parent_id IS NULL
ORDER BY id DESC
LIMIT $3
"""

# Children of many parents at once (the parent index): a page of parallel backfills' chunks.
DASH_CHILDREN_OF = f"""
SELECT {_DASH_LIST_COLUMNS}, payload::text AS payload FROM runner_jobs
WHERE parent_id = ANY($1::bigint[])
ORDER BY parent_id, id
"""

# --- the dashboard: consensus (the consensus plugin's tables, read only; absent when it never migrated)
DASH_CONSENSUS_PRESENT = "SELECT to_regclass('runner_consensus_transactions') IS NOT NULL"
# Which columns of later consensus revisions the table has (round: 0009, appeals: 0011): the list shows them
# when they are there, and answers on an older schema too.
DASH_CONSENSUS_COLUMNS = """
SELECT to_regclass('runner_consensus_transactions') IS NOT NULL AS present,
       coalesce(array_agg(attname::text) FILTER (WHERE attname IS NOT NULL), '{}') AS columns
FROM pg_attribute
WHERE attrelid = to_regclass('runner_consensus_transactions') AND attname IN ('round', 'appeals') AND NOT attisdropped
"""

# Unfinished transactions by contract and status, exact (runner_consensus_tx_unfinished_idx).
DASH_CONSENSUS_UNFINISHED = """
SELECT to_address, status, count(*) AS n FROM runner_consensus_transactions
WHERE status NOT IN ('FINALIZED', 'CANCELED')
GROUP BY to_address, status
"""

# Done ones (FINALIZED, CANCELED) by contract among the newest $1 transactions (the seq index, backwards).
DASH_CONSENSUS_RECENT_DONE = """
SELECT to_address, status, count(*) AS n FROM (
    SELECT to_address, status FROM runner_consensus_transactions ORDER BY seq DESC LIMIT $1
) recent
WHERE status IN ('FINALIZED', 'CANCELED')
GROUP BY to_address, status
"""

_DASH_TX_COLUMNS = """hash, seq, status, from_address, to_address, leader, outcome, reason, created_at, activated_at,
       timestamp_awaiting_finalization, finalized_at, job_id, job_epoch, lease_epoch, recovery_count,
       activated_event_tx, proposed_event_tx, committed_event_tx, revealed_event_tx, decided_event_tx,
       finalized_event_tx"""

# The newest transactions, optionally of one status ($1) and contract ($2), keyset paging on seq ($3); with
# their round and number of appeals when the table has those columns (dash_consensus_list).
_DASH_CONSENSUS_LIST = """
SELECT {columns} FROM runner_consensus_transactions
WHERE ($1::text IS NULL OR status = $1::text) AND ($2::text IS NULL OR to_address = $2::text)
  AND ($3::bigint IS NULL OR seq < $3::bigint)
ORDER BY seq DESC
LIMIT $4
"""


def dash_consensus_list(with_round: bool, with_appeals: bool) -> str:
    extra = (", round" if with_round else "") + (
        ", CASE WHEN jsonb_typeof(appeals) = 'array' THEN jsonb_array_length(appeals) END AS appeal_count"
        if with_appeals else "")
    return _DASH_CONSENSUS_LIST.format(columns=_DASH_TX_COLUMNS + extra)

# The whole row as JSON too: columns a later consensus revision adds (rounds, say) are shown without a change
# here.
DASH_CONSENSUS_GET = f"""
SELECT {_DASH_TX_COLUMNS}, input::text AS input, votes::text AS votes, result::text AS result,
       state_patch::text AS state_patch, to_jsonb(t)::text AS whole_row
FROM runner_consensus_transactions t WHERE hash = $1
"""
