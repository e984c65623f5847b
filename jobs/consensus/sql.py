"""Every SQL statement of the consensus loops, in one place.

Leases are the core's: a transaction is held by the runner_jobs row (``job_id``) whose attempt
(``job_epoch``, that job's lease epoch) took it: a ``consensus.contract`` job (one at a time per contract,
its fifo_key) or the ``consensus.finality`` job. The core claims, heartbeats and rescues those jobs; here a
take bumps the transaction's own ``lease_epoch``, and every write for a taken transaction is fenced by
``hash + lease_epoch`` and HELD: its job still runs the attempt that took it (a rescued job's old attempt,
a rolled-back or reset transaction's old holder, change nothing). Hot paths are set-based.
"""

from __future__ import annotations

T = "runner_consensus_transactions"
ACCEPTED_STATES = "runner_consensus_accepted_states"
FINALIZED_STATES = "runner_consensus_finalized_states"
DEPLOYMENTS = "runner_consensus_deployments"
VALIDATORS = "runner_consensus_validators"

IN_MACHINE = "('ACTIVATED', 'PROPOSING', 'COMMITTING', 'REVEALING')"
DECIDED = "('ACCEPTED', 'UNDETERMINED', 'LEADER_TIMEOUT', 'VALIDATORS_TIMEOUT')"
DONE = "('FINALIZED', 'CANCELED')"
# The transaction's holder is alive: the job that took it still runs that attempt (its lease is renewed by
# the core's heartbeat; a rescue or a new claim of the job ends it). NOT_HELD: nobody, or a dead holder.
HELD_BY_LIVE_JOB = """EXISTS (SELECT 1 FROM runner_jobs j
                     WHERE j.id = {a}.job_id AND j.lease_epoch = {a}.job_epoch AND j.status = 'running')"""
HELD = HELD_BY_LIVE_JOB.format(a="t")
NOT_HELD = f"(t.job_id IS NULL OR NOT {HELD})"
EVENT_COLUMNS = ("activated_event_tx", "proposed_event_tx", "committed_event_tx", "revealed_event_tx",
                 "decided_event_tx", "finalized_event_tx")
CLAIMED_COLUMNS = (
    "t.hash, t.seq, t.lease_epoch, t.status, t.from_address, t.to_address, t.input, t.leader, t.result, "
    "t.recovery_count, t.round, t.rotation_count, t.appeals, t.appeal_failed, "
    + ", ".join(f"t.{c}" for c in EVENT_COLUMNS)
)

INSERT_MANY = f"""
INSERT INTO {T} (hash, from_address, to_address, input)
SELECT s.hash, s.from_address, s.to_address, s.input::jsonb
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY
     AS s(hash, from_address, to_address, input, ord)
ORDER BY s.ord
"""

# --- a contract job's work: one contract, one job at a time (its fifo_key) -------------------------------
# $1 contract, $2 job id, $3 job lease epoch. A take bumps the transaction's epoch and records its holder.
_TAKE_SET = "job_id = $2, job_epoch = $3, lease_epoch = t.lease_epoch + 1"

# A transaction of the contract left in the machine by a holder that died (its worker crashed or froze and
# the core rescued its job) or whose job ended: back to PENDING, one recovery counted; the
# RUNNER_MAX_RECOVERIES-th recovery ($2) ends it UNDETERMINED with the reason instead (its decided event is
# then owed). Counted here, before the core's own limit on the job's recoveries could fail the job first.
RECOVER_LEFTOVERS = f"""
UPDATE {T} t SET {{recover_set}}
WHERE t.to_address = $1 AND t.status IN {IN_MACHINE} AND {NOT_HELD}
RETURNING t.hash, t.status, t.recovery_count, t.reason
"""

# The contract's decided transactions whose decided event is owed and nobody holds (a crash between the
# decision and its event, the recovery cap, a chain reset), in submission order.
TAKE_OWED_DECIDED = f"""
UPDATE {T} t SET {_TAKE_SET}
WHERE t.to_address = $1 AND t.status IN {DECIDED} AND t.decided_event_tx IS NULL AND {NOT_HELD}
RETURNING {CLAIMED_COLUMNS}
"""

# What a run of a contract's job settles before its unit (when nobody holds it): a transaction left in the
# machine, or a decided one whose decided event is owed.
_LEFT_OVER = f"(t.status IN {IN_MACHINE} OR (t.status IN {DECIDED} AND t.decided_event_tx IS NULL))"

