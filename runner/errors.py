"""One exception root for runner. Driver errors are translated at the database boundary (runner.db)."""

from __future__ import annotations


class RunnerError(Exception):
    """Root of every error runner raises on purpose. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(RunnerError):
    """Bad input from the user: a bad flag, payload, id or file. Nothing has been written."""

    exit_code = 2


class ScheduleError(UsageError):
    """A schedule that cannot be stored or found: a bad cron expression, timezone, interval, policy or name."""


class JobNotFound(UsageError):
    pass


class UnknownKind(UsageError):
    pass


class PayloadError(UsageError):
    """A payload a handler cannot run; the job fails at once without burning its retries."""


class AppNotOpen(UsageError):
    """An App method that needs the pool was called before ``async with app:``."""


class WaitTimeout(RunnerError):
    """``App.wait`` gave up: the job had not finished within its timeout."""


class DatabaseUnavailable(RunnerError):
    """The database did not answer within RUNNER_DB_CONNECT_TIMEOUT."""


class PoolExhausted(RunnerError):
    """No pooled connection came free within the retry budget (attempts and total wait)."""


class LeaseLost(RunnerError):
    """A fenced write changed nothing: another worker now owns the job, so this one must drop it."""


class RetryLater(RunnerError):
    """Raised by a handler to end this attempt as failed and run again after ``delay_s`` (one attempt used;
    past max_attempts the job fails with this message)."""

    def __init__(self, delay_s: float, reason: str = "retry requested by the handler") -> None:
        if delay_s < 0:
            raise ValueError("RetryLater delay_s must be >= 0")
        super().__init__(reason)
        self.delay_s = delay_s


class Snooze(RunnerError):
    """Raised by a handler to put its job back in the queue, to run again after ``delay_s``, using no attempt:
    polling something not ready yet, or taking turns with other jobs. Behind the jobs already waiting (in
    claim order), and first of its ``fifo_key`` still. Recorded in the attempt log as ``snoozed``."""

    def __init__(self, delay_s: float = 0.0, reason: str = "snoozed by the handler") -> None:
        if not 0 <= delay_s <= 366 * 86_400:
            raise ValueError("Snooze delay_s must be between 0 and a year of seconds")
        super().__init__(reason)
        self.delay_s = delay_s


class JobFailed(RunnerError):
    """Raised by a handler to fail the job now, without using the attempts it has left (a retry cannot
    help: a parallel backfill whose chunks failed, say). ``runner retry`` runs it again."""


class JobCancelled(RunnerError):
    """The job was cancelled by a user while it ran."""


class EmbeddedPostgresError(RunnerError):
    pass


class ChainNotConfigured(RunnerError):
    """No chain to open: RUNNER_CHAIN_URL is unset and the in-process chain (the ``chain`` extra) is not
    installed. Plugins that need the chain turn themselves off on it (unlike ``runner.chain.ChainUnavailable``:
    a configured node that does not answer)."""
