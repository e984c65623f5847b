"""The consensus loops' jobs, on the core's one lease engine.

* ``consensus.contract`` (fifo_key ``consensus:<contract>``): the contract's work. One runs at a time per
  contract; each run recovers what a dead run left in the machine, settles owed decided events, then takes
  ONE unit of work (an appeal asked for, else the oldest PENDING transaction) and, when the contract has
  more, snoozes (runner.Snooze: back to pending, no attempt used) behind the other contracts' waiting
  jobs, so contracts take turns in the worker's slots (20 units per run let the first 64 of 100 contracts
  hold the slots to the end of their backlogs: 74 finalized/s against 93/s with 1 in bench/consensus.py).
  Every write that leaves work for a contract enqueues one of these with it (store.py), coalesced: it joins
  the contract's waiting job when there is one (NewJob.coalesce), so a contract has at most one waiting
  job (two while one runs: its own, snoozed, and one enqueued meanwhile), and never work without a job; a
  job that finds nothing to do ends at once.
* ``consensus.finality`` (fifo_key ``consensus:finality``, coalesced): finalizes what is due, one run at
  a time across workers. Enqueued for the end of each decided transaction's window, it joins the waiting
  one, which then runs at the earlier of the two times; each run enqueues the next for the earliest window
  still open, so every decided transaction has a run due at (or before) the end of its window.

The core claims, heartbeats, rescues and fences them like any job; both live in the ``consensus`` queue,
which every worker with the consensus loops on claims whatever RUNNER_QUEUES says (JobKind.internal).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runner.queue import NewJob

QUEUE = "consensus"
CONTRACT_KIND = "consensus.contract"
FINALITY_KIND = "consensus.finality"
# Their failures are handled inside the handlers (a transaction is given back or recovered, and a new job
# enqueued with it); attempts run out only when a handler cannot reach the database for that long.
FINALITY_KEY = "consensus:finality"
MAX_ATTEMPTS = 1000


CONTRACT_KEY_PREFIX = "consensus:"


def contract_key(address: str) -> str:
    return CONTRACT_KEY_PREFIX + address


def contract_job(address: str, after: float = 0.0) -> NewJob:
    from runner.queue import NewJob

    return NewJob(CONTRACT_KIND, {"contract": address}, QUEUE, delay_s=after, max_attempts=MAX_ATTEMPTS,
                  fifo_key=contract_key(address), coalesce=True)


def finality_job(after: float = 0.0) -> NewJob:
    from runner.queue import NewJob

    return NewJob(FINALITY_KIND, {}, QUEUE, delay_s=max(0.0, after), max_attempts=MAX_ATTEMPTS,
                  fifo_key=FINALITY_KEY, coalesce=True)