# The contract's next unit of work: an appeal asked for (its contract's newer transactions wait for it), else
# its oldest PENDING transaction while nothing of it is in the machine (it goes ACTIVATED), taken only when
# {clear}. `more`: whether the contract has another unit after this one (its job then takes its next turn).
_TAKE_NEXT = f"""
appeal AS (
    SELECT hash FROM {T} t
    WHERE {{clear}} AND t.to_address = $1 AND t.appeal_requested IS NOT NULL AND t.status IN {DECIDED}
      AND {NOT_HELD}
    ORDER BY t.seq LIMIT 1
    FOR UPDATE
), pending AS (
    SELECT hash FROM {T} t
    WHERE {{clear}} AND NOT EXISTS (SELECT 1 FROM appeal)
      AND t.to_address = $1 AND t.status = 'PENDING'
      AND NOT EXISTS (SELECT 1 FROM {T} b WHERE b.to_address = $1 AND b.status IN {IN_MACHINE})
    ORDER BY t.seq LIMIT 1
    FOR UPDATE
), picked AS (
    SELECT hash, true AS is_appeal FROM appeal UNION ALL SELECT hash, false FROM pending
), taken AS (
    UPDATE {T} t
    SET status = CASE WHEN p.is_appeal THEN t.status ELSE 'ACTIVATED' END,
        activated_at = CASE WHEN p.is_appeal THEN t.activated_at ELSE now() END,
        {_TAKE_SET}
    FROM picked p WHERE t.hash = p.hash AND (p.is_appeal OR t.status = 'PENDING')
    RETURNING {CLAIMED_COLUMNS}, t.votes, t.appeal_requested,
        (SELECT a.state FROM {ACCEPTED_STATES} a WHERE a.address = t.to_address) AS accepted_state,
        EXISTS (SELECT 1 FROM {T} m WHERE m.to_address = $1 AND m.status = 'PENDING' AND m.hash <> t.hash)
        OR EXISTS (SELECT 1 FROM {T} m WHERE m.to_address = $1 AND m.appeal_requested IS NOT NULL
                                         AND m.status IN {DECIDED} AND m.hash <> t.hash) AS more
)"""
TAKE_NEXT = f"WITH {_TAKE_NEXT.format(clear='true')} SELECT * FROM taken"
# A contract job's common case in one round trip: nothing left over (in the machine without a live holder)
# and no decided event owed, then TAKE_NEXT; `blocked` says there was (the job recovers and settles those
# first, as RECOVER_LEFTOVERS and TAKE_OWED_DECIDED, then takes its unit with TAKE_NEXT).
TAKE_NEXT_IF_CLEAR = f"""
WITH blocked AS (
    SELECT EXISTS (
        SELECT 1 FROM {T} t
        WHERE t.to_address = $1 AND t.status NOT IN {DONE}
          AND {_LEFT_OVER} AND {NOT_HELD}
    ) AS yes
), {_TAKE_NEXT.format(clear='NOT (SELECT yes FROM blocked)')}
SELECT b.yes AS blocked, x.* FROM blocked b LEFT JOIN taken x ON true
"""

# State transitions, group-committed: each row is ONE transition of one transaction, fenced by its own
# epoch, its holder and the status it leaves; the statement carries many rows. A move to ACCEPTED writes
# the contract's accepted state in the same statement.
# Arrays: hash, epoch, from status, to status, leader, result, votes, reason, state_patch, the four
# event hashes known so far, accepted state (jsonb as text), for a leader rotation the new round and
# rotation count (NULL otherwise: a new round's proposal and votes are not the last round's), and the
# run's draw (NULL: unchanged).
TRANSITION = f"""
WITH i AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[],
                         $15::int[], $16::int[], $17::text[])
        AS i(hash, epoch, from_status, to_status, leader, result, votes, reason, state_patch,
             activated, proposed, committed, revealed, accepted_state, round, rotation_count, draw)
), moved AS (
    UPDATE {T} t
    SET status = i.to_status,
        leader = COALESCE(i.leader, t.leader),
        result = CASE WHEN i.round IS NULL THEN COALESCE(i.result::jsonb, t.result) END,
        votes = CASE WHEN i.round IS NULL THEN COALESCE(i.votes::jsonb, t.votes) END,
        reason = COALESCE(i.reason, t.reason),
        state_patch = i.state_patch::jsonb,
        round = COALESCE(i.round, t.round),
        rotation_count = COALESCE(i.rotation_count, t.rotation_count),
        draw = COALESCE(i.draw::jsonb, t.draw),
        activated_event_tx = COALESCE(t.activated_event_tx, i.activated),
        proposed_event_tx = CASE WHEN i.round IS NULL THEN COALESCE(t.proposed_event_tx, i.proposed) END,
        committed_event_tx = CASE WHEN i.round IS NULL THEN COALESCE(t.committed_event_tx, i.committed) END,
        revealed_event_tx = CASE WHEN i.round IS NULL THEN COALESCE(t.revealed_event_tx, i.revealed) END,
        outcome = CASE WHEN i.to_status IN {DECIDED} THEN i.to_status END,
        timestamp_awaiting_finalization = CASE WHEN i.to_status IN {DECIDED} THEN now() END
    FROM i
    WHERE t.hash = i.hash AND t.lease_epoch = i.epoch AND t.status = i.from_status AND {HELD}
    RETURNING t.hash, t.seq, t.to_address, i.accepted_state
), accepted AS (
    -- one in-flight transaction per contract, so one row per address; DISTINCT ON guards it anyway
    INSERT INTO {ACCEPTED_STATES} (address, state, tx_hash, updated_at)
    SELECT DISTINCT ON (to_address) to_address, accepted_state::jsonb, hash, now()
    FROM moved WHERE accepted_state IS NOT NULL
    ORDER BY to_address, seq DESC
    ON CONFLICT (address) DO UPDATE
    SET state = EXCLUDED.state, tx_hash = EXCLUDED.tx_hash, updated_at = EXCLUDED.updated_at
)
SELECT hash FROM moved
"""

# The decided events are on chain: store their hashes and give the transactions to finality (the caller
# enqueues the finality job for the end of their window in the same transaction).
RELEASE_DECIDED = f"""
UPDATE {T} t SET decided_event_tx = COALESCE(t.decided_event_tx, i.event_tx), job_id = NULL, job_epoch = NULL
FROM unnest($1::text[], $2::bigint[], $3::text[]) AS i(hash, epoch, event_tx)
WHERE t.hash = i.hash AND t.lease_epoch = i.epoch AND t.status IN {DECIDED} AND {HELD}
RETURNING t.hash, t.appeal_failed
"""

# Give a transaction back without counting a recovery (shutdown, a cancelled job, the chain is down): back
# to PENDING if it was mid-machine; a decided one keeps its status and its decided event stays owed. The
# caller enqueues the contract job that takes it up again, in the same transaction.
ABANDON = f"""
UPDATE {T} t
SET status = CASE WHEN status IN {IN_MACHINE} THEN 'PENDING' ELSE status END,
    reason = COALESCE($3, reason),
    activated_event_tx = COALESCE(activated_event_tx, $4),
    proposed_event_tx = COALESCE(proposed_event_tx, $5),
    committed_event_tx = COALESCE(committed_event_tx, $6),
    revealed_event_tx = COALESCE(revealed_event_tx, $7),
    job_id = NULL, job_epoch = NULL
WHERE hash = $1 AND lease_epoch = $2 AND {HELD}
RETURNING status
"""

# The emitter's fence: which of these (hash, epoch) takes are still held (right before a batch is sent).
STILL_HELD = f"""
SELECT t.hash, t.lease_epoch FROM {T} t
JOIN unnest($1::text[], $2::bigint[]) AS r(hash, epoch) ON t.hash = r.hash AND t.lease_epoch = r.epoch
WHERE {HELD}
"""

# Recovery: back to PENDING with recovery_count + 1; the recovery that reaches RUNNER_MAX_RECOVERIES ({cap})
# ends it UNDETERMINED with the reason instead (its decided event is then owed: the contract job emits it).
_RECOVER_SET = """
    recovery_count = t.recovery_count + 1,
    status = CASE WHEN t.recovery_count + 1 >= {cap} THEN 'UNDETERMINED' ELSE 'PENDING' END,
    reason = CASE WHEN t.recovery_count + 1 >= {cap}
        THEN format('recovery cap reached: %s in %s, recovery %s (RUNNER_MAX_RECOVERIES=%s)',
                    {why}, t.status, t.recovery_count + 1, {cap})
        ELSE format('recovered: %s in %s', {why}, t.status) END,
    outcome = CASE WHEN t.recovery_count + 1 >= {cap} THEN 'UNDETERMINED' END,
    timestamp_awaiting_finalization = CASE WHEN t.recovery_count + 1 >= {cap} THEN now() END,
    job_id = NULL, job_epoch = NULL, lease_epoch = t.lease_epoch + 1
"""
RECOVER_LEFTOVERS = RECOVER_LEFTOVERS.format(recover_set=_RECOVER_SET.format(
    cap="$2", why="'its holder (job ' || t.job_id || ') ended or lost its lease'"))

# A contract job's own transaction, stopped for making no progress or by an error ($3 says why); fenced.
# The caller enqueues the contract job that runs it again, in the same transaction.
RECOVER_OWN = f"""
UPDATE {T} t SET {_RECOVER_SET.format(cap="$4", why="$3::text")}
WHERE t.hash = $1 AND t.lease_epoch = $2 AND t.status IN {IN_MACHINE} AND {HELD}
RETURNING t.hash, t.status, t.recovery_count, t.reason
"""

# FINALIZED transactions whose finalized event is owed (a finality job died, the chain was down or was
# reset), in submission order per contract: a transaction whose predecessor on the same contract owes it
# too and is held (in flight at another finality job) is not taken, so two never race one contract's
# events to the chain; taken in seq order with a LIMIT, each contract's rows are a prefix of what it owes.
# Taken under FINALITY_WAIT_LOCK, so each take sees the holders the one before it committed (FOR UPDATE,
# not SKIP LOCKED: a row being released is waited for, not passed over).
TAKE_OWED_FINALIZED = f"""
WITH owed AS (
    SELECT hash FROM {T} t
    WHERE t.status = 'FINALIZED' AND t.finalized_event_tx IS NULL AND {NOT_HELD}
      AND NOT EXISTS (
          SELECT 1 FROM {T} p
          WHERE p.to_address = t.to_address AND p.seq < t.seq AND p.status = 'FINALIZED'
            AND p.finalized_event_tx IS NULL AND {HELD_BY_LIVE_JOB.format(a="p")})
    ORDER BY t.seq
    LIMIT $1
    FOR UPDATE
)
UPDATE {T} t SET job_id = $2, job_epoch = $3, lease_epoch = t.lease_epoch + 1
FROM owed WHERE t.hash = owed.hash
RETURNING {CLAIMED_COLUMNS}
"""

# --- finality: finality jobs, each take in a transaction under the advisory lock (one take at a time
# across workers; a rollback takes it too: finality moves neither its rows nor the state meanwhile)

# Its window passed (shortened by each failed appeal: $1 x $3 ^ appeal_failed), and no appeal is asked for.
_FINALIZABLE = """(
    {a}.status IN {decided} AND {a}.decided_event_tx IS NOT NULL
    AND ({a}.job_id IS NULL OR NOT {held})
    AND {a}.appeal_requested IS NULL
    AND {a}.timestamp_awaiting_finalization <= now() - make_interval(secs => $1 * power($3::float8, {a}.appeal_failed))
)"""


def _finalizable(a: str) -> str:
    return _FINALIZABLE.format(a=a, decided=DECIDED, held=HELD_BY_LIVE_JOB.format(a=a))


# Decided transactions whose window passed and every unfinished predecessor on the same contract is
# finalizable too: a prefix per contract, oldest first. A predecessor FINALIZED whose event is not on chain
# yet (in flight at another finalizer, or owed after a chain error) holds its successors back, so that
# TransactionFinalized reaches the chain in submission order.
FINALITY_READY = f"""
SELECT t.hash, t.to_address, t.seq, t.status, t.state_patch, t.result ->> 'receipt_hash' AS receipt_hash,
       t.lease_epoch, t.round
FROM {T} t
WHERE t.status IN {DECIDED} AND {_finalizable("t")}
  AND NOT EXISTS (
      SELECT 1 FROM {T} p
      WHERE p.to_address = t.to_address AND p.seq < t.seq
        AND ((p.status NOT IN {DONE} AND NOT {_finalizable("p")})
             OR (p.status = 'FINALIZED' AND p.finalized_event_tx IS NULL))
  )
ORDER BY t.seq
LIMIT $2
FOR UPDATE OF t
"""

# Seconds until the next window among decided transactions ends (NULL: none is open): the finality job's
# successor is due then.
NEXT_FINALITY_DUE = f"""
SELECT EXTRACT(EPOCH FROM min(due) - now())::float8 FROM (
    SELECT t.timestamp_awaiting_finalization + make_interval(secs => $1 * power($2::float8, t.appeal_failed)) AS due
    FROM {T} t
    WHERE t.status IN {DECIDED} AND t.decided_event_tx IS NOT NULL AND t.appeal_requested IS NULL
) d
WHERE due > now()
"""

FINALIZED_STATES_FOR = f"SELECT address, state FROM {FINALIZED_STATES} WHERE address = ANY($1::text[])"

FINALIZE = f"""
UPDATE {T} t
SET status = 'FINALIZED', finalized_at = now(), job_id = $2, job_epoch = $3, lease_epoch = t.lease_epoch + 1
WHERE t.hash = ANY($1::text[]) AND t.status IN {DECIDED} AND t.appeal_requested IS NULL
RETURNING t.hash, t.lease_epoch
"""

# --- appeals ---------------------------------------------------------------------------------------------
# Ask for an appeal of a decided transaction whose decision is on chain, inside its window ($2 x $3 ^
# appeal_failed from its decision): validators for ACCEPTED, leader for the others. A worker settles it.
REQUEST_APPEAL = f"""
UPDATE {T} t SET appeal_requested = CASE WHEN t.status = 'ACCEPTED' THEN 'validator' ELSE 'leader' END
WHERE t.hash = $1 AND t.status IN {DECIDED} AND t.appeal_requested IS NULL AND t.decided_event_tx IS NOT NULL
  AND t.timestamp_awaiting_finalization > now() - make_interval(secs => $2 * power($3::float8, t.appeal_failed))
RETURNING t.appeal_requested
"""

# Why a transaction cannot be appealed now: its status, request and window's end.
APPEAL_STATE = f"""
SELECT status, appeal_requested, decided_event_tx IS NOT NULL AS decided_on_chain,
       timestamp_awaiting_finalization + make_interval(secs => $2 * power($3::float8, appeal_failed)) AS window_ends
FROM {T} WHERE hash = $1
"""

# The contract's state just before a transaction: its finalized state, then the patches of the accepted
# transactions between (in submission order). Read under FINALITY_LOCK, so finality does not move them.
STATE_BEFORE = f"""
SELECT (SELECT state FROM {FINALIZED_STATES} WHERE address = $1) AS finalized,
       (SELECT tx_hash FROM {FINALIZED_STATES} WHERE address = $1) AS finalized_tx,
       coalesce((SELECT jsonb_agg(jsonb_build_array(hash, state_patch) ORDER BY seq) FROM {T}
                 WHERE to_address = $1 AND seq < $2 AND status = 'ACCEPTED'), '[]'::jsonb) AS patches
"""

# An appeal that changed nothing: recorded, the votes merged, the window restarted shorter.
APPEAL_FAILED = f"""
UPDATE {T} t SET appeal_requested = NULL, appeal_failed = t.appeal_failed + 1, appeals = t.appeals || $3::jsonb,
    votes = $4::jsonb, round = $5, timestamp_awaiting_finalization = now(), job_id = NULL, job_epoch = NULL
WHERE t.hash = $1 AND t.lease_epoch = $2 AND t.status IN {DECIDED} AND {HELD}
RETURNING t.appeal_failed
"""

# An appeal whose settlement raised: the request ends, recorded, its round used ($5: a later appeal opens
# the next one); the decision and its window stand.
APPEAL_ABANDONED = f"""
UPDATE {T} t SET appeal_requested = NULL, appeals = t.appeals || $3::jsonb, round = $4, job_id = NULL,
    job_epoch = NULL
WHERE t.hash = $1 AND t.lease_epoch = $2 AND t.status IN {DECIDED} AND {HELD}
RETURNING t.hash
"""

# A successful appeal (or a leader appeal): the transaction and every newer one of its contract that ran
# back to PENDING in one statement, fenced on the appealed one's lease. Their epochs are bumped (an
# in-flight worker's writes and emits are refused), their decisions, votes, patches and event hashes
# cleared; each re-run is a new round ($3 for the appealed one), so its events are new events. The caller
# enqueues one contract job per row, in the same transaction.
ROLLBACK = f"""
WITH target AS (
    SELECT hash, to_address, seq FROM {T} t
    WHERE t.hash = $1 AND t.lease_epoch = $2 AND t.status IN {DECIDED} AND {HELD}
)
UPDATE {T} t SET status = 'PENDING',
    round = CASE WHEN t.hash = g.hash THEN $3 ELSE t.round + 1 END,
    appeals = CASE WHEN t.hash = g.hash THEN t.appeals || $4::jsonb ELSE t.appeals END,
    reason = CASE WHEN t.hash = g.hash THEN $5 ELSE 'rolled back: an appeal of an older transaction of its '
                                                     'contract succeeded' END,
    rotation_count = 0, appeal_requested = NULL, leader = NULL, votes = NULL, result = NULL, state_patch = NULL,
    draw = NULL,
    outcome = NULL, timestamp_awaiting_finalization = NULL,
    {", ".join(f"{c} = NULL" for c in EVENT_COLUMNS)},
    job_id = NULL, job_epoch = NULL, lease_epoch = t.lease_epoch + 1
FROM target g
WHERE t.to_address = g.to_address AND t.seq >= g.seq AND t.status NOT IN ('PENDING', 'FINALIZED', 'CANCELED')
RETURNING t.hash, t.seq, t.status
"""

RESTORE_ACCEPTED_STATE = f"""
INSERT INTO {ACCEPTED_STATES} (address, state, tx_hash, updated_at) VALUES ($1, $2::jsonb, $3, now())
ON CONFLICT (address) DO UPDATE SET state = EXCLUDED.state, tx_hash = EXCLUDED.tx_hash, updated_at = now()
"""
DROP_ACCEPTED_STATE = f"DELETE FROM {ACCEPTED_STATES} WHERE address = $1"
FINALITY_WAIT_LOCK = "SELECT pg_advisory_xact_lock($1)"

UPSERT_FINALIZED_STATES = f"""
INSERT INTO {FINALIZED_STATES} (address, state, tx_hash, updated_at)
SELECT s.address, s.state::jsonb, s.tx_hash, now()
FROM unnest($1::text[], $2::text[], $3::text[]) AS s(address, state, tx_hash)
ON CONFLICT (address) DO UPDATE
SET state = EXCLUDED.state, tx_hash = EXCLUDED.tx_hash, updated_at = EXCLUDED.updated_at
"""

# Store the finalized event's chain tx hash ($3, NULL when it failed) and release; fenced per row.
RELEASE_FINALIZED = f"""
UPDATE {T} t SET finalized_event_tx = COALESCE(t.finalized_event_tx, $3), job_id = NULL, job_epoch = NULL
FROM unnest($1::text[], $2::bigint[]) AS r(hash, epoch)
WHERE t.hash = r.hash AND t.lease_epoch = r.epoch AND t.status = 'FINALIZED' AND {HELD}
RETURNING t.hash
"""

# --- validators -------------------------------------------------------------------------------------
VALIDATORS_ALL = f"SELECT address, stake, key_ref, added_at FROM {VALIDATORS} ORDER BY address"

UPSERT_VALIDATOR = f"""
INSERT INTO {VALIDATORS} (address, stake, key_ref) VALUES ($1, $2, $3)
ON CONFLICT (address) DO UPDATE SET stake = EXCLUDED.stake, key_ref = EXCLUDED.key_ref
RETURNING (xmax = 0) AS added
"""

DELETE_VALIDATOR = f"DELETE FROM {VALIDATORS} WHERE address = $1 RETURNING address"

# --- reads ---------------------------------------------------------------------------------------------
COUNTS = f"SELECT status, count(*) AS n FROM {T} GROUP BY status"

HAS_WORK = f"""
SELECT EXISTS (SELECT 1 FROM {T} WHERE status NOT IN {DONE})
    OR EXISTS (SELECT 1 FROM {T} WHERE status = 'FINALIZED' AND finalized_event_tx IS NULL)
"""

GET = f"SELECT * FROM {T} WHERE hash = $1"

# An operator's cancel: only a PENDING transaction (nothing of it ran or is on chain); its contract's queue
# moves on to the next one. The epoch bump refuses a claim that read it just before.
CANCEL = f"""
UPDATE {T} t SET status = 'CANCELED', reason = $2, finalized_at = now(),
    job_id = NULL, job_epoch = NULL, lease_epoch = t.lease_epoch + 1
WHERE t.hash = $1 AND t.status = 'PENDING'
RETURNING t.hash
"""
# text_pattern_ops is not needed: a primary-key range scan serves the prefix (hash >= p AND hash < p || 'g')
GET_BY_PREFIX = f"SELECT * FROM {T} WHERE hash >= $1 AND hash < $1 || 'g' ORDER BY hash LIMIT 2"

STATE_OF = f"""
SELECT (SELECT state FROM {ACCEPTED_STATES} WHERE address = $1) AS accepted,
       (SELECT state FROM {FINALIZED_STATES} WHERE address = $1) AS finalized
"""

DEPLOYMENT = f"SELECT address, block_number FROM {DEPLOYMENTS} WHERE chain_id = $1 AND contract = $2"

INSERT_DEPLOYMENT = f"""
INSERT INTO {DEPLOYMENTS} (chain_id, contract, address, block_number) VALUES ($1, $2, $3, $4)
ON CONFLICT (chain_id, contract) DO NOTHING
RETURNING address
"""

# A chain reset (ConsensusMain deployed again: the stored address had no code): the events stored for the
# old deployment are not on this chain. Their hashes are cleared, so nothing shows a chain tx the node does
# not have; transactions in the machine start again (every event re-emitted on the new chain); decided ones
# owe their decided event again, finalized ones their TransactionFinalized (the owed loops emit them, in
# submission order, and --drain waits for them). The earlier events of decided and finalized transactions
# (activation, proposal, votes) are not re-emitted: `runner tx` shows them as not on this chain. Bumping
# the epochs refuses every in-flight write of the old round. The caller enqueues a contract job per row that
# owes work (PENDING again, or its decided event) and a finality job, in the same transaction.
CHAIN_RESET = f"""
UPDATE {T} t SET {", ".join(f"{c} = NULL" for c in EVENT_COLUMNS)},
    status = CASE WHEN t.status IN {IN_MACHINE} THEN 'PENDING' ELSE t.status END,
    reason = CASE WHEN t.status IN {IN_MACHINE} THEN 'given back: the chain was reset (ConsensusMain deployed again)'
                  ELSE t.reason END,
    job_id = NULL, job_epoch = NULL, lease_epoch = t.lease_epoch + 1
WHERE t.status NOT IN ('PENDING', 'CANCELED')
  AND ({" OR ".join(f"t.{c} IS NOT NULL" for c in EVENT_COLUMNS)} OR t.status IN {IN_MACHINE})
RETURNING t.status, t.to_address
"""

# Compare-and-swap: replace a stale address only if nobody replaced it first.
REPLACE_DEPLOYMENT = f"""
UPDATE {DEPLOYMENTS} SET address = $3, block_number = $4, deployed_at = now()
WHERE chain_id = $1 AND contract = $2 AND address = $5
RETURNING address
"""

# --- the orphan sweep: work whose job is gone ------------------------------------------------------------
# Every write that leaves work enqueues its job, but a job can end without doing it: an operator cancelled
# it (a waiting one at once; a running one as it snoozed), or the core failed it past RUNNER_MAX_RECOVERIES.
# The contracts with work (PENDING, left in the machine, a decided event owed or an appeal asked for) and
# no unfinished job of their key; and whether decided transactions (or owed TransactionFinalized events)
# wait for a finality job that is gone. Read through the partial indexes of unfinished rows: bounded by
# live work.
ORPHANED_WORK = f"""
SELECT array(
    SELECT DISTINCT t.to_address FROM {T} t
    WHERE t.status NOT IN {DONE}
      AND (t.status = 'PENDING' OR {_LEFT_OVER} OR (t.status IN {DECIDED} AND t.appeal_requested IS NOT NULL))
      AND NOT EXISTS (SELECT 1 FROM runner_jobs j WHERE j.fifo_key = $1 || t.to_address
                                                 AND j.status IN ('pending', 'running'))
) AS contracts,
(EXISTS (SELECT 1 FROM {T} t WHERE t.status NOT IN {DONE} AND t.status IN {DECIDED}
                                AND t.decided_event_tx IS NOT NULL AND t.appeal_requested IS NULL)
 OR EXISTS (SELECT 1 FROM {T} t WHERE t.status = 'FINALIZED' AND t.finalized_event_tx IS NULL))
AND NOT EXISTS (SELECT 1 FROM runner_jobs j WHERE j.fifo_key = $2 AND j.status IN ('pending', 'running'))
AS finality
"""
